"""What a person reads on the console: off a terminal (a log file, a Ray worker) one progress line
per logging interval, not a redrawn bar; nothing from a rank other than 0 (the Ray test
``test_worker_killed_mid_run_resumes_from_last_checkpoint`` checks the same of a real 2-worker run)."""
from __future__ import annotations

import io

from trainer.metrics import MetricsLogger, ProgressLines, format_duration


def test_progress_off_a_terminal_is_one_line_per_logging_interval(tiny_config, capsys):
    from trainer.loop import train
    cfg = tiny_config(**{"train.steps": 6, "train.log_every": 3, "eval.shapes": False, "log.progress": True})
    train(cfg)
    out = capsys.readouterr()
    progress = [line for line in out.out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["3/6", "6/6"], out.out
    assert "loss " in progress[0] and "lr " in progress[0] and "eta " in progress[0]
    assert "eta " not in progress[1]  # done
    assert "\r" not in out.out + out.err and "train:" not in out.err  # no tqdm bar redrawn into a file
    assert "Warning" not in out.err, out.err


def test_other_ranks_print_and_write_nothing(tiny_config, tmp_path, capsys):
    cfg = tiny_config(**{"log.progress": True})
    logger = MetricsLogger(tmp_path / "rank1", cfg.log, cfg.to_dict(), total_steps=4, rank=1)
    logger.advance()
    logger.log({"step": 1, "loss": 1.0, "lr": 1e-3})
    logger.log({"step": 1, "shapes_eval/overall": 0.5})
    logger.close()
    out = capsys.readouterr()
    assert out.out == out.err == ""
    assert not (tmp_path / "rank1").exists()


def test_durations_read_as_a_person_says_them():
    assert [format_duration(s) for s in (0.4, 59, 61, 750, 3600 + 5 * 60 + 20)] == ["0s", "59s", "1m01s", "12m30s",
                                                                                   "1h05m"]


def test_an_evaluation_prints_its_scores_after_the_step():
    out = io.StringIO()
    ProgressLines(100, file=out).print({"step": 100, "shapes_eval/overall": 0.07, "shapes_eval/object": 0.52})
    assert out.getvalue() == "step 100 shapes_eval: overall 0.07  object 0.52\n"

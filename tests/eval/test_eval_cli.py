"""``crossflow eval`` commands, registered on a bare parser (no trained checkpoint needed)."""
import argparse
import json

import pytest

from data_pipeline.shapes import render
from trainer.eval.cli import add_eval_commands, sample_shapes_eval, scores_at_scales
from trainer.eval.shapes_eval import prompt_suite


def _parser():
    parser = argparse.ArgumentParser(prog="crossflow")
    add_eval_commands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize("metric", ["shapes", "fid", "clip"])
def test_help(metric, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["eval", metric, "--help"])
    assert e.value.code == 0
    assert "--checkpoint" in capsys.readouterr().out


def test_fid_and_clip_require_local_weights():
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "fid", "--checkpoint", "run", "--reference", "shapes"])  # no --inception
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "clip", "--checkpoint", "run"])  # no --clip


def test_shapes_self_check_prints_table_and_score(tmp_path, capsys):
    out = tmp_path / "summary.json"
    args = _parser().parse_args(["eval", "shapes", "--self-check", "--per-prompt", "1", "--json", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "ShapesEval overall: 1.000" in printed and "a small red circle on the left" in printed
    assert json.loads(out.read_text())["overall"] == 1.0


def test_sample_shapes_eval_with_a_perfect_generator():
    scenes = {p.caption: p.scene for p in prompt_suite(2)}

    class Perfect:  # draws exactly what each caption asks for, a different layout per seed
        def generate(self, prompts, seed=0, **kw):
            import numpy as np
            return [render(scenes[c], 32, np.random.default_rng([seed, i])) for i, c in enumerate(prompts)]

    summary = sample_shapes_eval(Perfect(), max_groups=2, images_per_prompt=2, seed=5).summary()
    assert summary["overall"] == 1.0 and summary["n_images"] == 180


def test_scores_at_scales_names_each_scale_and_passes_it_to_the_sampler():
    """One checkpoint scored at several guidance scales: ``<name>@cfg<s>``, as training logs them."""
    scenes = {p.caption: p.scene for p in prompt_suite(1)}
    asked = []

    class GuidedOnly:  # draws the right scene only with guidance (s > 1), black images without
        def generate(self, prompts, seed=0, cfg_scale=None, **kw):
            import numpy as np
            asked.append(cfg_scale)
            if cfg_scale > 1:
                return [render(scenes[c], 32, np.random.default_rng([seed, i])) for i, c in enumerate(prompts)]
            return [np.zeros((32, 32, 3), np.uint8) for _ in prompts]

    scores = scores_at_scales(GuidedOnly(), [1.0, 2.5], images_per_prompt=1)
    assert asked == [1.0, 2.5]
    assert scores["overall@cfg1"] == 0.0 and scores["overall@cfg2.5"] == 1.0
    assert scores["overall_heldout@cfg2.5"] == 1.0 and scores["n_images@cfg1"] == 60
    args = _parser().parse_args(["eval", "shapes", "--checkpoint", "run", "--cfg-scales", "1", "3", "7"])
    assert args.cfg_scales == [1.0, 3.0, 7.0]

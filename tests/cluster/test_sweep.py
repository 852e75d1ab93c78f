"""A sweep of the tiny preset at 3 sizes on the embedded Ray cluster, then the scaling-law analysis."""
from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import cli, run
from tests.support.tiny_models import tiny_text_encoder

pytestmark = pytest.mark.slow


def test_sweep_runs_resumes_and_analyzes(tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    out = tmp_path / "sweep"
    sweep_file.write_text(yaml.safe_dump({
        "name": "ci_sizes", "base_config": "configs/demo.yaml", "out_dir": str(out),
        "overrides": ["model.preset=tiny", "model.kernels=torch", f"data.text_encoder={tiny_text_encoder()}",
                      "data.num_samples=2000", "data.max_tokens=12", "train.steps=120",
                      "train.global_batch_size=16", "train.log_every=20", "train.ckpt_every=60",
                      "optim.warmup_steps=20", "eval.shapes=false", "sample.num_prompts=1", "sample.steps=2",
                      "log.wandb=offline", "train.threads=1"],
        "grid": {"model.hidden_size": [64, 128, 192], "model.depth": [2]},
        "resources": {"cpus": 1, "gpus": 0}, "max_concurrent": 2}, sort_keys=False))
    first = run(cli("sweep", "run", "--config", str(sweep_file)), timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    state = json.loads((out / "sweep_state.json").read_text())
    assert sorted(state) == sorted(f"hidden_size-{h}_depth-2" for h in (64, 128, 192))
    assert set(state.values()) == {"finished"}
    for run_dir in out.iterdir():
        if run_dir.is_dir():
            assert json.loads((run_dir / "summary.json").read_text())["steps"] == 120

    # every run logged to W&B offline in the sweep's group
    blobs = glob.glob(str(out / "*" / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(blobs) == 3 and all(b"ci_sizes" in Path(b).read_bytes() for b in blobs)

    # resumable: a finished sweep runs nothing again (`sweep --config` is short for `sweep run --config`)
    again = run(cli("sweep", "--config", str(sweep_file)), timeout=300)
    assert again.returncode == 0 and "starting" not in again.stdout

    analysis = run(cli("sweep", "analyze", str(out)), timeout=300)
    assert analysis.returncode == 0, analysis.stdout[-3000:] + analysis.stderr[-3000:]
    fit = json.loads((out / "analysis" / "fit.json").read_text())
    assert (out / "analysis" / "runs.csv").read_text().count("\n") >= 4
    assert list((out / "analysis").glob("*_vs_params.png"))
    assert "alpha" in json.dumps(fit)

"""Golden numbers: the per-step losses of one tiny deterministic run, checked in (tiny_run.json).

Every equivalence test used to compare two runs of today's code, so a change that moved both sides
passed. These tests compare against numbers recorded once: one process, 2-rank ZeRO 1/2/3
(tests/test_engine.py), Ray with 2 workers (tests/cluster/test_ray_train.py) and resume after a
kill all reproduce ``tiny_run.json`` to ``REL_TOL``.

Changing ``tiny_run.json`` (``python -m tests.golden.regenerate``) is a reviewed commit that says
why the numbers moved.
"""
from __future__ import annotations

import json
from pathlib import Path

GOLDEN_FILE = Path(__file__).with_name("tiny_run.json")

# Why 1e-4: on the machine that recorded the file, one process and 2-rank ZeRO 1/2/3 agree to 1.5e-7
# (the logged loss is the mean of the two ranks' float32 losses: the last bit of that reduction).
# Another CPU may sum matmuls in another order (SIMD width, BLAS kernel choice), a rounding-level
# difference that 20 optimizer steps amplify; 1e-4 leaves room for that, while a real change
# (initialization or RNG order, data order, noise, the objective, the optimizer) moves step 1 or 2
# by 1e-3 or more.
REL_TOL = 1e-4


def golden() -> dict:
    return json.loads(GOLDEN_FILE.read_text())


def golden_overrides(out_dir, **extra) -> list[str]:
    """The golden run's overrides (on top of its config file) with ``train.out_dir`` and ``extra``;
    extras must not change the losses (e.g. train.zero_stage, train.ckpt_every, train.resume)."""
    values = {**golden()["overrides"], "train.out_dir": str(out_dir), **extra}
    return [f"{k}={v}" for k, v in values.items()]


def golden_losses() -> dict[int, float]:
    return {int(step): loss for step, loss in golden()["losses"].items()}


def assert_matches_golden(losses: dict[int, float], what: str, rel: float = REL_TOL) -> None:
    """Each logged step's loss (a step past the golden 20 is not checked) equals the golden one to
    ``rel``; at least the golden steps the run covers must be there."""
    want = golden_losses()
    checked = sorted(s for s in losses if s in want)
    assert checked, f"{what}: no step of the golden run logged (steps {sorted(losses)[:5]}...)"
    off = {s: (losses[s], want[s]) for s in checked if abs(losses[s] - want[s]) > rel * abs(want[s])}
    assert not off, (f"{what}: losses moved from tests/golden/tiny_run.json (rel tol {rel}); step: (got, golden) "
                     f"{off}. If the change is meant, regenerate the file in a commit that says why.")

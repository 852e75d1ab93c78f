"""The compile gate: every Triton kernel variant the launchers can pick compiles with the real
compiler (not the interpreter) down to a cubin for sm_90 and sm_80, within the target's shared
memory per block; register use and spills are printed per variant (``pytest -s``).

The work is tests/kernels/compile_variants.py, run in a fresh process: the kernels must be
decorated with TRITON_INTERPRET unset (``make test`` sets it for everything else), and triton's
cache lives under pytest's tmp_path, so every run compiles from scratch as a CI machine would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().with_name("compile_variants.py")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    """Both targets in one run of the helper (one pool of 2 compiler processes): its rows."""
    tmp = tmp_path_factory.mktemp("compile-gate")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "triton-cache"),
               TRITON_DEFAULT_FP_FUSION="1")  # triton 3.9's default, set to silence its warning
    out = tmp / "variants.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--targets", "90", "80", "--jobs", "2", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    print(proc.stdout)  # per variant: shared memory, registers, spills, seconds (pytest -s shows it)
    assert out.exists(), proc.stderr[-4000:]
    return json.loads(out.read_text())["rows"]


@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_every_kernel_variant_compiles(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    failed = [f"{r['name']} (sm_{arch}): {r['error']}" for r in rows if r["error"]]
    assert not failed, f"{len(failed)} of {len(rows)} variants failed:\n" + "\n".join(failed)
    assert {r["name"].split()[0] for r in rows} == {"attention", "flow_matching_loss", "interpolate", "modulate",
                                                    "gated_residual"}

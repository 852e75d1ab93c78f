"""The compile gate: every Triton kernel variant the launchers can pick compiles with the real
compiler (not the interpreter) down to a cubin for sm_90 and sm_80, within the target's shared
memory per block; register use and spills are printed per variant (``pytest -s``).

The work is tests/kernels/compile_variants.py, run in a fresh process: the kernels must be
decorated with TRITON_INTERPRET unset (``make test`` sets it for everything else), and triton's
cache lives under a fresh temporary folder, so every run compiles from scratch as a CI machine would.

The compiling takes about 290 s of CPU here, while the suite leaves about half of the machine's CPU
idle (Ray and DeepSpeed tests wait on start-ups and polls): so when this test is collected,
tests/kernels/conftest.py starts the compile at the session's start, at the lowest CPU priority
(``nice 19``: it takes only cycles other tests leave), and the test waits for its result. Run
alone, the test starts it itself.
"""
from __future__ import annotations

import pytest

from tests.support.compile_gate import compile_job


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """Every variant's row (both targets), from the job the session started (or one started now)."""
    return compile_job().rows()


@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_every_kernel_variant_compiles(compiled, arch):
    rows = [r for r in compiled if r["arch"] == arch]
    failed = [f"{r['name']} (sm_{arch}): {r['error']}" for r in rows if r["error"]]
    assert not failed, f"{len(failed)} of {len(rows)} variants failed:\n" + "\n".join(failed)
    assert {r["name"].split()[0] for r in rows} == {"attention", "flow_matching_loss", "interpolate", "modulate",
                                                    "gated_residual"}

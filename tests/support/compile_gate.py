"""The compile gate's background job (tests/kernels/test_compile_gate.py): compile_variants.py for
sm_90 and sm_80 in a process at the lowest CPU priority, started by tests/kernels/conftest.py when the
session collects the gate, so the compiling uses CPU the other tests leave idle."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "kernels" / "compile_variants.py"


class CompileJob:
    """compile_variants.py for both targets (one pool of 2 compiler processes), in the background."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="crossflow-compile-gate-"))
        self.out = self.dir / "variants.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=str(self.dir / "triton-cache"),
                   TRITON_DEFAULT_FP_FUSION="1")  # triton 3.9's default, set to silence its warning
        self.log = open(self.dir / "log.txt", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--targets", "90", "80", "--jobs", "2", "--json", str(self.out)],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: os.nice(19))  # its own group: close() ends the pool's workers too

    def rows(self, timeout: float = 1800) -> list[dict]:
        self.proc.wait(timeout=timeout)
        self.log.seek(0)
        output = self.log.read()
        print(output)  # per variant: shared memory, registers, spills, seconds (pytest -s shows it)
        assert self.out.exists(), output[-4000:]
        return json.loads(self.out.read_text())["rows"]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


_job: CompileJob | None = None


def compile_job() -> CompileJob:
    """The session's job, started on first call."""
    global _job
    if _job is None:
        _job = CompileJob()
    return _job


def close_compile_job() -> None:
    global _job
    if _job is not None:
        _job.close()
        _job = None

"""Third-party notices that are only noise on our console, silenced one by one (never a whole
library's warnings): each is named, with why it tells the user nothing.

Our own output lives elsewhere: progress and metrics in ``trainer.metrics`` (rank 0 only), the
run's outcome in ``trainer.cli``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_deepspeed_on_cpu() -> None:
    """Before DeepSpeed is first imported, on a CPU run: name its accelerator (else every rank warns
    "Setting accelerator to CPU. If you have GPU ... we were unable to detect it") and drop torch's
    "No CUDA runtime is found, using CUDA_HOME=..." (a CUDA toolkit without a GPU, met when DeepSpeed
    compiles its CPU ops). A ``DS_ACCELERATOR`` the user set is kept."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.getLogger("torch.utils.cpp_extension").addFilter(_DropMessages("No CUDA runtime is found"))


@contextlib.contextmanager
def without_build_notice():
    """DeepSpeed prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on every
    rank when it loads its CPU all-reduce (a Python ``print``; a compiler's own output, written to the
    file descriptor, and errors, raised, still show)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


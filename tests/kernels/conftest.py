"""Shared fixtures for the kernel tests.

Without CUDA the Triton kernels run under the CPU interpreter, which triton.jit reads when
the op modules are first imported: set it here, before any test module imports them.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels._launch import poison_outputs  # noqa: E402  (after the environment is set)


def pytest_collection_modifyitems(session, config, items):
    """The compile gate's compiling starts now, in the background (see test_compile_gate.py)."""
    if any(item.nodeid.startswith("tests/kernels/test_compile_gate.py") for item in items):
        from tests.support.compile_gate import compile_job
        compile_job()


def pytest_sessionfinish(session, exitstatus):
    from tests.support.compile_gate import close_compile_job
    close_compile_job()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def fresh_seed():
    """A new random seed per test (printed, so a failure can be replayed); never a retry."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"torch seed: {seed}")
    torch.manual_seed(seed)
    yield seed


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every buffer the launchers allocate starts as NaN, so unwritten elements fail."""
    with poison_outputs():
        yield

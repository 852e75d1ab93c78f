"""bench/host_overhead.py runs at tiny sizes and prints its table (in this process: no new interpreter)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "host_overhead.py"


def test_host_overhead_bench_prints_a_row_per_global_batch(capsys):
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--global-batches", "8,16", "--micro-batch", "4", "--latent", "2,4,4", "--tokens", "3",
                "--width", "8", "--steps", "2", "--warmup", "0", "--log-every", "1", "--old-ref", "", "--threads", "0", "--rounds", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 8 |", "| 16 |"))]
    assert [r.split("|")[2].strip() for r in rows] == ["2", "4"]  # world = global / micro-batch

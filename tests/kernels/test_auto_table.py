"""model.kernels: auto reads kernels/auto_table.json: the shipped table's schema and H100 entry, the
decision rule, auto on CPU, a known and an unknown device class, and the writer's round trip."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import kernels
from kernels import auto_table, reference

OPS = auto_table.OPS


def test_shipped_table_is_valid_and_says_where_its_numbers_come_from():
    table = auto_table.load_table()  # validates
    h100 = table["device_classes"]["sm90-h100"]
    assert h100["device_name"] == "NVIDIA H100 80GB HBM3"
    assert "transcribed from bench/RESULTS.md" in h100["source"]["note"]
    assert h100["source"]["date"] == "2026-11-25" and len(h100["source"]["commit"]) == 40
    assert {m["op"] for m in h100["measurements"]} == set(OPS)
    # What that means for auto on an H100 (bf16): Triton attention up to the measured 257 tokens at
    # head dim 128 and Triton modulate at the 0.95B width; the loss, interpolation and gated residual
    # lost to torch.compile of the reference, attention at 1025 tokens to cuDNN: PyTorch there.
    assert auto_table.triton_limits(h100["measurements"]) == {
        "attention": {("bfloat16", 128): 257}, "modulate": {("bfloat16", 1536): 1025}}


def test_device_class_names():
    assert auto_table.device_class("NVIDIA H100 80GB HBM3", (9, 0)) == "sm90-h100"
    assert auto_table.device_class("NVIDIA H100 PCIe", (9, 0)) == "sm90-h100"
    assert auto_table.device_class("NVIDIA A100-SXM4-80GB", (8, 0)) == "sm80-a100"
    assert auto_table.device_class("NVIDIA GeForce RTX 4090", (8, 9)) == "sm89-4090"


def _row(**changes):
    row = auto_table.measurement("attention", "float32", "B1 H2 N16 D16", 16, 16,
                                 {"triton": 1.0, "sdpa-default": 2.0}, True)
    row.update(changes)
    return row


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update(schema_version=0), "schema_version must be 1"),
    (lambda t: t["device_classes"]["x"].pop("source"), "missing \\['source'\\]"),
    (lambda t: t["device_classes"]["x"]["measurements"][0].update(op="softmax"), "op 'softmax'"),
    (lambda t: t["device_classes"]["x"]["measurements"][0].update(dtype="fp8"), "dtype 'fp8'"),
    (lambda t: t["device_classes"]["x"]["measurements"][0]["ms"].update(triton=-1), "ms\\['triton'\\]"),
    (lambda t: t["device_classes"]["x"]["measurements"][0].update(fastest="sdpa-default"), "fastest is"),
    (lambda t: t["device_classes"]["x"]["measurements"][0].update(tokens="16"), "tokens must be"),
])
def test_validate_names_the_problem(change, message):
    source = {k: "s" for k in ("command", "date", "commit", "device_name", "torch", "triton", "timing")}
    table = {"schema_version": 1, "device_classes": {"x": {"device_name": "X", "source": source,
                                                           "measurements": [_row()]}}}
    auto_table.validate(copy.deepcopy(table))
    change(table)
    with pytest.raises(auto_table.TableError, match=message):
        auto_table.validate(table)


def test_triton_limits_rule():
    """Triton up to the longest length where it won at every measured length and batch; per dtype
    and width; ops without lengths need every shape won."""
    def row(op, tokens, width, triton_ms, correct=True, shape="s"):
        return auto_table.measurement(op, "bfloat16", shape, tokens, width,
                                      {"triton": triton_ms, "torch eager": 1.0}, correct)
    limits = auto_table.triton_limits([
        row("attention", 64, 64, 0.5), row("attention", 256, 64, 0.5), row("attention", 256, 64, 2.0, shape="B2"),
        row("attention", 64, 128, 0.5), row("attention", 1024, 128, 0.5), row("attention", 4096, 128, 2.0),
        row("modulate", 64, 448, 0.5, correct=False),
        row("interpolate", None, None, 0.5), row("flow_matching_loss", None, None, 0.5),
        row("flow_matching_loss", None, None, 2.0, shape="big"),
    ])
    assert limits == {"attention": {("bfloat16", 64): 64, ("bfloat16", 128): 1024},
                      "interpolate": {("bfloat16", None): float("inf")}}


def test_measured_op_dispatches_per_call():
    calls = []
    op = auto_table.measured_op("attention", lambda *a: calls.append("triton"), lambda *a: calls.append("torch"),
                                {("bfloat16", 128): 257})
    for dtype, n, d in ((torch.bfloat16, 257, 128), (torch.bfloat16, 258, 128), (torch.bfloat16, 9, 64),
                        (torch.float16, 9, 128)):
        q = torch.empty(1, 2, n, d, dtype=dtype, device="meta")
        op(q, q, q, None)
    assert calls == ["triton", "torch", "torch", "torch"]


def test_auto_on_cpu_is_torch_for_every_op():
    ops = kernels.get_ops("auto", "cpu")
    assert ops.backend == "torch" and set(ops.implementations.values()) == {"torch"}


def test_known_and_unknown_device_classes(tmp_path):
    """The shipped H100 entry: attention and modulate measured, the rest PyTorch; an unknown class:
    PyTorch for all. A table with a CPU-sized win runs the Triton op (interpreter) for that call."""
    h100 = kernels.ops_for_device_class("sm90-h100", "cpu")
    assert h100.backend == "auto"
    assert h100.implementations == {"attention": "measured", "flow_matching_loss": "torch", "interpolate": "torch",
                                    "modulate": "measured", "gated_residual": "torch"}
    q = torch.randn(1, 2, 9, 64)  # fp32: not in the H100 table, so the reference runs
    torch.testing.assert_close(h100.attention(q, q, q), reference.attention(q, q, q))
    unknown = kernels.ops_for_device_class("sm75-t4", "cpu")
    assert all(getattr(unknown, op) is getattr(reference, op) for op in OPS)

    source = {k: "test" for k in ("command", "date", "commit", "device_name", "torch", "triton", "timing")}
    auto_table.write_entry(tmp_path / "t.json", "cpu-test", {"device_name": "test", "source": source, "measurements": [
        auto_table.measurement("modulate", "float32", "B2 N17 D32", 17, 32, {"triton": 1.0, "torch eager": 2.0}, True)]})
    ops = kernels.ops_for_device_class("cpu-test", "cpu", table_path=tmp_path / "t.json")
    x, shift, scale = torch.randn(2, 17, 32), torch.randn(2, 32), torch.randn(2, 32)
    torch.testing.assert_close(ops.modulate(x, shift, scale), reference.modulate(x, shift, scale), atol=1e-4, rtol=1e-4)


def test_write_entry_adds_and_replaces_one_class(tmp_path):
    path = tmp_path / "table.json"
    source = {k: "s" for k in ("command", "date", "commit", "device_name", "torch", "triton", "timing")}
    first = {"device_name": "A", "source": source, "measurements": [_row()]}
    auto_table.write_entry(path, "sm80-a100", first)
    auto_table.write_entry(path, "sm90-h100", {**first, "device_name": "H"})
    later = {**source, "date": "later"}
    auto_table.write_entry(path, "sm80-a100", {**first, "source": later, "measurements": [
        _row(ms={"triton": 3.0, "sdpa-default": 2.0}, fastest="sdpa-default"), _row(dtype="float16")]})
    table = json.loads(path.read_text())
    assert table["device_classes"]["sm90-h100"]["device_name"] == "H"
    a100 = table["device_classes"]["sm80-a100"]
    assert a100["source"] == later  # the same (op, dtype, shape) replaced, another dtype added
    assert [(m["dtype"], m["fastest"], "source" in m) for m in a100["measurements"]] == [
        ("float32", "sdpa-default", False), ("float16", "triton", False)]
    auto_table.write_entry(path, "sm80-a100", {**first, "source": later, "measurements": [_row(dtype="bfloat16")]})
    kept = auto_table.load_table(path)["device_classes"]["sm80-a100"]["measurements"]
    assert [(m["dtype"], m.get("source")) for m in kept] == [("float32", later), ("float16", later), ("bfloat16", None)]
    with pytest.raises(auto_table.TableError, match="fastest"):
        auto_table.write_entry(path, "bad", {**first, "measurements": [_row(fastest="sdpa-default")]})
    assert "bad" not in auto_table.load_table(path)["device_classes"]  # nothing written

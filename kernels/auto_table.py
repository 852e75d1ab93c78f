"""What ``model.kernels: auto`` runs on CUDA: a table of measurements that bench/kernels.py writes.

``auto_table.json`` (next to this file) holds, per device class (``device_class``: compute
capability and chip, e.g. "sm90-h100"), the forward+backward times the bench measured per op,
dtype and shape, for Triton and for every PyTorch implementation it tried, whether Triton's output
and gradients matched the PyTorch reference, and where the numbers come from (command, date, git
commit). ``auto`` runs an op's Triton kernel only where that table says Triton was correct and
faster than every PyTorch implementation measured on the device's class, and PyTorch everywhere
else: on an unknown device class, on CPU, for an op, dtype or width the table does not cover.

Per op, dtype and width (the head dim for attention, the hidden width for modulate and
gated_residual; none for the loss and interpolation), Triton runs up to the longest measured
sequence L such that Triton won at every measured length up to L (and at every batch size measured
there); an op without lengths (the loss, interpolation) needs Triton to have won at every measured
shape. Nothing is extrapolated beyond the longest such length.

A new device class: run ``python bench/kernels.py --write-table`` on it (it writes that class's
entry, replacing the rows of the ops, dtype and shapes it measured and keeping the class's other
rows, and leaves the other classes alone). This module imports neither torch nor triton.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable

TABLE_PATH = Path(__file__).resolve().with_name("auto_table.json")
SCHEMA_VERSION = 1
OPS = ("attention", "flow_matching_loss", "interpolate", "modulate", "gated_residual")
DTYPES = ("float32", "bfloat16", "float16")
TRITON = "triton"
_MEASUREMENT_KEYS = {"op", "dtype", "shape", "tokens", "width", "ms", "triton_correct", "fastest"}
_SOURCE_KEYS = {"command", "date", "commit", "device_name", "torch", "triton", "timing"}


class TableError(ValueError):
    """The table is malformed: the message names the device class, field and value."""


def device_class(name: str, capability: tuple[int, int]) -> str:
    """A device's class: "sm<major><minor>-<chip>", the chip being the first word of the name
    with a digit in it ("NVIDIA H100 80GB HBM3", (9, 0) -> "sm90-h100"; "NVIDIA A100-SXM4-80GB",
    (8, 0) -> "sm80-a100"). Boards of one chip (SXM, PCIe, memory sizes) share a class."""
    words = re.split(r"[\s_-]+", name.lower().replace("nvidia", " ").strip())
    chip = next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "unknown")
    return f"sm{capability[0]}{capability[1]}-{chip}"


def load_table(path: str | Path = TABLE_PATH) -> dict:
    """The table at ``path``, validated (an empty table if the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return {"schema_version": SCHEMA_VERSION, "device_classes": {}}
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise TableError(f"{path}: not JSON ({err})") from err
    validate(table, where=str(path))
    return table


def validate(table: dict, where: str = "table") -> None:
    """Raise TableError naming the first problem: unknown schema, missing or unknown field, an
    unknown op or dtype, a time that is not a positive number, "fastest" not the fastest."""
    if table.get("schema_version") != SCHEMA_VERSION:
        raise TableError(f"{where}: schema_version must be {SCHEMA_VERSION}, got {table.get('schema_version')!r}")
    classes = table.get("device_classes")
    if not isinstance(classes, dict):
        raise TableError(f"{where}: device_classes must be a mapping of class -> entry")
    for name, entry in classes.items():
        at = f"{where}: device class {name!r}"
        _require_keys(entry, {"device_name", "source", "measurements"}, at)
        _require_keys(entry["source"], _SOURCE_KEYS, f"{at} source", extra_ok=True)
        if not isinstance(entry["measurements"], list):
            raise TableError(f"{at}: measurements must be a list")
        for i, m in enumerate(entry["measurements"]):
            _validate_measurement(m, f"{at} measurement {i}")


def _require_keys(obj, keys: set, at: str, extra_ok: bool = False) -> None:
    if not isinstance(obj, dict):
        raise TableError(f"{at}: must be a mapping, got {type(obj).__name__}")
    missing, extra = keys - set(obj), set(obj) - keys
    if missing:
        raise TableError(f"{at}: missing {sorted(missing)}")
    if extra and not extra_ok:
        raise TableError(f"{at}: unknown fields {sorted(extra)}")


def _validate_measurement(m: dict, at: str) -> None:
    _require_keys({k: v for k, v in m.items() if k != "source"}, _MEASUREMENT_KEYS, at)
    if "source" in m:  # a row kept from an earlier run of the class (write_entry)
        _require_keys(m["source"], _SOURCE_KEYS, f"{at} source", extra_ok=True)
    if m["op"] not in OPS:
        raise TableError(f"{at}: op {m['op']!r} is not one of {OPS}")
    if m["dtype"] not in DTYPES:
        raise TableError(f"{at}: dtype {m['dtype']!r} is not one of {DTYPES}")
    for key in ("tokens", "width"):
        if m[key] is not None and (not isinstance(m[key], int) or m[key] < 1):
            raise TableError(f"{at}: {key} must be a positive int or null, got {m[key]!r}")
    ms = m["ms"]
    if not isinstance(ms, dict) or TRITON not in ms or len(ms) < 2:
        raise TableError(f"{at}: ms must map 'triton' and at least one PyTorch implementation to times")
    for impl, t in ms.items():
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t > 0 or math.isinf(t):
            raise TableError(f"{at}: ms[{impl!r}] must be a positive number, got {t!r}")
    if not isinstance(m["triton_correct"], bool):
        raise TableError(f"{at}: triton_correct must be true or false, got {m['triton_correct']!r}")
    if m["fastest"] != min(ms, key=ms.get):
        raise TableError(f"{at}: fastest is {m['fastest']!r} but the fastest time is {min(ms, key=ms.get)!r}'s")


def measurement(op: str, dtype: str, shape: str, tokens: int | None, width: int | None,
                ms: dict[str, float], triton_correct: bool) -> dict:
    """One table row (what bench/kernels.py writes per op, dtype and shape)."""
    return {"op": op, "dtype": dtype, "shape": shape, "tokens": tokens, "width": width,
            "ms": {k: round(float(v), 6) for k, v in ms.items()}, "triton_correct": bool(triton_correct),
            "fastest": min(ms, key=ms.get)}


def triton_wins(m: dict) -> bool:
    """Triton was correct and faster than every PyTorch implementation measured beside it."""
    return m["triton_correct"] and m["fastest"] == TRITON


def triton_limits(measurements: list[dict]) -> dict[str, dict[tuple[str, int | None], float]]:
    """op -> {(dtype, width): longest sequence Triton runs for} (math.inf for ops without
    lengths). Only (op, dtype, width) where Triton won somewhere appear."""
    groups: dict[tuple, list[dict]] = {}
    for m in measurements:
        groups.setdefault((m["op"], m["dtype"], m["width"]), []).append(m)
    limits: dict[str, dict] = {}
    for (op, dtype, width), rows in groups.items():
        if any(m["tokens"] is None for m in rows):
            limit = math.inf if all(triton_wins(m) for m in rows) else None
        else:
            limit = None
            for tokens in sorted({m["tokens"] for m in rows}):
                if not all(triton_wins(m) for m in rows if m["tokens"] == tokens):
                    break
                limit = tokens
        if limit is not None:
            limits.setdefault(op, {})[(dtype, width)] = limit
    return limits


def write_entry(path: str | Path, device_cls: str, entry: dict) -> dict:
    """Add ``entry`` as ``device_cls``'s in the table at ``path``. An existing entry of the class
    keeps its measurements of other (op, dtype, shape) (a run in another dtype adds to it), each
    tagged with the ``source`` it came from; other classes stay as they are. Validates the
    result before writing. Returns the new table."""
    table = load_table(path)
    old = table["device_classes"].get(device_cls)
    if old is not None:
        new_keys = {(m["op"], m["dtype"], m["shape"]) for m in entry["measurements"]}
        kept = [{**m, "source": m.get("source", old["source"])} for m in old["measurements"]
                if (m["op"], m["dtype"], m["shape"]) not in new_keys]
        entry = {**entry, "measurements": kept + entry["measurements"]}
    table["device_classes"][device_cls] = entry
    validate(table, where=str(path))
    Path(path).write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")
    return table


# ----------------------------------------------------------------------------- dispatch
def _call_key(op: str, args: tuple) -> tuple[str, int | None, int | None]:
    """(dtype, tokens, width) of a call, read as the table's rows record them."""
    x = args[0]
    dtype = str(x.dtype).removeprefix("torch.")
    if op == "attention":  # q: (B, H, N, D)
        return dtype, x.shape[2], x.shape[3]
    if op in ("modulate", "gated_residual"):  # x: (B, N, D)
        return dtype, x.shape[1], x.shape[2]
    return dtype, None, None  # latents (B, C, H, W): the table keys them by dtype only


def measured_op(op: str, triton_fn: Callable, torch_fn: Callable, limits: dict) -> Callable:
    """``op`` choosing per call: Triton where ``limits`` (from ``triton_limits``) covers the
    call's dtype, width and length, PyTorch otherwise."""
    def choose(*args, **kwargs):
        dtype, tokens, width = _call_key(op, args)
        limit = limits.get((dtype, width))
        use_triton = limit is not None and (tokens is None or tokens <= limit)
        return (triton_fn if use_triton else torch_fn)(*args, **kwargs)
    choose.__name__ = choose.__qualname__ = op
    choose.__doc__ = f"{op}: Triton where kernels/auto_table.json measured it correct and fastest, else PyTorch."
    return choose

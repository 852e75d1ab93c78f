"""Image-text pairs from the four source kinds ``crossflow data convert`` reads.

Every source yields, in a deterministic order, either a :class:`RawSample` (the image file's
bytes untouched, its caption, optional JSON metadata) or a :class:`Skipped` (the sample's key and
why it cannot be used: undecodable image, missing or non-text caption...). Writers store
``RawSample`` as they are, so a round trip gives back the very bytes that went in.

Kinds:
    shapes  the synthetic generator (PNG-encoded renders, caption, the scene as metadata)
    folder  a directory of images, each with a caption sidecar ``<stem>.txt`` or ``<stem>.json``
    table   a JSONL or Parquet table of (image path, caption); relative paths are from the table's folder
    wds     WebDataset tars in the img2dataset layout (``<key>.jpg``, ``<key>.txt``, ``<key>.json``):
            a tar, a folder of tars or a glob, local or ``s3://`` (read through s3fs, streamed)
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

import numpy as np
from PIL import Image

from data_pipeline.s3 import check_bucket, is_remote, s3_filesystem
from data_pipeline.shapes import ShapesGenerator

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "gif")
SOURCE_KINDS = ("shapes", "folder", "table", "wds")


@dataclass
class RawSample:
    key: str
    image: bytes  # the encoded image file, byte for byte
    image_ext: str  # png, jpg, ...
    caption: str
    meta: dict = field(default_factory=dict)  # JSON-able metadata (shapes: the scene)


@dataclass
class Skipped:
    key: str
    reason: str


SourceItem = Union[RawSample, Skipped]


def check_image(data: bytes) -> str | None:
    """None when ``data`` decodes fully as an image, else the reason it does not."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises many types for bad files
        return f"corrupt image ({type(e).__name__}: {e})"
    return None


def _caption_reason(caption) -> str | None:
    if caption is None:
        return "no caption"
    if not isinstance(caption, str):
        return f"caption is not text ({type(caption).__name__})"
    if not caption.strip():
        return "empty caption"
    return None


def make_sample(key: str, image: bytes | None, ext: str, caption, meta: dict | None = None) -> SourceItem:
    """A RawSample, or a Skipped saying why the pair cannot be used."""
    if image is None:
        return Skipped(key, "no image")
    reason = _caption_reason(caption) or check_image(image)
    if reason:
        return Skipped(key, reason)
    return RawSample(key, image, ext.lower().lstrip("."), caption, meta or {})


def shapes_source(num_samples: int, resolution: int = 32, max_groups: int = 1, split: str = "train",
                  seed: int = 0) -> Iterator[SourceItem]:
    gen = ShapesGenerator(resolution, max_groups, split, seed)
    for i in range(num_samples):
        s = gen.sample(i)
        buf = io.BytesIO()
        Image.fromarray(s["image"]).save(buf, format="PNG")
        yield RawSample(f"{i:09d}", buf.getvalue(), "png", s["caption"], {"scene": s["scene"].to_dict()})


def _read_sidecar(stem: Path) -> tuple[object, dict]:
    """(caption, meta) from ``<stem>.txt`` or ``<stem>.json`` (keys ``caption`` or ``text``)."""
    txt, js = stem.with_suffix(".txt"), stem.with_suffix(".json")
    if txt.is_file():
        try:
            return txt.read_bytes().decode("utf-8").strip(), {}
        except UnicodeDecodeError:
            return b"", {}  # bytes: reported as "caption is not text"
    if js.is_file():
        try:
            meta = json.loads(js.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None, {}
        if not isinstance(meta, dict):
            return None, {}
        cap = meta.pop("caption", meta.pop("text", None))
        return cap, meta
    return None, {}


def folder_source(root: str | Path) -> Iterator[SourceItem]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder not found: {root}")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)
    for p in images:
        key = str(p.relative_to(root).with_suffix("")).replace("/", "__")
        cap, meta = _read_sidecar(p.with_suffix(""))
        yield make_sample(key, p.read_bytes(), p.suffix, cap, meta)


def _table_rows(path: Path) -> Iterator[dict]:
    if path.suffix == ".jsonl":
        with path.open() as f:
            for n, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        yield {"__error__": f"line {n + 1} is not JSON: {e}"}
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        raise ValueError(f"table source must be .jsonl or .parquet, got {path}")


def table_source(path: str | Path, image_column: str = "image", caption_column: str = "caption") -> Iterator[SourceItem]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"source table not found: {path}")
    for n, row in enumerate(_table_rows(path)):
        key = f"{n:09d}"
        if "__error__" in row:
            yield Skipped(key, row["__error__"])
            continue
        img_path = row.get(image_column)
        if not isinstance(img_path, str):
            yield Skipped(key, f"row has no {image_column!r} path")
            continue
        p = Path(img_path) if Path(img_path).is_absolute() else path.parent / img_path
        if not p.is_file():
            yield Skipped(key, f"image file not found: {p}")
            continue
        meta = {k: v for k, v in row.items() if k not in (image_column, caption_column)
                and isinstance(v, (str, int, float, bool, type(None)))}
        yield make_sample(key, p.read_bytes(), p.suffix, row.get(caption_column), meta)


def _tar_groups(fileobj, name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of a tar in the WebDataset layout (members grouped by key)."""
    key, group = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if not ext:
                continue
            prefix = m.name[: len(m.name) - len(base)] + k
            if prefix != key and key is not None:
                yield key, group
                group = {}
            key = prefix
            group[ext.lower()] = tar.extractfile(m).read()
    if key is not None:
        yield key, group


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _list_s3_tars(url: str) -> list[str]:
    """``s3://`` tar, folder of tars or glob -> sorted ``s3://`` tar URLs (the bucket checked first)."""
    if not url.startswith("s3://"):
        raise ValueError(f"remote tar sources must be s3:// URLs, got {url!r}")
    check_bucket(url)
    fs = s3_filesystem()
    path = url[len("s3://"):].rstrip("/")
    if _is_glob(path):
        found = fs.glob(path)
    elif fs.isfile(path):
        found = [path]
    elif fs.isdir(path):
        found = fs.ls(path, detail=False)
    else:
        found = []
    return sorted(f"s3://{p}" for p in found if p.endswith(".tar"))


def list_tars(spec: str | Path) -> list[str]:
    """A tar, a folder of tars, or a glob (local or ``s3://``) -> sorted tar paths."""
    if is_remote(str(spec)):
        tars = _list_s3_tars(str(spec))
    else:
        p = Path(spec)
        if p.is_dir():
            tars = sorted(str(t) for t in p.glob("*.tar"))
        elif p.is_file():
            tars = [str(p)]
        else:
            tars = sorted(str(t) for t in Path("/").glob(str(p).lstrip("/"))) if _is_glob(str(p)) else []
    if not tars:
        raise FileNotFoundError(f"no .tar shards found at {spec}")
    return tars


def _open_tar(path: str):
    """A binary file object of a local or ``s3://`` tar (read front to back by ``_tar_groups``)."""
    return s3_filesystem().open(path, "rb") if is_remote(path) else open(path, "rb")


def wds_source(spec: str | Path) -> Iterator[SourceItem]:
    for tar_path in list_tars(spec):
        shard = tar_path.rsplit("/", 1)[-1]
        try:
            with _open_tar(tar_path) as f:
                for key, group in _tar_groups(f, tar_path):
                    ext = next((e for e in IMAGE_EXTS if e in group), None)
                    meta = {}
                    if "json" in group:
                        try:
                            meta = json.loads(group["json"])
                        except (json.JSONDecodeError, UnicodeDecodeError):
                            meta = {}
                    cap = group.get("txt")
                    if cap is not None:
                        try:
                            cap = cap.decode("utf-8").strip()
                        except UnicodeDecodeError:
                            pass  # stays bytes: "caption is not text"
                    elif isinstance(meta, dict) and "caption" in meta:
                        cap = meta["caption"]
                    meta = {k: v for k, v in meta.items() if k != "caption"} if isinstance(meta, dict) else {}
                    yield make_sample(f"{Path(shard).stem}__{key.rsplit('/', 1)[-1]}",
                                      group.get(ext) if ext else None, ext or "", cap, meta)
        except tarfile.TarError as e:
            yield Skipped(shard, f"unreadable tar shard {tar_path}: {e} (samples after this point lost)")


def open_source(kind: str, path: str | None = None, *, num_samples: int = 1000, resolution: int = 32,
                max_groups: int = 1, split: str = "train", seed: int = 0, image_column: str = "image",
                caption_column: str = "caption") -> Iterator[SourceItem]:
    """The items of one source kind (see the module docstring)."""
    if kind not in SOURCE_KINDS:
        raise ValueError(f"source must be one of {SOURCE_KINDS}, got {kind!r}")
    if kind == "shapes":
        return shapes_source(num_samples, resolution, max_groups, split, seed)
    if path is None:
        raise ValueError(f"source {kind!r} needs an input path")
    if kind == "folder":
        return folder_source(path)
    if kind == "table":
        return table_source(path, image_column, caption_column)
    return wds_source(path)


def decode_rgb(image: bytes, resolution: int | None = None) -> np.ndarray:
    """Encoded image -> (H, W, 3) uint8, center-cropped and resized to ``resolution`` when given."""
    with Image.open(io.BytesIO(image)) as im:
        im = im.convert("RGB")
        if resolution is not None and im.size != (resolution, resolution):
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((resolution, resolution), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8)

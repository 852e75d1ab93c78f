"""Synthetic captioned shapes: the embedded default dataset.

Each sample is a scene of one or two *groups*; a group is 1-3 identical shapes (circle,
square, triangle) of one color and size, placed in one region of the image (left, right,
top, bottom). Captions come from templates: "two small red squares on the left".

Everything is a pure function of ``(seed, index)``: the same index always gives the same
scene, caption and pixels, so shards, resumption and evaluation can rely on it.

Some (color, shape) pairs are held out of the ``train`` split; the ``heldout`` split always
contains at least one of them, to test composition of attributes never seen together.

Each scene also has a metric depth map (the depth task's target): the black background is a
ground plane seen from a camera above it (far at the top row, near at the bottom row) and each
shape is a flat cut-out standing on the ground at the row of its bottom edge, so a shape's depth
can be read from where it stands. It comes from the same layout as the pixels, with no random
draw of its own: images, captions and layouts are exactly what they were before depth existed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import re

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 240),
    "yellow": (240, 220, 20),
    "purple": (170, 40, 220),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
HELDOUT_PAIRS = frozenset({("blue", "triangle"), ("yellow", "circle"), ("green", "square")})
SPLITS = ("train", "heldout", "all")

_COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_POSITION_PHRASES = {"left": "on the left", "right": "on the right",
                     "top": "at the top", "bottom": "at the bottom"}
_TEMPLATES = ("{groups}", "{groups}", "there is {groups}", "an image of {groups}")
# Side of a shape's bounding box as a fraction of the image side.
_SIZE_FRACTION = {"small": 0.2, "large": 0.28}
BACKGROUND = (0, 0, 0)
# Depth of the ground plane at the bottom and the top row of the image, in meters.
DEPTH_NEAR = 1.0
DEPTH_FAR = 10.0


@dataclass(frozen=True)
class ShapeGroup:
    """``count`` identical shapes of one color and size in one region of the image."""
    shape: str
    color: str
    size: str
    count: int
    position: str

    def phrase(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{_COUNT_WORDS[self.count]} {self.size} {self.color} {noun} {_POSITION_PHRASES[self.position]}"


@dataclass(frozen=True)
class Scene:
    groups: tuple[ShapeGroup, ...]

    def to_dict(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups]}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(tuple(ShapeGroup(**g) for g in d["groups"]))

    def is_heldout(self) -> bool:
        return any((g.color, g.shape) in HELDOUT_PAIRS for g in self.groups)


def caption(scene: Scene, template: int = 0) -> str:
    """The scene's caption; ``template`` picks one of a few phrasings of the same content."""
    groups = " and ".join(g.phrase() for g in scene.groups)
    return _TEMPLATES[template % len(_TEMPLATES)].format(groups=groups)


def phrasings(scene: Scene) -> list[str]:
    """Every distinct caption of the scene, one per distinct template (BLEU's references)."""
    return list(dict.fromkeys(caption(scene, t) for t in range(len(_TEMPLATES))))


_WORD_COUNTS = {w: n for n, w in _COUNT_WORDS.items()}
_PHRASE_POSITIONS = {p: pos for pos, p in _POSITION_PHRASES.items()}
_GROUP_RE = re.compile(
    rf"({'|'.join(_WORD_COUNTS)}) ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})(s?) "
    rf"({'|'.join(_PHRASE_POSITIONS)})")
_PREFIXES = tuple(sorted({t.replace("{groups}", "") for t in _TEMPLATES}, key=len, reverse=True))


def _parse_group(text: str) -> ShapeGroup | None:
    m = _GROUP_RE.fullmatch(text)
    if m is None:
        return None
    count_word, size, color, shape, plural, position_phrase = m.groups()
    count = _WORD_COUNTS[count_word]
    if (count > 1) != bool(plural):  # "two red circle" / "a red circles" are not captions
        return None
    return ShapeGroup(shape=shape, color=color, size=size, count=count, position=_PHRASE_POSITIONS[position_phrase])


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, the inverse of :func:`caption` for every template and one or
    two groups (case and runs of whitespace ignored); None when ``text`` is not such a caption."""
    text = " ".join(text.lower().split())
    prefix = next(p for p in _PREFIXES if text.startswith(p))  # "" always matches
    parts = text[len(prefix):].split(" and ")
    if not 1 <= len(parts) <= 2:
        return None
    groups = tuple(_parse_group(part) for part in parts)
    return None if None in groups else Scene(groups)


def _region(position: str, res: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the half of the image a position names."""
    half = res // 2
    return {"left": (0, 0, half, res), "right": (half, 0, res, res),
            "top": (0, 0, res, half), "bottom": (0, half, res, res)}[position]


def shape_side(size: str, res: int) -> int:
    return max(3, round(_SIZE_FRACTION[size] * res))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int],
                rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box  # inclusive corners
    if shape == "square":
        draw.rectangle(box, fill=rgb)
    elif shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def layout(scene: Scene, res: int, rng: np.random.Generator | None = None) -> list[tuple[ShapeGroup, tuple[int, int, int, int]]]:
    """Bounding boxes (inclusive) of every shape: the group's region is cut into ``count``
    slots along its long axis and each shape sits in its own slot with a small jitter,
    so shapes never overlap or leave their region."""
    boxes = []
    for g in scene.groups:
        x0, y0, x1, y1 = _region(g.position, res)
        side = shape_side(g.size, res)
        vertical = (y1 - y0) > (x1 - x0)  # left/right halves are tall: stack shapes vertically
        long0, long1 = (y0, y1) if vertical else (x0, x1)
        short0, short1 = (x0, x1) if vertical else (y0, y1)
        slot = (long1 - long0) / g.count
        for i in range(g.count):
            lo = long0 + i * slot
            free_long = max(0.0, slot - side - 1)
            free_short = max(0.0, (short1 - short0) - side - 1)
            jl, js = (rng.random(2) if rng is not None else (0.5, 0.5))
            a = int(round(lo + jl * free_long))
            b = int(round(short0 + js * free_short))
            bx, by = (b, a) if vertical else (a, b)
            boxes.append((g, (bx, by, bx + side - 1, by + side - 1)))
    return boxes


def _paint(boxes: list[tuple[ShapeGroup, tuple[int, int, int, int]]], res: int) -> np.ndarray:
    img = Image.new("RGB", (res, res), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for g, box in boxes:
        _draw_shape(draw, g.shape, box, COLORS[g.color])
    return np.asarray(img, dtype=np.uint8).copy()  # (res, res, 3)


def ground_depth(res: int) -> np.ndarray:
    """(res,) depth in meters of the ground plane at each row's center, DEPTH_FAR at the top edge to
    DEPTH_NEAR at the bottom edge. A pinhole camera looking at a plane sees inverse depth change
    linearly with the image row, so that is what interpolates linearly."""
    rows = (np.arange(res, dtype=np.float64) + 0.5) / res  # 0 at the top edge, 1 at the bottom edge
    inverse = 1.0 / DEPTH_FAR + rows * (1.0 / DEPTH_NEAR - 1.0 / DEPTH_FAR)
    return (1.0 / inverse).astype(np.float32)


def _depth(boxes: list[tuple[ShapeGroup, tuple[int, int, int, int]]], res: int) -> np.ndarray:
    ground = ground_depth(res)  # (res,)
    img = Image.fromarray(np.repeat(ground[:, None], res, axis=1))  # (res, res) float32: mode "F"
    draw = ImageDraw.Draw(img)
    for g, box in boxes:  # shapes never overlap: no occlusion order needed
        _draw_shape(draw, g.shape, box, float(ground[box[3]]))  # standing on the ground at its bottom row
    return np.asarray(img, dtype=np.float32).copy()  # (res, res)


def render(scene: Scene, res: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw the scene on a black background: (res, res, 3) uint8, crisp edges (no anti-aliasing,
    so every shape pixel has exactly its palette color)."""
    return _paint(layout(scene, res, rng), res)


def render_depth(scene: Scene, res: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene's metric depth map (res, res) float32 in meters, over the same pixels :func:`render`
    draws from the same ``rng`` state: the ground plane (:func:`ground_depth`) and each shape at the
    ground's depth at its bottom row."""
    return _depth(layout(scene, res, rng), res)


class ShapesGenerator:
    """Deterministic captioned scenes: ``sample(i)`` depends only on (seed, split, i).

    Args:
        resolution: image side in pixels (32 or 64 are the intended sizes).
        max_groups: 1 for single-group scenes, 2 to also draw "X on the left and Y on the right".
        split: ``train`` (no held-out color-shape pair), ``heldout`` (at least one), or ``all``.
        seed: changes every scene.
    """

    def __init__(self, resolution: int = 32, max_groups: int = 1, split: str = "train", seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if max_groups not in (1, 2):
            raise ValueError(f"max_groups must be 1 or 2, got {max_groups}")
        if resolution < 16:
            raise ValueError(f"resolution must be at least 16 pixels, got {resolution}")
        self.resolution, self.max_groups, self.split, self.seed = resolution, max_groups, split, seed
        self._split_id = SPLITS.index(split)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self._split_id, index])

    def _random_group(self, rng: np.random.Generator, position: str) -> ShapeGroup:
        return ShapeGroup(shape=SHAPES[rng.integers(len(SHAPES))],
                          color=list(COLORS)[rng.integers(len(COLORS))],
                          size=SIZES[rng.integers(len(SIZES))],
                          count=int(rng.integers(1, 4)),
                          position=position)

    def scene(self, index: int) -> Scene:
        rng = self._rng(index)
        while True:  # rejection sampling: a few draws at most (3 of 15 pairs are held out)
            n_groups = int(rng.integers(1, self.max_groups + 1))
            first = POSITIONS[rng.integers(len(POSITIONS))]
            positions = [first, OPPOSITE[first]][:n_groups]
            scene = Scene(tuple(self._random_group(rng, p) for p in positions))
            if self.split == "all" or scene.is_heldout() == (self.split == "heldout"):
                return scene

    def _layout_rng(self, index: int) -> np.random.Generator:
        """Sample ``index``'s second stream: its caption template, then its shapes' jitter."""
        return np.random.default_rng([self.seed, self._split_id, index, 1])

    def sample(self, index: int) -> dict:
        """{"image": (H, W, 3) uint8, "depth": (H, W) float32 meters, "caption": str, "scene": Scene}
        for scene ``index``."""
        scene = self.scene(index)
        rng = self._layout_rng(index)
        template = int(rng.integers(len(_TEMPLATES)))
        boxes = layout(scene, self.resolution, rng)  # the last draws: depth shares them with the pixels
        return {"image": _paint(boxes, self.resolution), "depth": _depth(boxes, self.resolution),
                "caption": caption(scene, template), "scene": scene}

    def fingerprint(self, index: int) -> tuple:
        """What sample ``index`` is, without drawing it: its caption and each shape's (shape, color,
        box). Equal fingerprints = the same caption and pixels (shapes never overlap, so drawing
        order does not matter); about 60 us, against 100 us for ``sample``."""
        scene = self.scene(index)
        rng = self._layout_rng(index)  # the same draws, in the same order, as ``sample``
        template = int(rng.integers(len(_TEMPLATES)))
        shapes = sorted((g.shape, g.color, box) for g, box in layout(scene, self.resolution, rng))
        return caption(scene, template), tuple(shapes)

    def captions(self, n: int) -> list[str]:
        """Captions of scenes 0..n-1 without rendering (cheap: for precomputing text features)."""
        out = []
        for i in range(n):
            out.append(caption(self.scene(i), int(self._layout_rng(i).integers(len(_TEMPLATES)))))
        return out

    def __iter__(self) -> Iterator[dict]:
        i = 0
        while True:
            yield self.sample(i)
            i += 1


def image_to_tensor_array(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]: the pixel-space model target."""
    return image.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def tensor_array_to_image(x: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [-1, 1] -> (H, W, 3) uint8."""
    return np.clip((x.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def depth_to_tensor_array(depth: np.ndarray) -> np.ndarray:
    """(H, W) meters -> (1, H, W) float32 in [-1, 1]: the depth task's model target, linear in log depth
    (DEPTH_NEAR -> -1, DEPTH_FAR -> 1), so an error of the model costs the same relative error at
    every distance (what AbsRel measures). Depths outside the range are clamped into it."""
    log_depth = np.log(np.clip(np.asarray(depth, dtype=np.float32), DEPTH_NEAR, DEPTH_FAR))  # (H, W)
    x = 2.0 * (log_depth - np.log(DEPTH_NEAR)) / (np.log(DEPTH_FAR) - np.log(DEPTH_NEAR)) - 1.0
    return x[None].astype(np.float32)  # (1, H, W)


def tensor_array_to_depth(x: np.ndarray) -> np.ndarray:
    """(1, H, W) or (H, W) float in [-1, 1] -> (H, W) float32 meters in [DEPTH_NEAR, DEPTH_FAR]
    (values outside [-1, 1] are clamped first): the inverse of :func:`depth_to_tensor_array`."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        if x.shape[0] != 1:
            raise ValueError(f"a depth map is (1, H, W) or (H, W), got shape {x.shape}")
        x = x[0]
    if x.ndim != 2:
        raise ValueError(f"a depth map is (1, H, W) or (H, W), got shape {x.shape}")
    log_depth = np.log(DEPTH_NEAR) + (np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * (np.log(DEPTH_FAR) - np.log(DEPTH_NEAR))
    return np.exp(log_depth).astype(np.float32)  # (H, W)

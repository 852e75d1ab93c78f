"""Synthetic captioned shapes: the embedded default dataset.

Each sample is a scene of one or two *groups*; a group is 1-3 identical shapes (circle,
square, triangle) of one color and size, placed in one region of the image (left, right,
top, bottom). Captions come from templates: "two small red squares on the left".

Everything is a pure function of ``(seed, index)``: the same index always gives the same
scene, caption and pixels, so shards, resumption and evaluation can rely on it.

Some (color, shape) pairs are held out of the ``train`` split; the ``heldout`` split always
contains at least one of them, to test composition of attributes never seen together.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

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


def render(scene: Scene, res: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw the scene on a black background: (res, res, 3) uint8, crisp edges (no anti-aliasing,
    so every shape pixel has exactly its palette color)."""
    img = Image.new("RGB", (res, res), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for g, box in layout(scene, res, rng):
        _draw_shape(draw, g.shape, box, COLORS[g.color])
    return np.asarray(img, dtype=np.uint8).copy()


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
        """{"image": (H, W, 3) uint8, "caption": str, "scene": Scene} for scene ``index``."""
        scene = self.scene(index)
        rng = self._layout_rng(index)
        template = int(rng.integers(len(_TEMPLATES)))
        return {"image": render(scene, self.resolution, rng), "caption": caption(scene, template),
                "scene": scene}

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

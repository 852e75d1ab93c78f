"""ShapesEval: a deterministic, CPU-only compositional benchmark for the synthetic shapes domain.

In the spirit of GenEval (object, counting, colors, position), but the "detector" is a pixel
analyzer, not a learned model, so the score is exactly reproducible and explainable:

1. **Color segmentation.** Each pixel goes to the nearest of {background (black), the palette
   colors of ``data_pipeline.shapes.COLORS``}. A pixel nearer to a palette color than to black
   but farther than ``color_tolerance`` from every palette color is ``"unknown"`` (a bright,
   off-palette color). Nearest-to-black is a half-intensity threshold, so blurry edges and faint
   blobs fall to the background and a blurred shape keeps roughly its true outline.
2. **Connected components** (4-connected, one color at a time). Components smaller than
   ``min_area_fraction`` of a small shape's bounding box are ignored (specks, noise).
3. **Touching shapes.** Every shape the generator draws has a square bounding box, and the
   shapes of a group are identical and stacked along one axis, so a component whose bounding box
   is elongated (aspect >= 1.5) is ``round(aspect)`` touching shapes: it is cut into that many
   equal slices along its long axis and each slice is analyzed on its own.
4. **Shape** from two features of the object's mask in its bounding box (h x w):
   ``balance``, the centroid's height as a fraction of h (0.5 for circles and squares, about 2/3
   for the generator's apex-up triangles), and ``fill``, the area over h*w (1 for a square, about
   pi/4 for a circle, about 1/2 for a triangle). Triangle if ``balance >= triangle_balance``,
   else square if ``fill >= square_fill``, else circle. Both features survive blur better than
   corner pixels or template IoU do (measured on Gaussian-blurred renders, sigma 0.8 px at 32 px:
   0.89 shape accuracy against 0.83 for best-IoU templates; both ~1.0 on crisp images). At 32 px
   a small shape is 6 px wide, so shape is the least reliable attribute: it only enters ``object``.
5. **Size** by the side the object would have if it were its shape at nominal fill,
   sqrt(area / fill_of_shape), against the geometric mean of the small and large sides the
   generator draws at this resolution (blur shaves corners and apexes, so the bounding box alone
   under-reads blurred triangles).
6. **Position** by the centroid: left/right of the vertical midline, top/bottom of the horizontal.

Tasks per prompt (each group ``g`` of the scene; "objects of g" are the detected objects of
g's color, restricted to g's half of the image when another group shares that color):

- ``object``: some object of g has g's color and shape.
- ``count``: the number of objects of g's color equals the count the prompt asks for
  (summed over groups sharing the color). Independent of shape and position.
- ``color``: every requested color is present and there is no object of any other color
  (palette or ``unknown``).
- ``position``: every object of g's color has its centroid in the half of a group of that color,
  and g's half holds at least one of them. Independent of shape.
- ``size``: g has objects and all of them have g's size (captions name the size).
- ``overall``: all of the above.

Scores: per task, the fraction of images that pass it; ``overall`` likewise; plus ``overall``
on the held-out color-shape pairs and on the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from data_pipeline.shapes import (COLORS, POSITIONS, SHAPES, SIZES, Scene, ShapeGroup,
                                  caption, render, shape_side)

TASKS = ("object", "count", "color", "position", "size")
UNKNOWN_COLOR = "unknown"

_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # (K, 3)
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class AnalyzerConfig:
    """Thresholds of the pixel analyzer; the defaults are what the tests and reports use."""
    color_tolerance: float = 100.0
    """Max RGB distance from a palette color for a pixel to take that color (else ``unknown``)."""
    min_area_fraction: float = 0.3
    """Components smaller than this fraction of a small shape's bounding box (side^2) are ignored."""
    split_aspect: float = 1.5
    """A component whose bounding box is at least this elongated is cut into round(aspect) shapes."""
    max_split: int = 3
    """At most this many touching shapes are read from one component (a group has 1-3 shapes)."""
    triangle_balance: float = 0.57
    """Centroid height / box height at or above which an object is a triangle (apex up)."""
    square_fill: float = 0.84
    """Area / box area at or above which a non-triangle is a square (else a circle)."""


@dataclass(frozen=True)
class Detected:
    """One object found in an image. ``bbox`` is (x0, y0, x1, y1), inclusive, in pixels."""
    color: str
    shape: str
    size: str
    area: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]  # (x, y), pixel centers at integer + 0.5
    fill: float  # area / bounding-box area
    balance: float  # centroid height / bounding-box height (0 top, 1 bottom)
    from_split: bool = False  # cut out of a component of touching shapes

    def in_half(self, position: str, resolution: int) -> bool:
        x, y = self.centroid
        half = resolution / 2
        return {"left": x < half, "right": x >= half, "top": y < half, "bottom": y >= half}[position]


# ----------------------------------------------------------------------------------------------
# Pixel analyzer


def segment_colors(image: np.ndarray, config: AnalyzerConfig = AnalyzerConfig()) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int labels: -1 background, 0..K-1 palette index, K unknown.

    Each palette color is a ray ``a * rgb`` (a = brightness): a pixel is matched to the ray it is
    closest to, so a dimmed or blurred edge keeps its hue. It is background when it is less than half
    as bright as that color (nearer to black than to the color), ``unknown`` when it is farther than
    ``color_tolerance`` from every ray."""
    pix = image.astype(np.float32)  # (H, W, 3)
    sq_norm = (_PALETTE ** 2).sum(-1)  # (K,)
    brightness = np.clip(pix @ _PALETTE.T / sq_norm, 0.0, None)  # (H, W, K): best a per color
    residual = np.linalg.norm(pix[:, :, None, :] - brightness[..., None] * _PALETTE, axis=-1)  # (H, W, K)
    nearest = residual.argmin(-1)  # (H, W)
    labels = np.where(np.take_along_axis(residual, nearest[..., None], -1)[..., 0] <= config.color_tolerance,
                      nearest, len(_PALETTE_NAMES))
    dim = np.take_along_axis(brightness, nearest[..., None], -1)[..., 0] < 0.5  # (H, W)
    return np.where(dim, -1, labels)


_NOMINAL_FILL = {"square": 1.0, "circle": float(np.pi / 4), "triangle": 0.55}


def shape_features(mask: np.ndarray) -> tuple[float, float]:
    """(fill, balance) of a binary mask cropped to its bounding box (see the module docstring)."""
    h, w = mask.shape
    ys, _ = np.nonzero(mask)
    return float(mask.sum() / (h * w)), float((ys.mean() + 0.5) / h)


def classify_shape(mask: np.ndarray, config: AnalyzerConfig = AnalyzerConfig()) -> str:
    """The shape of a binary mask cropped to its bounding box."""
    fill, balance = shape_features(mask)
    if balance >= config.triangle_balance:
        return "triangle"
    return "square" if fill >= config.square_fill else "circle"


def _crop(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1], int(xs.min()), int(ys.min())


def _split_touching(mask: np.ndarray, config: AnalyzerConfig) -> list[tuple[np.ndarray, int, int]]:
    """A tight (h, w) mask -> [(sub_mask, dx, dy)]: one piece, or equal slices along the long axis."""
    h, w = mask.shape
    aspect = max(h, w) / min(h, w)
    if aspect < config.split_aspect:
        return [(mask, 0, 0)]
    n = int(min(config.max_split, round(aspect)))
    pieces = []
    long_side = max(h, w)
    cuts = np.round(np.linspace(0, long_side, n + 1)).astype(int)
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece = mask[a:b, :] if h > w else mask[:, a:b]
        if not piece.any():
            continue
        sub, dx, dy = _crop(piece)
        pieces.append((sub, dx, dy + a) if h > w else (sub, dx + a, dy))
    return pieces


def analyze(image: np.ndarray, config: AnalyzerConfig = AnalyzerConfig()) -> list[Detected]:
    """Every object in an (H, W, 3) uint8 image (square, H = W = the generator's resolution)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {image.shape} dtype {image.dtype}")
    res = image.shape[0]
    small, large = shape_side("small", res), shape_side("large", res)
    size_threshold = (small * large) ** 0.5
    min_area = config.min_area_fraction * small * small
    labels = segment_colors(image, config)  # (H, W)
    found = []
    for k, color in enumerate(_PALETTE_NAMES + (UNKNOWN_COLOR,)):
        components, n = ndimage.label(labels == k, structure=_FOUR_CONNECTED)
        for i, slc in enumerate(ndimage.find_objects(components), start=1):
            comp = components[slc] == i  # tight (h, w) mask of this component
            if comp.sum() < min_area:
                continue
            pieces = _split_touching(comp, config)
            for sub, dx, dy in pieces:
                x0, y0 = slc[1].start + dx, slc[0].start + dy
                h, w = sub.shape
                ys, xs = np.nonzero(sub)
                fill, balance = shape_features(sub)
                shape = classify_shape(sub, config)
                side = (sub.sum() / _NOMINAL_FILL[shape]) ** 0.5
                found.append(Detected(
                    color=color, shape=shape, size="small" if side < size_threshold else "large",
                    area=int(sub.sum()), bbox=(x0, y0, x0 + w - 1, y0 + h - 1),
                    centroid=(float(x0 + xs.mean() + 0.5), float(y0 + ys.mean() + 0.5)),
                    fill=fill, balance=balance, from_split=len(pieces) > 1))
    return found


# ----------------------------------------------------------------------------------------------
# Scoring one image against one prompt


def score_detections(found: Sequence[Detected], scene: Scene, resolution: int) -> dict[str, bool]:
    """{task: passed} for the objects ``found`` in an image of side ``resolution``."""
    groups = scene.groups
    requested = {g.color for g in groups}

    def members(g: ShapeGroup) -> list[Detected]:
        same_color = [d for d in found if d.color == g.color]
        if sum(h.color == g.color for h in groups) > 1:  # another group shares the color: use g's half
            same_color = [d for d in same_color if d.in_half(g.position, resolution)]
        return same_color

    def position_ok(g: ShapeGroup) -> bool:
        halves = [h.position for h in groups if h.color == g.color]
        same_color = [d for d in found if d.color == g.color]
        return (any(d.in_half(g.position, resolution) for d in same_color)
                and all(any(d.in_half(p, resolution) for p in halves) for d in same_color))

    result = {
        "object": all(any(d.shape == g.shape for d in members(g)) for g in groups),
        "count": all(sum(d.color == g.color for d in found) == sum(h.count for h in groups if h.color == g.color)
                     for g in groups),
        "color": requested <= {d.color for d in found} and all(d.color in requested for d in found),
        "position": all(position_ok(g) for g in groups),
        "size": all(members(g) and all(d.size == g.size for d in members(g)) for g in groups),
    }
    result["overall"] = all(result[t] for t in TASKS)
    return result


def score_image(image: np.ndarray, scene: Scene, config: AnalyzerConfig = AnalyzerConfig()) -> dict[str, bool]:
    """{task: passed} for ``TASKS`` and ``overall``: does the image show what ``scene`` asks for?"""
    return score_detections(analyze(image, config), scene, image.shape[0])


# ----------------------------------------------------------------------------------------------
# The prompt suite


@dataclass(frozen=True)
class EvalPrompt:
    scene: Scene
    caption: str
    heldout: bool  # holds a (color, shape) pair never seen in the train split


def _prompt(groups: tuple[ShapeGroup, ...]) -> EvalPrompt:
    scene = Scene(groups)
    return EvalPrompt(scene, caption(scene, 0), scene.is_heldout())


def prompt_suite(max_groups: int = 1) -> list[EvalPrompt]:
    """The fixed ShapesEval prompts: every (color, shape) pair (held-out ones included, flagged)
    at every position, with count and size cycling so that every count x size appears with every
    color and position: 60 single-group prompts. ``max_groups=2`` adds 30 two-group prompts
    (two different colors in opposite halves), for models trained on two-group scenes."""
    if max_groups not in (1, 2):
        raise ValueError(f"max_groups must be 1 or 2, got {max_groups}")
    pairs = [(c, s) for c in COLORS for s in SHAPES]  # 15, 3 of them held out
    prompts = []
    for p, (color, shape) in enumerate(pairs):
        for q, position in enumerate(POSITIONS):
            i = 4 * p + q
            prompts.append(_prompt((ShapeGroup(shape, color, SIZES[(i // 3) % 2], 1 + i % 3, position),)))
    if max_groups == 2:
        opposite = (("left", "right"), ("top", "bottom"), ("right", "left"), ("bottom", "top"))
        for i in range(30):
            (c1, s1), (c2, s2) = pairs[i % 15], pairs[(i * 7 + 4) % 15]
            if c2 == c1:
                c2 = _PALETTE_NAMES[(_PALETTE_NAMES.index(c1) + 1 + i % 4) % len(_PALETTE_NAMES)]
            p1, p2 = opposite[i % 4]
            prompts.append(_prompt((ShapeGroup(s1, c1, SIZES[i % 2], 1 + i % 3, p1),
                                    ShapeGroup(s2, c2, SIZES[(i // 2) % 2], 1 + (i // 3) % 3, p2))))
    return prompts


def render_suite(prompts: Sequence[EvalPrompt | Scene], resolution: int, images_per_prompt: int = 4,
                 seed: int = 0) -> list[list[np.ndarray]]:
    """The generator's own renderings of each prompt (random layouts): the analyzer's ceiling."""
    out = []
    for j, prompt in enumerate(prompts):
        scene = prompt.scene if isinstance(prompt, EvalPrompt) else prompt
        rngs = [np.random.default_rng([seed, j, k]) for k in range(images_per_prompt)]
        out.append([render(scene, resolution, rng) for rng in rngs])
    return out


# ----------------------------------------------------------------------------------------------
# Evaluating a set of images


@dataclass
class PromptResult:
    prompt: EvalPrompt
    scores: list[dict[str, bool]]  # one per image

    def rate(self, task: str) -> float:
        return float(np.mean([s[task] for s in self.scores])) if self.scores else 0.0


@dataclass
class ShapesEvalReport:
    results: list[PromptResult]

    def summary(self) -> dict[str, float]:
        """Fraction of images passing each task and all of them (``overall``), over all prompts;
        ``overall_heldout`` / ``overall_seen`` split by held-out color-shape pairs."""
        every = [s for r in self.results for s in r.scores]
        out = {t: float(np.mean([s[t] for s in every])) if every else 0.0 for t in TASKS + ("overall",)}
        for name, flag in (("overall_heldout", True), ("overall_seen", False)):
            subset = [s["overall"] for r in self.results if r.prompt.heldout == flag for s in r.scores]
            out[name] = float(np.mean(subset)) if subset else float("nan")
        out["n_prompts"], out["n_images"] = len(self.results), len(every)
        return out

    def table(self) -> str:
        """A per-prompt table: pass rate per task and overall; ``*`` marks held-out prompts."""
        width = max([len(r.prompt.caption) for r in self.results] + [6])
        names = TASKS + ("overall",)
        head = f"{'prompt':<{width}} H {'n':>4} " + " ".join(f"{t:>8}" for t in names)
        lines = [head, "-" * len(head)]
        for r in self.results:
            cells = " ".join(f"{r.rate(t):8.2f}" for t in names)
            lines.append(f"{r.prompt.caption:<{width}} {'*' if r.prompt.heldout else ' '} {len(r.scores):>4} {cells}")
        s = self.summary()
        lines.append("-" * len(head))
        lines.append(f"{'all':<{width}}   {s['n_images']:>4} " + " ".join(f"{s[t]:8.2f}" for t in names))
        lines.append(f"overall on held-out pairs {s['overall_heldout']:.3f}, on seen pairs {s['overall_seen']:.3f}")
        return "\n".join(lines)


def evaluate(images_per_prompt: Sequence[Sequence[np.ndarray]], prompts: Sequence[EvalPrompt | Scene],
             config: AnalyzerConfig = AnalyzerConfig()) -> ShapesEvalReport:
    """Score ``images_per_prompt[j]`` (each an (H, W, 3) uint8 image) against ``prompts[j]``."""
    if len(images_per_prompt) != len(prompts):
        raise ValueError(f"{len(images_per_prompt)} image lists for {len(prompts)} prompts")
    results = []
    for images, prompt in zip(images_per_prompt, prompts):
        if isinstance(prompt, Scene):
            prompt = EvalPrompt(prompt, caption(prompt, 0), prompt.is_heldout())
        results.append(PromptResult(prompt, [score_image(np.asarray(im), prompt.scene, config) for im in images]))
    return ShapesEvalReport(results)

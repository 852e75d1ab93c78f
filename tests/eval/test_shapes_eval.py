"""ShapesEval's analyzer: near-perfect on the generator's own images, near zero on noise and on
the wrong prompt, and correct on hand-built cases (touching shapes, positions, one wrong attribute)."""
import dataclasses

import numpy as np
import pytest

from data_pipeline.shapes import COLORS, HELDOUT_PAIRS, OPPOSITE, POSITIONS, SHAPES, SIZES, Scene, ShapeGroup, ShapesGenerator, render
from trainer.eval.shapes_eval import (TASKS, analyze, evaluate, prompt_suite, render_suite, score_image)

N = 120  # images per (resolution, split, max_groups): ~1-3 ms each


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("split", ["train", "heldout", "all"])
@pytest.mark.parametrize("max_groups", [1, 2])
def test_generator_images_score_high(resolution, split, max_groups):
    gen = ShapesGenerator(resolution, max_groups, split, seed=7)
    samples = [gen.sample(i) for i in range(N)]
    report = evaluate([[s["image"]] for s in samples], [s["scene"] for s in samples])
    summary = report.summary()
    assert summary["overall"] >= 0.95, report.table()
    assert all(summary[t] >= 0.95 for t in TASKS)


@pytest.mark.parametrize("resolution", [32, 64])
def test_noise_scores_near_zero(resolution):
    rng = np.random.default_rng(0)
    gen = ShapesGenerator(resolution, 2, "all", seed=1)
    scenes = [gen.scene(i) for i in range(N)]
    uniform = [[rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)] for _ in scenes]
    assert evaluate(uniform, scenes).summary()["overall"] <= 0.1
    # Blocky color noise: 4x4-pixel patches of random palette-ish colors (large blobs everywhere).
    blocks = [[np.kron(rng.integers(0, 256, (resolution // 4, resolution // 4, 3)),
                       np.ones((4, 4, 1))).astype(np.uint8)] for _ in scenes]
    assert evaluate(blocks, scenes).summary()["overall"] <= 0.1


@pytest.mark.parametrize("resolution", [32, 64])
def test_wrong_prompt_scores_near_zero(resolution):
    gen = ShapesGenerator(resolution, 2, "all", seed=2)
    images, wrong = [], []
    for i in range(N):
        image, j = gen.sample(i)["image"], N + i
        while gen.scene(j) == gen.scene(i):
            j += 1
        images.append([image])
        wrong.append(gen.scene(j))
    assert evaluate(images, wrong).summary()["overall"] <= 0.1


def test_prompt_suite_covers_every_attribute():
    for max_groups, n in ((1, 60), (2, 90)):
        suite = prompt_suite(max_groups)
        assert len(suite) == n
        groups = [g for p in suite for g in p.scene.groups]
        assert {g.color for g in groups} == set(COLORS)
        assert {g.shape for g in groups} == set(SHAPES)
        assert {g.size for g in groups} == set(SIZES)
        assert {g.count for g in groups} == {1, 2, 3}
        assert {g.position for g in groups} == set(POSITIONS)
        assert {(g.color, g.shape) for g in groups} >= HELDOUT_PAIRS
        assert all(p.heldout == p.scene.is_heldout() for p in suite)
        assert any(p.heldout for p in suite) and not all(p.heldout for p in suite)
        assert all(len({g.color for g in p.scene.groups}) == len(p.scene.groups) for p in suite)
    assert prompt_suite(1) == prompt_suite(1)  # fixed


def test_report_summary_and_table():
    suite = prompt_suite(1)[:6]
    images = render_suite(suite, 32, images_per_prompt=2)
    images[0][1] = np.zeros_like(images[0][1])  # one blank image fails everything
    report = evaluate(images, suite)
    s = report.summary()
    assert s["n_prompts"] == 6 and s["n_images"] == 12
    assert s["overall"] == pytest.approx(11 / 12)
    table = report.table()
    assert suite[0].caption in table and "0.50" in table and "overall" in table
    with pytest.raises(ValueError):
        evaluate(images[:2], suite)


# ---- components -------------------------------------------------------------------------------

RED, BLUE = COLORS["red"], COLORS["blue"]


def _canvas(res=32):
    return np.zeros((res, res, 3), np.uint8)


def test_separate_and_touching_squares_are_counted():
    img = _canvas()
    img[4:10, 4:10] = RED
    img[4:10, 12:18] = RED  # 2 px apart: two components
    assert [d.color for d in analyze(img)] == ["red", "red"]
    touching = _canvas()
    touching[4:10, 4:16] = RED  # two 6x6 squares side by side: one 6x12 component
    found = analyze(touching)
    assert len(found) == 2 and all(d.from_split and d.shape == "square" and d.size == "small" for d in found)
    three = _canvas()
    three[2:29, 3:12] = BLUE  # three 9x9 squares stacked with no gap
    assert [(d.color, d.size) for d in analyze(three)] == [("blue", "large")] * 3


def test_specks_and_dim_pixels_are_ignored():
    img = _canvas()
    img[3:5, 3:5] = RED  # 4 px: below the minimum area
    img[20:26, 20:26] = (np.array(BLUE) * 0.4).astype(np.uint8)  # under half brightness: background
    assert analyze(img) == []
    img[20:26, 20:26] = (np.array(BLUE) * 0.7).astype(np.uint8)  # dimmer but still blue
    assert [d.color for d in analyze(img)] == ["blue"]


def test_off_palette_blob_is_unknown_and_fails_color():
    img = render(Scene((ShapeGroup("square", "red", "small", 1, "left"),)), 32)
    img[20:28, 20:28] = (255, 255, 255)
    found = analyze(img)
    assert sorted(d.color for d in found) == ["red", "unknown"]
    scores = score_image(img, Scene((ShapeGroup("square", "red", "small", 1, "left"),)))
    assert not scores["color"] and scores["object"] and scores["position"]


@pytest.mark.parametrize("position", POSITIONS)
def test_positions(position):
    scene = Scene((ShapeGroup("circle", "green", "large", 2, position),))
    img = render(scene, 64, np.random.default_rng(0))
    axis = 0 if position in ("left", "right") else 1  # centroid x for left/right, y for top/bottom
    assert all((d.centroid[axis] < 32) == (position in ("left", "top")) for d in analyze(img))
    assert score_image(img, scene)["position"]
    flipped = Scene((dataclasses.replace(scene.groups[0], position=OPPOSITE[position]),))
    assert not score_image(img, flipped)["position"]


@pytest.mark.parametrize("resolution", [32, 64])
def test_each_wrong_attribute_fails_its_task(resolution):
    scene = Scene((ShapeGroup("triangle", "yellow", "large", 2, "top"),))
    img = render(scene, resolution, np.random.default_rng(3))
    assert all(score_image(img, scene).values())
    g = scene.groups[0]
    cases = {"shape": (dataclasses.replace(g, shape="circle"), {"object"}),
             "count": (dataclasses.replace(g, count=3), {"count"}),
             "size": (dataclasses.replace(g, size="small"), {"size"}),
             "position": (dataclasses.replace(g, position="bottom"), {"position"}),
             "color": (dataclasses.replace(g, color="blue"), {"object", "count", "color", "position", "size"})}
    for name, (wrong, failing) in cases.items():
        scores = score_image(img, Scene((wrong,)))
        assert {t for t in TASKS if not scores[t]} == failing, name
        assert not scores["overall"]


def test_blurred_images_still_read():
    """Generated images are soft: a Gaussian blur of 0.5 px keeps the 32 px score high."""
    from scipy import ndimage
    gen = ShapesGenerator(32, 1, "all", seed=4)
    samples = [gen.sample(i) for i in range(60)]
    blurred = [[np.clip(ndimage.gaussian_filter(s["image"].astype(np.float32), (0.5, 0.5, 0)), 0, 255)
                .astype(np.uint8)] for s in samples]
    assert evaluate(blurred, [s["scene"] for s in samples]).summary()["overall"] >= 0.9


def test_rejects_non_image_input():
    with pytest.raises(ValueError, match="uint8"):
        analyze(np.zeros((32, 32, 3), np.float32))

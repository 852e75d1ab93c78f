"""Metrics of the super-resolution, depth and captioning tasks and their trivial baselines, on
shapes scenes and on cases whose answer is known by hand."""
from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.shapes import Scene, ShapeGroup, ShapesGenerator, caption, phrasings
from trainer.eval.task_metrics import (PSNR_CAP_DB, bicubic_baseline, caption_metrics,
                                       depth_metrics, image_metrics, mean_depth_map, most_frequent_caption)


def test_image_metrics_and_bicubic_baseline():
    images = [ShapesGenerator(32, 2, "all", seed=5).sample(i)["image"] for i in range(8)]
    exact = image_metrics(images, images)
    assert exact == {"psnr": PSNR_CAP_DB, "ssim": pytest.approx(1.0)}
    assert image_metrics([np.full((16, 16, 3), 10, np.uint8)], [np.full((16, 16, 3), 20, np.uint8)])["psnr"] == \
        pytest.approx(20 * np.log10(255 / 10))  # MSE 100 with a data range of 255
    up = bicubic_baseline(images, 16)
    assert len(up) == 8 and up[0].shape == (32, 32, 3) and up[0].dtype == np.uint8
    from_8 = image_metrics(bicubic_baseline(images, 8), images)
    from_16 = image_metrics(up, images)
    assert 10 < from_8["psnr"] < from_16["psnr"] < 40 and 0 < from_8["ssim"] < from_16["ssim"] < 1
    flat = [np.full((32, 32, 3), 77, np.uint8)]
    np.testing.assert_array_equal(bicubic_baseline(flat, 16)[0], flat[0])  # resampling keeps flat images
    with pytest.raises(ValueError, match=r"pred\[1\]: expected an \(H, W, 3\) uint8 image, got float32"):
        image_metrics([images[0], images[1].astype(np.float32)], images[:2])
    with pytest.raises(ValueError, match="source_resolution 12 must divide"):
        bicubic_baseline(images, 12)


def test_depth_metrics_and_mean_depth_baseline():
    truth = [np.full((4, 4), 2.0, np.float32), np.full((4, 4), 4.0, np.float32)]
    assert depth_metrics(truth, truth) == {"abs_rel": 0.0, "delta1": 1.0}
    pred = [np.full((4, 4), 2.2, np.float32), np.full((4, 4), 6.0, np.float32)]  # 10% off, then 50% off
    assert depth_metrics(pred, truth) == {"abs_rel": pytest.approx(0.3), "delta1": 0.5}
    np.testing.assert_allclose(mean_depth_map(truth), np.full((4, 4), 3.0))
    gen = ShapesGenerator(32, 1, "train", seed=0)
    mean = mean_depth_map([gen.sample(i)["depth"] for i in range(100)])
    held_out = [gen.sample(i)["depth"] for i in range(100, 140)]
    baseline = depth_metrics([mean] * len(held_out), held_out)
    assert 0 < baseline["abs_rel"] < 0.5 and 0.5 < baseline["delta1"] < 1
    with pytest.raises(ValueError, match="depths must be positive"):
        depth_metrics([np.zeros((4, 4))], truth[:1])


def test_caption_metrics_attribute_by_attribute():
    left = ShapeGroup("circle", "red", "small", 2, "left")
    right = ShapeGroup("square", "blue", "large", 1, "right")
    scene = Scene((left, right))
    perfect = caption_metrics([caption(scene, 3)], [scene])
    assert perfect == {"bleu4": pytest.approx(1.0), "object": 1.0, "count": 1.0, "color": 1.0, "position": 1.0,
                       "size": 1.0, "overall": 1.0, "parsed": 1.0}
    swapped = caption_metrics([caption(Scene((right, left)), 0)], [scene])  # the same scene, groups in the other order
    assert swapped["overall"] == 1.0 and swapped["count"] == 1.0
    wrong = Scene((ShapeGroup("circle", "green", "small", 3, "left"), ShapeGroup("triangle", "blue", "large", 1, "top")))
    scores = caption_metrics([caption(wrong, 0), "a cat on a mat"], [scene, scene])
    # 4 true groups: the left one keeps shape, size, position but not color or count; the right one
    # is compared with the "top" group (second in the caption): color, size, count right; nothing of the garbage.
    assert scores["parsed"] == 0.5 and scores["overall"] == 0.0
    assert (scores["object"], scores["color"], scores["count"], scores["size"], scores["position"]) == \
        (0.0, 0.25, 0.25, 0.5, 0.25)
    assert 0 < scores["bleu4"] < 1
    assert phrasings(Scene((left,))) == ["two small red circles on the left",
                                                  "there is two small red circles on the left",
                                                  "an image of two small red circles on the left"]
    with pytest.raises(ValueError, match="2 generated captions for 1 scenes"):
        caption_metrics(["a", "b"], [scene])


def test_caption_baseline_on_scenes():
    gen = ShapesGenerator(32, 1, "train", seed=0)
    train = gen.captions(300)
    best = most_frequent_caption(train)
    assert train.count(best) == max(train.count(c) for c in set(train))
    assert most_frequent_caption(["b", "a", "a", "b"]) == "b"  # a tie goes to the first seen
    scenes = [gen.scene(i) for i in range(300, 400)]
    scores = caption_metrics([best] * len(scenes), scenes)
    assert scores["parsed"] == 1.0 and scores["overall"] < 0.1 and 0 < scores["bleu4"] < 0.6

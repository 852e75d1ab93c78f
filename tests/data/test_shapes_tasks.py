"""The shapes data behind the super-resolution, depth and captioning tasks: the depth map of a scene,
captions parsed back into scenes, the resampling of the super-resolution input, caption token ids,
and the dataset's extras."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from data_pipeline.datasets import ShapesTextDataset
from data_pipeline.features import load_text_encoder
from data_pipeline.image_ops import area_downsample, bicubic_upsample
from data_pipeline.shapes import (DEPTH_FAR, DEPTH_NEAR, _TEMPLATES, Scene, ShapeGroup, ShapesGenerator, caption,
                                  depth_to_tensor_array, ground_depth, layout, parse_caption, render_depth,
                                  tensor_array_to_depth)
from tests.support.tiny_models import save_tiny_t5, tiny_text_encoder

# sha256 over the first 200 scenes' images, captions, scenes and fingerprints, and captions(200), computed
# with main's code before depth maps existed (commit 1ca08dc): depth must draw nothing from the RNG.
_SCENES_BEFORE_DEPTH = {
    (32, 1, "train", 0): "d05d01ce9e40014b0a2ece83978f11200f4ff7d259e049bface3b38502d2af63",
    (16, 2, "heldout", 1): "902177b73004a3172b7b9291fb16a64baed8cd3108e4c749c0b0a508b5c96389",
    (64, 2, "train", 5): "19e0593801eaa3e3d0d9d18a9837dc8d9e3e97e4a839d60cf975ce062beed3c3",
}


def _scenes_hash(gen: ShapesGenerator, n: int = 200) -> str:
    digest = hashlib.sha256()
    for i in range(n):
        s = gen.sample(i)
        for part in (s["image"].tobytes(), s["caption"].encode(), repr(s["scene"]).encode(),
                     repr(gen.fingerprint(i)).encode()):
            digest.update(part)
    digest.update("|".join(gen.captions(n)).encode())
    return digest.hexdigest()


@pytest.mark.parametrize("args", list(_SCENES_BEFORE_DEPTH))
def test_depth_leaves_images_captions_and_layouts_unchanged(args):
    assert _scenes_hash(ShapesGenerator(*args)) == _SCENES_BEFORE_DEPTH[args]


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_depth_is_ground_plane_with_shapes_standing_on_it(resolution):
    ground = ground_depth(resolution)  # (res,)
    assert ground.dtype == np.float32 and np.all(np.diff(ground) < 0)  # far at the top, near at the bottom
    assert DEPTH_NEAR < ground[-1] < ground[0] < DEPTH_FAR
    gen = ShapesGenerator(resolution, 2, "all", seed=3)
    for i in range(20):
        s = gen.sample(i)
        depth, image = s["depth"], s["image"]
        assert depth.shape == (resolution, resolution) and depth.dtype == np.float32
        rng = gen._layout_rng(i)
        rng.integers(len(_TEMPLATES))  # the template draw comes first, as in sample
        boxes = layout(s["scene"], resolution, rng)
        on_shape = image.any(axis=2)  # (H, W): the black background is the ground
        expected = np.repeat(ground[:, None], resolution, axis=1)  # (H, W)
        for g, (x0, y0, x1, y1) in boxes:
            inside = np.zeros_like(on_shape)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            expected[inside & on_shape] = ground[y1]  # the shape's pixels: the ground's depth at its bottom row
        np.testing.assert_array_equal(depth, expected)
        assert np.all(depth[on_shape] <= np.repeat(ground[:, None], resolution, 1)[on_shape])  # in front of the ground
        rng = gen._layout_rng(i)
        rng.integers(len(_TEMPLATES))
        np.testing.assert_array_equal(render_depth(s["scene"], resolution, rng), depth)


def test_depth_tensor_conversions_round_trip_and_clamp():
    depth = ShapesGenerator(32, 2, "all", seed=1).sample(0)["depth"]
    x = depth_to_tensor_array(depth)
    assert x.shape == (1, 32, 32) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(tensor_array_to_depth(x), depth, rtol=1e-5)
    np.testing.assert_allclose(tensor_array_to_depth(x[0]), depth, rtol=1e-5)
    ends = depth_to_tensor_array(np.array([[DEPTH_NEAR, DEPTH_FAR, 0.0, 1e6]], np.float32))[0, 0]
    np.testing.assert_allclose(ends, [-1, 1, -1, 1], atol=1e-6)
    np.testing.assert_allclose(tensor_array_to_depth(np.array([[-5.0, 0.0, 5.0]])),
                               [[DEPTH_NEAR, np.sqrt(DEPTH_NEAR * DEPTH_FAR), DEPTH_FAR]], rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(1, H, W\) or \(H, W\), got shape \(3, 4, 4\)"):
        tensor_array_to_depth(np.zeros((3, 4, 4)))


def test_parse_caption_inverts_every_template_and_refuses_garbage():
    gen = ShapesGenerator(32, 2, "all", seed=11)
    scenes = [gen.scene(i) for i in range(300)]
    assert {len(s.groups) for s in scenes} == {1, 2}
    for scene in scenes:
        for template in range(len(_TEMPLATES)):
            text = caption(scene, template)
            assert parse_caption(text) == scene, text
            assert parse_caption("  " + text.upper().replace(" ", "  ") + " ") == scene
    three = Scene((ShapeGroup("circle", "red", "small", 3, "left"), ShapeGroup("square", "blue", "large", 1, "top")))
    assert parse_caption(caption(three, 2)) == three  # any two groups, not only opposite ones
    for garbage in ["", "a", "a small red circle", "a small red circle on the left and", "two small red circle on the left",
                    "a small red circles on the left", "a tiny red circle on the left", "a small pink circle on the left",
                    "a small red hexagon on the left", "there is an image of a small red circle on the left",
                    "a small red circle on the left and a large blue square on the right and a small red circle at the top",
                    "a small red circle on the left.", "four small red circles on the left"]:
        assert parse_caption(garbage) is None, garbage


def test_area_downsample_and_bicubic_upsample():
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # (B, C, H, W)
    low = area_downsample(x, 16)
    assert low.shape == (2, 3, 16, 16)
    torch.testing.assert_close(low, x.reshape(2, 3, 16, 2, 16, 2).mean(dim=(3, 5)))  # 2x2 box means
    up = bicubic_upsample(low, 32)
    assert up.shape == (2, 3, 32, 32) and up.min() >= -1 and up.max() <= 1
    flat = torch.full((1, 3, 8, 8), 0.25)
    torch.testing.assert_close(bicubic_upsample(flat, 32), torch.full((1, 3, 32, 32), 0.25))
    edge = torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]).repeat(1, 1, 4, 4)  # (1, 1, 8, 8) stripes: cubic overshoots
    assert torch.nn.functional.interpolate(edge, size=(32, 32), mode="bicubic").abs().max() > 1
    assert bicubic_upsample(edge, 32).abs().max() <= 1
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) batch, got shape \(3, 32, 32\)"):
        area_downsample(x[0], 16)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    t5 = save_tiny_t5(tmp_path_factory.mktemp("t5") / "t5", encoder_only=True)
    return {"minilm": load_text_encoder("minilm"), "clip": load_text_encoder(tiny_text_encoder()),
            "t5": load_text_encoder(t5)}


_LONG_ENOUGH = {"minilm": 24, "clip": 64, "t5": 64}  # max_tokens that hold every two-group caption (word pieces)


@pytest.mark.parametrize("kind", ["minilm", "clip", "t5"])
def test_token_ids_are_what_encode_embeds_and_decode_back(encoders, kind):
    encoder, n = encoders[kind], _LONG_ENOUGH[kind]
    captions = ShapesGenerator(32, 2, "all", seed=2).captions(24)
    ids = encoder.token_ids(captions, n)
    _, mask = encoder.encode(captions, n)
    assert ids.shape == (24, n) and ids.dtype == np.int64
    assert 0 <= ids.min() and ids.max() < encoder.vocab_size
    lengths = mask.sum(axis=1)  # the mask marks a prefix: the caption's tokens, then padding
    np.testing.assert_array_equal(mask, np.arange(n)[None] < lengths[:, None])
    assert lengths.max() < n and all((row[n:] == encoder.pad_id).all() for row, n in zip(ids, lengths))
    if kind != "clip":  # CLIP pads with its end token, which the mask counts once as real
        np.testing.assert_array_equal(mask, ids != encoder.pad_id)
    assert encoder.decode_ids(ids) == [c.lower() for c in captions]
    assert encoder.decode_ids(ids[:, :6])[0] != captions[0]  # truncated like encode truncates
    with pytest.raises(ValueError, match=rf"\(B, n\) array of token ids, got shape \({n},\)"):
        encoder.decode_ids(ids[0])


def test_dataset_extras(encoders):
    gen, encoder = ShapesGenerator(16, 2, "all", seed=4), encoders["clip"]
    plain = ShapesTextDataset(gen, 6, encoder, 12)[3]
    assert set(plain) == {"image", "text_emb", "text_mask", "caption"}
    both = ShapesTextDataset(gen, 6, encoder, 12, extras=("depth", "caption_ids"))
    sample = both[3]
    for key in plain:
        assert torch.equal(sample[key], plain[key]) if key != "caption" else sample[key] == plain[key]
    assert sample["depth"].shape == (1, 16, 16) and sample["depth"].dtype == torch.float32
    np.testing.assert_array_equal(sample["depth"].numpy(), depth_to_tensor_array(gen.sample(3)["depth"]))
    assert sample["caption_ids"].dtype == torch.int64
    np.testing.assert_array_equal(sample["caption_ids"].numpy(), encoder.token_ids([sample["caption"]], 12)[0])
    batch = torch.utils.data.default_collate([both[i] for i in range(4)])
    assert batch["depth"].shape == (4, 1, 16, 16) and batch["caption_ids"].shape == (4, 12)
    with pytest.raises(ValueError, match=r"unknown dataset extras \['normals'\]: expected some of"):
        ShapesTextDataset(gen, 6, encoder, 12, extras=("depth", "normals"))

"""The latent codec (a tiny random-weight diffusers AutoencoderKL saved locally) and the one function
that decides the model's input: roundtrip shapes, the shards' scale and shift applied, clear errors for
a missing folder and for shards, config, autoencoder and checkpoint that disagree."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from data_pipeline.metadata import FeatureMetadata, LatentSpec, TextSpec
from tests.support.tiny_models import save_tiny_vae
from trainer.model_input import ModelInput, check_init_latents, check_same_latents, resolve_model_input
from trainer.models.codecs import LatentCodec, PixelCodec, build_codec


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny SD-shaped autoencoder (4 latent channels, 8x downsampling) with scaling_factor 0.5."""
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), scaling_factor=0.5)


def spec_of(folder: str, **kw) -> LatentSpec:
    values = dict(autoencoder=folder, scaling_factor=0.5, shift_factor=0.0, resolution=64, latent_shape=(4, 8, 8))
    values.update(kw)
    return LatentSpec(**values)


def latent_shards(shape=(4, 8, 8), tokens=12, dim=32) -> dict:
    """What ``describe_shards`` says of latent shards."""
    return {"format": "mds", "text_emb": (tokens, dim), "latent": shape, "image": (64, 64)}


def test_latent_codec_roundtrip_applies_the_specs_scale_and_shift(vae_dir):
    spec = spec_of(vae_dir, scaling_factor=0.25, shift_factor=0.1)  # the shards' record, not the folder's 0.5
    codec = LatentCodec(spec)
    assert codec.latent_shape == (4, 8, 8) and codec.resolution == 64
    image = torch.rand(3, 3, 64, 64) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    z = codec.encode(image)
    assert z.shape == (3, 4, 8, 8)
    with torch.no_grad():
        mean = codec.vae.encode(image).latent_dist.mean  # (B, 4, 8, 8)
        torch.testing.assert_close(z, (mean - 0.1) * 0.25)
        decoded = codec.decode(z)
        torch.testing.assert_close(decoded, codec.vae.decode(z / 0.25 + 0.1).sample.clamp(-1, 1))
    assert decoded.shape == (3, 3, 64, 64) and decoded.abs().max() <= 1
    # batched: the same result in chunks of 2 as in one batch
    codec.batch_size = 2
    torch.testing.assert_close(codec.encode(image), z)


def test_missing_autoencoder_folder_names_it_and_what_it_must_hold(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-vae.*config.json.*never downloads"):
        LatentCodec(spec_of(str(tmp_path / "no-vae")))
    with pytest.raises(FileNotFoundError, match=r"--vae not found at .*elsewhere"):
        build_codec(ModelInput("latent", (4, 8, 8), 32, 12, 64, spec_of(str(tmp_path / "a"))),
                    vae=str(tmp_path / "elsewhere"))


def test_build_codec_picks_pixels_or_the_named_autoencoder(vae_dir, tmp_path):
    assert isinstance(build_codec(ModelInput("pixels", (3, 32, 32), 32, 12, 32)), PixelCodec)
    latent = ModelInput("latent", (4, 8, 8), 32, 12, 64, spec_of(vae_dir))
    assert build_codec(latent).spec.autoencoder == vae_dir
    with pytest.raises(ValueError, match=r"nothing names the autoencoder.*--vae"):
        build_codec(dataclasses.replace(latent, latent=None))
    # no recorded spec: --vae supplies one with its own scale (shards written before the metadata existed)
    assert build_codec(dataclasses.replace(latent, latent=None), vae=vae_dir).spec.scaling_factor == 0.5
    other = save_tiny_vae(tmp_path / "sdxl-like", scaling_factor=0.13025)
    with pytest.raises(ValueError, match=r"--vae=.*sdxl-like has scaling_factor=0.13025.* autoencoder .* has "
                                         r"scaling_factor=0.5"):
        build_codec(latent, vae=other)
    # a copy of the same autoencoder elsewhere decodes latents scaled by a measured factor (data features
    # --scaling-factor auto) with that factor
    copy = save_tiny_vae(tmp_path / "copy", scaling_factor=0.5)
    measured = dataclasses.replace(latent, latent=spec_of(vae_dir, scaling_factor=0.9))
    assert build_codec(measured, vae=copy).spec == spec_of(copy, scaling_factor=0.9)


def test_resolve_model_input_reads_the_latents_and_their_autoencoder(vae_dir, tiny_config):
    cfg = tiny_config(**{"data.source": "mds", "data.path": "/shards", "data.resolution": 64})
    meta = FeatureMetadata(latent=spec_of(vae_dir))
    mi = resolve_model_input(cfg, latent_shards(), meta, encoder_dim=32)
    assert (mi.space, mi.latent_shape, mi.text_dim, mi.resolution) == ("latent", (4, 8, 8), 32, 64)
    assert mi.latent.autoencoder == vae_dir
    pixels = resolve_model_input(tiny_config(), None, None, encoder_dim=32)
    assert (pixels.space, pixels.latent_shape, pixels.latent) == ("pixels", (3, 32, 32), None)


def test_disagreements_fail_naming_both_values(vae_dir, tmp_path, tiny_config):
    shards = dict(**{"data.source": "mds", "data.path": "/shards"})
    meta = FeatureMetadata(latent=spec_of(vae_dir))
    with pytest.raises(ValueError, match=r"data.resolution=32 but the latents .* 64 px images: set data.resolution=64"):
        resolve_model_input(tiny_config(**shards), latent_shards(), meta, 32)
    with pytest.raises(ValueError, match=r"hold \(4, 8, 8\) latents but data.resolution=64 .*latent_downsample=4 "
                                         r"declares \(4, 16, 16\): .*data.latent_downsample=8"):
        resolve_model_input(tiny_config(**shards, **{"data.resolution": 64, "data.latent_downsample": 4}),
                            latent_shards(), None, 32)
    with pytest.raises(ValueError, match=r"metadata says latents \(4, 8, 8\) but the stored samples are \(4, 4, 4\)"):
        resolve_model_input(tiny_config(**shards, **{"data.resolution": 64}), latent_shards((4, 4, 4)), meta, 32)
    other = save_tiny_vae(tmp_path / "other", scaling_factor=0.18215)
    with pytest.raises(ValueError, match=r"data.vae=.*other has scaling_factor=0.18215.* autoencoder .* has "
                                         r"scaling_factor=0.5"):
        resolve_model_input(tiny_config(**shards, **{"data.resolution": 64, "data.vae": other}),
                            latent_shards(), meta, 32)
    with pytest.raises(ValueError, match=r"data.space=latent but shards at /shards hold no latents"):
        resolve_model_input(tiny_config(**shards, **{"data.space": "latent"}),
                            {**latent_shards(), "latent": None}, None, 32)
    with pytest.raises(ValueError, match=r"32-d text features but data.text_encoder=.* gives 384-d"):
        resolve_model_input(tiny_config(**shards, **{"data.resolution": 64}), latent_shards(), meta, 384)


def test_autoencoder_that_cannot_decode_the_latents_is_refused(vae_dir):
    with pytest.raises(ValueError, match=r"has 4 latent channels but the latents have 16"):
        LatentCodec(spec_of(vae_dir, latent_shape=(16, 8, 8)))
    with pytest.raises(ValueError, match=r"downsamples 8x, so 8x8 latents decode to 64 px, .* 256 px images"):
        LatentCodec(spec_of(vae_dir, resolution=256))


def test_a_checkpoint_on_other_latents_is_refused(vae_dir):
    saved = ModelInput("latent", (4, 8, 8), 32, 12, 64, spec_of(vae_dir))
    check_same_latents(saved, dataclasses.replace(saved, latent=spec_of("/elsewhere")), "ckpt")  # same latents
    with pytest.raises(ValueError, match=r"ckpt was trained on latents \(4, 8, 8\), 64 px, scaling_factor=0.5.* "
                                         r"are latents \(4, 8, 8\), 64 px, scaling_factor=0.18215"):
        check_same_latents(saved, dataclasses.replace(saved, latent=spec_of(vae_dir, scaling_factor=0.18215)),
                           "ckpt")
    with pytest.raises(ValueError, match=r"trained on latents .* are pixels \(3, 32, 32\)"):
        check_same_latents(saved, ModelInput("pixels", (3, 32, 32), 32, 12, 32), "ckpt")


def test_text_features_made_otherwise_than_the_config_says_are_refused(tiny_config):
    cfg = tiny_config(**{"data.source": "mds", "data.path": "/shards", "data.resolution": 64})
    shards = latent_shards()
    made = TextSpec(cfg.data.text_encoder, 12, 32)  # the tiny CLIP folder
    resolve_model_input(cfg, shards, FeatureMetadata(text=made), 32)
    with pytest.raises(ValueError, match=rf"text features of minilm but data.text_encoder={cfg.data.text_encoder}"):
        resolve_model_input(cfg, shards, FeatureMetadata(text=dataclasses.replace(made, encoder="minilm")), 32)
    with pytest.raises(ValueError, match=r"text_hidden_layer=-2 \(crossflow_features.json\) but "
                                         r"data.text_hidden_layer=-1: set data.text_hidden_layer=-2"):
        resolve_model_input(cfg, shards, FeatureMetadata(text=dataclasses.replace(made, hidden_layer=-2)), 32)
    with pytest.raises(ValueError, match=r"text_multiplier=10.0 .* but data.text_multiplier=1.0"):
        resolve_model_input(cfg, shards, FeatureMetadata(text=dataclasses.replace(made, multiplier=10.0)), 32)


def test_init_from_allows_another_resolution_but_not_other_latents(vae_dir):
    at_256 = ModelInput("latent", (4, 32, 32), 32, 12, 256, spec_of(vae_dir, resolution=256, latent_shape=(4, 32, 32)))
    at_512 = ModelInput("latent", (4, 64, 64), 32, 12, 512, spec_of(vae_dir, resolution=512, latent_shape=(4, 64, 64)))
    check_init_latents(at_256, at_512, "ckpt")  # the paper's 512 px stage from its 256 px checkpoint
    with pytest.raises(ValueError, match=r"init_from=ckpt was trained on space=latent, channels=4, "
                                         r"scaling_factor=0.5.* are space=latent, channels=4, scaling_factor=0.13025"):
        check_init_latents(at_256, dataclasses.replace(at_512, latent=spec_of(vae_dir, scaling_factor=0.13025,
                                                                               resolution=512,
                                                                               latent_shape=(4, 64, 64))), "ckpt")
    with pytest.raises(ValueError, match=r"space=latent, channels=4.* are space=pixels, channels=3"):
        check_init_latents(at_256, ModelInput("pixels", (3, 32, 32), 32, 12, 32), "ckpt")

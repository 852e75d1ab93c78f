"""The paper's text encoders from local folders: tiny random-weight CLIP (full, text-only) and T5
(full, encoder-only) with their tokenizers, loaded the way `data features`, training and sampling
load them (``text_encoder_from_config``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.features import load_text_encoder, text_encoder_dim, text_encoder_from_config
from tests.support.tiny_models import TINY_TEXT_WIDTH, save_tiny_clip, save_tiny_t5
from trainer.config import DataConfig

CAPTIONS = ["a red circle on the left", "two big blue squares at the top and a yellow triangle"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-encoders")
    return {"clip": save_tiny_clip(root / "clip"), "clip-text": save_tiny_clip(root / "clip-text", text_only=True),
            "t5": save_tiny_t5(root / "t5"), "t5-encoder": save_tiny_t5(root / "t5-encoder", encoder_only=True)}


def _reference(folder: str, kind: str, max_tokens: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """The text tower called directly with transformers, as a user of the model would."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel
    tok = AutoTokenizer.from_pretrained(folder)(CAPTIONS, padding="max_length", truncation=True,
                                                max_length=max_tokens, return_tensors="pt")
    model = (CLIPTextModel if kind.startswith("clip") else T5EncoderModel).from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**tok, output_hidden_states=True)
    states = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    return states.numpy(), tok["attention_mask"].bool().numpy()


@pytest.mark.parametrize("kind", ["clip", "clip-text", "t5", "t5-encoder"])
def test_text_tower_states_masks_layers_multiplier(folders, kind):
    folder = folders[kind]
    last = text_encoder_from_config(DataConfig(text_encoder=folder))
    assert last.dim == TINY_TEXT_WIDTH == text_encoder_dim(folder)
    emb, mask = last.encode(CAPTIONS, max_tokens=12)
    assert emb.shape == (2, 12, TINY_TEXT_WIDTH) and emb.dtype == np.float16
    assert mask.shape == (2, 12) and mask.dtype == bool
    ref_emb, ref_mask = _reference(folder, kind, 12, -1)
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask[0].sum() < mask[1].sum() == 12  # the short caption is padded, the long one truncated
    np.testing.assert_allclose(emb.astype(np.float32), ref_emb, atol=2e-3, rtol=2e-3)

    penultimate = text_encoder_from_config(DataConfig(text_encoder=folder, text_hidden_layer=-2, text_multiplier=10.0))
    emb2, mask2 = penultimate.encode(CAPTIONS, max_tokens=12)
    np.testing.assert_array_equal(mask2, mask)
    np.testing.assert_allclose(emb2.astype(np.float32), 10.0 * _reference(folder, kind, 12, -2)[0], atol=2e-2, rtol=2e-3)
    assert not np.allclose(emb2.astype(np.float32) / 10.0, emb.astype(np.float32), atol=1e-2)  # another layer
    spec = penultimate.spec(12)
    assert (spec.hidden_layer, spec.multiplier, spec.dim, spec.max_tokens) == (-2, 10.0, TINY_TEXT_WIDTH, 12)


def test_bad_folders_and_settings_are_clear_errors(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no-such-clip \(no such folder\).*never downloads"):
        load_text_encoder(str(tmp_path / "no-such-clip"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty \(no config.json in it\)"):
        load_text_encoder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"text hidden layer -4 .* 3-layer text encoder"):
        load_text_encoder(folders["t5"], hidden_layer=-4)
    with pytest.raises(ValueError, match=r"max_tokens=80 .* exceeds the 77 positions"):
        load_text_encoder(folders["clip"]).encode(CAPTIONS, max_tokens=80)


def test_training_embeds_prompts_as_configured(folders, tmp_path):
    """Training's caption cache (what sampling prompts go through) uses the configured T5
    folder, hidden layer and multiplier: the same numbers `data features` stores."""
    from tests.conftest import tiny_overrides
    from trainer.config import load_config
    from trainer.loop import build_dataloader, caption_cache
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{
        "data.text_encoder": folders["t5-encoder"], "data.text_hidden_layer": -2, "data.text_multiplier": 10,
        "data.num_samples": 8}))
    encoder = text_encoder_from_config(cfg.data)
    emb, mask = caption_cache(cfg, encoder, build_dataloader(cfg, encoder, 4, 0, 1)).encode(CAPTIONS)
    ref_emb, ref_mask = load_text_encoder(folders["t5-encoder"], hidden_layer=-2, multiplier=10).encode(CAPTIONS, 12)
    np.testing.assert_array_equal(emb.numpy(), ref_emb.astype(np.float32))
    np.testing.assert_array_equal(mask.numpy(), ref_mask)


def test_tiny_models_are_deterministic(tmp_path):
    """tests/support/tiny_models.py: the same seed writes the same weights (tests compare runs)."""
    from tests.support.tiny_models import save_tiny_vae
    for save, weights in ((save_tiny_vae, "diffusion_pytorch_model.safetensors"),
                          (lambda d: save_tiny_t5(d, encoder_only=True), "model.safetensors")):
        a, b = save(tmp_path / f"a-{weights}"), save(tmp_path / f"b-{weights}")
        assert (tmp_path / a / weights).read_bytes() == (tmp_path / b / weights).read_bytes()

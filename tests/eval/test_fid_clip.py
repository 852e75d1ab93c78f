"""FID and CLIP score wrappers, on small random weights the tests create (never a download)."""
import json

import numpy as np
import pytest
import torch

from trainer.eval.fid_clip import clip_score, fid_score


@pytest.fixture(scope="module")
def inception_path(tmp_path_factory):
    """A randomly initialized torch-fidelity InceptionV3 state dict, saved the way the real one is."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    mp = pytest.MonkeyPatch()
    mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})  # build without pretrained weights
    mp.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.manual_seed(0)
    net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel and a character-level CLIP tokenizer, saved with save_pretrained."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer)
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    d = tmp_path_factory.mktemp("clip")
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=16)
    CLIPModel(config).save_pretrained(d)
    return d


def _images(n, seed, res=32):
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def test_fid_identical_sets_is_zero_and_different_sets_positive(inception_path):
    a, b = _images(6, 0), _images(6, 1) // 4  # b: darker images
    same = fid_score(a, a, inception_path, feature_dim=64)
    diff = fid_score(a, b, inception_path, feature_dim=64)
    assert np.isfinite(same) and np.isfinite(diff)
    assert abs(same) < 1e-3
    assert diff > same + 1e-3


def test_fid_missing_weights_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "inception.pth"
    with pytest.raises(FileNotFoundError, match="nope/inception.pth"):
        fid_score(_images(2, 0), _images(2, 1), missing)


def test_clip_score_is_finite_and_in_range(clip_dir):
    prompts = ["a small red circle on the left", "two large blue squares at the top", "a green triangle"]
    score = clip_score(_images(3, 0), prompts, clip_dir)
    assert np.isfinite(score) and 0.0 <= score <= 1.0
    assert clip_score(_images(3, 0), prompts, clip_dir) == pytest.approx(score)  # deterministic


def test_clip_missing_weights_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_clip_here"):
        clip_score(_images(1, 0), ["a red circle"], tmp_path / "no_clip_here")
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip_score(_images(1, 0), ["a red circle"], tmp_path)  # exists but holds no model

"""HuggingFace has a package named ``kernels`` that transformers imports when present;
ours must not be mistaken for it, and transformers must still load models."""
import importlib.util
from pathlib import Path

import torch


def test_transformers_loads_a_model_with_our_kernels_installed():
    import kernels
    import transformers  # noqa: F401
    from transformers import AutoModel, AutoTokenizer

    from data_pipeline.features import minilm_path

    assert Path(importlib.util.find_spec("kernels").origin).parent == Path(kernels.__file__).parent
    assert not hasattr(kernels, "__version__")
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        out = model(**tok(["a red circle on the left"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384
    assert torch.isfinite(out.last_hidden_state).all()


def test_transformers_hub_kernels_integration_sees_no_hf_kernels():
    import transformers
    from transformers.utils import import_utils

    assert importlib.util.find_spec("kernels") is not None  # ours is importable: the case that matters
    check = getattr(import_utils, "is_kernels_available", None)
    assert check is not None, (f"transformers {transformers.__version__} has no "
                               "transformers.utils.import_utils.is_kernels_available any more: find how it now "
                               "detects HuggingFace's `kernels` package and check that ours is not taken for it")
    assert not check(), "transformers mistook crossflow's kernels package for HuggingFace kernels"


def test_minilm_text_encoder_features():
    from data_pipeline.features import load_text_encoder
    enc = load_text_encoder("minilm")
    emb, mask = enc.encode(["a red circle on the left", "three small blue squares at the top"], max_tokens=16)
    assert emb.shape == (2, 16, 384) and emb.dtype.name == "float16"
    assert mask.dtype == bool and mask[0].sum() < mask[1].sum() <= 16

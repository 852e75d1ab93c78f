"""Consolidate a checkpoint into one safetensors file: live weights (``model.*``) and EMA (``ema.*``).

Live weights come from DeepSpeed's own ZeRO consolidation (any stage, any world size);
the EMA from the checkpoint's consolidated ``weights.safetensors``, with its model args, config and
feature metadata (the autoencoder that decodes the model's latents). No process group needed.
"""
from __future__ import annotations

from pathlib import Path

from trainer.checkpoint import WEIGHTS_FILE, CheckpointError, load_features, load_weights, resolve_checkpoint_dir


def export_checkpoint(checkpoint: str | Path, out: str | Path) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file
    import json

    ckpt = resolve_checkpoint_dir(checkpoint)
    ema, args, config = load_weights(ckpt / WEIGHTS_FILE)
    features = load_features(ckpt / WEIGHTS_FILE)
    try:
        live = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    except Exception as e:  # DeepSpeed raises a variety of errors for missing or partial shards
        raise CheckpointError(f"cannot consolidate the DeepSpeed state in {ckpt}: {e}") from e
    tensors = {f"ema.{k}": v.float().contiguous() for k, v in ema.items()}
    tensors.update({f"model.{k}": v.float().contiguous() for k, v in live.items()})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"model_args": json.dumps(args), "config": json.dumps(config),
                                             "features": json.dumps(features.to_dict())})
    return out

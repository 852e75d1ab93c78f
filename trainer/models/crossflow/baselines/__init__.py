"""Models CrossFlow is compared against, with CrossFlow's interface (encode_text, velocity)."""
from trainer.models.crossflow.baselines.cross_attention_fm import (
    CrossAttentionFM, CrossAttentionFMArgs, TextCondition, resolve_baseline_args)

__all__ = ["CrossAttentionFM", "CrossAttentionFMArgs", "TextCondition", "resolve_baseline_args"]

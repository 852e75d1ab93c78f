import pytest
import torch

from trainer.config import ModelConfig
from trainer.models.crossflow.crossflow import CrossFlow, resolve_args
from trainer.models.crossflow.presets import PRESETS

NAMED = [name for name, p in PRESETS.items() if p.nominal_params]


@pytest.mark.parametrize("name", NAMED)
def test_preset_flow_params_match_name(name):
    """The paper counts the flow network only, for its 4x32x32 latent; built on meta: no memory."""
    with torch.device("meta"):
        model = CrossFlow(resolve_args(ModelConfig(preset=name), (4, 32, 32), text_dim=768, max_tokens=77))
    n = model.flow_params()
    nominal = PRESETS[name].nominal_params
    assert abs(n - nominal) / nominal < 0.03, f"{name}: {n / 1e6:.1f}M parameters"
    assert PRESETS[name].head_dim in (64, 128)


def test_sizes_increase():
    counts = []
    for name in NAMED:
        with torch.device("meta"):
            counts.append(CrossFlow(resolve_args(ModelConfig(preset=name), (4, 32, 32), 768, 77)).flow_params())
    assert counts == sorted(counts)


def test_overrides_win_over_preset():
    args = resolve_args(ModelConfig(preset="70M", depth=3, hidden_size=256), (4, 32, 32), 768, 77)
    assert (args.depth, args.hidden_size, args.head_dim) == (3, 256, PRESETS["70M"].head_dim)

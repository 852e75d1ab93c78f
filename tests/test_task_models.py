"""The model side of issue 17's tasks: CrossFlow with an image VE source (depth, captioning), an
upsample source (super-resolution) and a caption target, built from a config as the loop builds it
(``resolve_model_args`` + ``model_from_args``); text-to-image's args and checkpoints unchanged."""
import dataclasses
import json

import pytest
import torch

from trainer.config import ModelConfig
from trainer.models.crossflow.caption import caption_loss
from trainer.models.crossflow.sources import INIT_LOGVAR, ImageVE
from trainer.models.families import family_of, model_from_args, resolve_model_args, text_side_modules, wrapped_blocks

TEXT_DIM, TOKENS, VOCAB, B = 32, 16, 30522, 2
SMALL = {"hidden_size": 64, "depth": 2, "text_ve_width": 64, "text_ve_depth": 1}  # the tiny preset, smaller still


def build(source, target, latent, **kw):
    """A small CrossFlow for a pair, its args through JSON as a checkpoint stores them."""
    args = resolve_model_args(ModelConfig(preset="tiny", **SMALL, **kw), latent, TEXT_DIM, TOKENS, source=source,
                              target=target, source_shape=(3, 32, 32), caption_vocab=VOCAB)
    model = model_from_args(args)
    assert model_from_args(json.loads(json.dumps(dataclasses.asdict(args)))).args == args  # reloads from a checkpoint
    return model


def flow_step(model, z0, z1):
    """One flow-matching-like forward at a random t (what the objective runs), for shapes and gradients."""
    t = torch.rand(B)
    x_t = (1 - t[:, None, None, None]) * z0 + t[:, None, None, None] * z1
    v = model.velocity(x_t, t, torch.ones(B, dtype=torch.long))
    assert v.shape == z1.shape
    return (v - (z1 - z0)).square().mean()


def grads_reach(module) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_depth_captioning_and_superres_shapes_and_gradients():
    torch.manual_seed(0)
    image = torch.rand(B, 3, 32, 32) * 2 - 1

    # depth: image 3x32x32 -> depth map 1x32x32 (no downsampling stage)
    depth = build("image_ve", "depth", (1, 32, 32))
    assert depth.text_ve is None and depth.text_proj is None and depth.caption is None
    assert depth.source_is_learned and not depth.source_from_text
    z0, mu, logvar = depth.encode_source({"image": image})
    assert z0.shape == mu.shape == logvar.shape == (B, 1, 32, 32)
    assert torch.equal(logvar, torch.full_like(logvar, INIT_LOGVAR))  # sigma starts at exp(INIT_LOGVAR / 2) = 1
    assert torch.equal(depth.encode_source({"image": image}, use_mean=True)[0], mu)
    emb, scale = depth.embed_image(torch.rand(B, 1, 32, 32))
    assert emb.shape == (B, 32 * 32) and scale.shape == (1,)
    loss = flow_step(depth, z0, torch.rand(B, 1, 32, 32)) + 1e-3 * logvar.exp().sum() + emb.square().mean()
    loss.backward()
    assert grads_reach(depth.image_ve.stem) and grads_reach(depth.image_ve.head)
    assert depth.image_ve.global_mlp[-1].weight.grad.abs().sum() > 0  # zero-started, still learns
    assert sum(p.numel() for p in depth.image_ve.parameters()) < 1e6

    # captioning: image 3x32x32 -> caption latent 4x8x8 (patch 1: 64 tokens), vocab 30522, 16 tokens
    cap = build("image_ve", "caption", (4, 8, 8), patch_size=1)
    assert cap.args.caption_vocab == VOCAB and cap.args.caption_tokens == TOKENS
    z0, mu, logvar = cap.encode_source({"image": image})
    assert z0.shape == mu.shape == logvar.shape == (B, 4, 8, 8)
    text_emb, mask = torch.randn(B, TOKENS, TEXT_DIM), torch.arange(TOKENS)[None].repeat(B, 1) < 9
    c_mu, c_logvar = cap.encode_caption(text_emb, mask)
    assert c_mu.shape == c_logvar.shape == (B, 4, 8, 8)
    sample = c_mu + torch.exp(0.5 * c_logvar) * torch.randn_like(c_mu)
    logits = cap.decode_caption(sample)
    assert logits.shape == (B, TOKENS, VOCAB)
    ids = torch.randint(0, VOCAB, (B, TOKENS))
    ce = caption_loss(logits, ids)
    assert abs(ce.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 1.0  # near uniform at init
    con, _ = cap.embed_image(c_mu.detach())  # the contrastive head embeds z1, here the caption latent
    assert con.shape == (B, 4 * 8 * 8)
    (ce + flow_step(cap, z0, c_mu.detach()) + 1e-3 * c_logvar.exp().mean() + (con * z0.flatten(1)).mean()).backward()
    assert grads_reach(cap.caption.ve) and grads_reach(cap.caption.decoder) and grads_reach(cap.image_encoder.stem)
    assert cap.image_ve.head.weight.grad.abs().sum() > 0
    assert cap.flops_per_sample() > 0 and family_of(cap).block_stacks(cap.args)[0].tokens == 1 + 64
    with pytest.raises(ValueError, match=r"logits \(2, 16, 30522\) do not match token ids \(2, 15\)"):
        caption_loss(logits, ids[:, :15])

    # super-resolution: z0 comes prepared in the flow's space; nothing is built for the source
    sr = build("upsample", "image", (3, 32, 32))
    assert sr.text_ve is None and sr.image_ve is None and sr.image_encoder is None and sr.caption is None
    assert not sr.source_is_learned and not sr.source_from_text
    up = torch.rand(B, 3, 32, 32)
    z0, mu, logvar = sr.encode_source({"z0": up})
    assert z0 is up and mu is up and logvar is None
    with pytest.raises(ValueError, match="not learned"):
        sr.embed_image(up)
    with pytest.raises(KeyError, match=r"reads \['z0'\]; missing \['z0'\]"):
        sr.encode_source({"image": up})
    with pytest.raises(ValueError, match="no caption autoencoder"):
        sr.decode_caption(torch.zeros(B, 4, 8, 8))
    with pytest.raises(ValueError, match="no Text VE"):
        sr.encode_text(text_emb, mask)

    # every pair: the planner's stacks match the wrapped blocks, the counts name every parameter
    for model, parts in ((depth, {"image VE", "image encoder"}), (cap, {"image VE", "caption VE", "caption decoder"}),
                         (sr, set())):
        counts = family_of(model).param_counts(model)
        assert parts <= set(counts) and "Text VE" not in counts
        assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
        assert sum(s.depth for s in family_of(model).block_stacks(model.args)) == len(wrapped_blocks(model))
        assert text_side_modules(model) == []


def test_text_to_image_args_and_weights_unchanged_and_old_checkpoints_load():
    """text-to-image: the same args whatever task values the caller passes, the same parameter
    names in the same order, the same initial weights as a model built without the task args, and
    an args dict from before the task fields builds (with the defaults)."""
    cfg = ModelConfig(preset="tiny", **SMALL)
    plain = resolve_model_args(cfg, (3, 32, 32), TEXT_DIM, TOKENS)
    passed = resolve_model_args(cfg, (3, 32, 32), TEXT_DIM, TOKENS, source="text_ve", target="image",
                                source_shape=(3, 32, 32), caption_vocab=VOCAB)
    assert passed == plain and (plain.source, plain.target, plain.source_shape) == ("text_ve", "image", ())
    old = {k: v for k, v in dataclasses.asdict(plain).items()
           if k not in ("source", "target", "source_shape", "caption_vocab", "caption_tokens")}
    torch.manual_seed(0)
    before = model_from_args(old).state_dict()
    torch.manual_seed(0)
    now = model_from_args(plain)
    assert list(now.state_dict()) == list(before)
    assert all(torch.equal(now.state_dict()[k], v) for k, v in before.items())
    assert list(family_of(now).param_counts(now)) == ["flow transformer", "Text VE", "text down-projection",
                                                      "image encoder"]
    assert now.source_is_learned and now.source_from_text and text_side_modules(now)
    emb, mask = torch.randn(B, TOKENS, TEXT_DIM), torch.ones(B, TOKENS, dtype=torch.bool)
    eps = torch.randn(B, 3, 32, 32)
    baseline = model_from_args(resolve_model_args(ModelConfig(preset="tiny", family="cross_attention_fm", **SMALL),
                                                  (3, 32, 32), TEXT_DIM, TOKENS))
    assert not baseline.source_is_learned and not baseline.source_from_text
    for model in (now, baseline):  # encode_source is encode_text for the text_ve source, in both families
        by_source = model.encode_source({"text_emb": emb, "text_mask": mask}, eps=eps)
        assert all(torch.equal(a, b) for a, b in zip(by_source, model.encode_text(emb, mask, eps=eps)))


def test_refused_shapes_and_pairs_name_the_values():
    with pytest.raises(ValueError, match=r"image \(3, 32, 32\) must shrink to the latent \(4, 12, 12\)"):
        ImageVE((3, 32, 32), (4, 12, 12))
    with pytest.raises(ValueError, match=r"image \(3, 32, 32\) must shrink to the latent \(4, 64, 64\)"):
        ImageVE((3, 32, 32), (4, 64, 64))
    with pytest.raises(ValueError, match=r"built for images \(3, 32, 32\), got \(3, 16, 16\)"):
        ImageVE((3, 32, 32), (4, 8, 8))(torch.zeros(1, 3, 16, 16))
    base = ModelConfig(preset="tiny", family="cross_attention_fm")
    with pytest.raises(ValueError, match=r"task.source='image_ve' / task.target='depth'"):
        resolve_model_args(base, (1, 32, 32), TEXT_DIM, TOKENS, source="image_ve", target="depth",
                           source_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="source image_ve needs source_shape"):
        model_from_args(resolve_model_args(ModelConfig(preset="tiny"), (1, 32, 32), TEXT_DIM, TOKENS,
                                           source="image_ve", target="depth"))
    with pytest.raises(ValueError, match="caption_vocab, caption_tokens\\), got 0 and 16"):
        model_from_args(resolve_model_args(ModelConfig(preset="tiny"), (4, 8, 8), TEXT_DIM, TOKENS,
                                           source="image_ve", target="caption", source_shape=(3, 32, 32)))
    with pytest.raises(ValueError, match="source must be one of .* got 'pixels' and 'image'"):
        model_from_args(resolve_model_args(ModelConfig(preset="tiny"), (3, 32, 32), TEXT_DIM, TOKENS,
                                           source="pixels"))
    with pytest.raises(ValueError, match="objective.contrastive='text_text'.*got source 'image_ve'"):
        model_from_args(resolve_model_args(ModelConfig(preset="tiny"), (1, 32, 32), TEXT_DIM, TOKENS,
                                           contrastive="text_text", source="image_ve", target="depth",
                                           source_shape=(3, 32, 32)))

"""The FLIP model: registry sizes and shapes of one's own, masking, towers, temperature."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flip_ds.config import load_recipe
from flip_ds.models.attention import EAGER_MAX_TOKENS, resolve_attention, use_attention
from flip_ds.models.config import REGISTRY, ModelConfig, TowerSizes
from flip_ds.models.flip import FLIP
from flip_ds.models.flops import flops_per_sample
from flip_ds.models.info import count_params
from flip_ds.models.vision import random_masking

VOCAB = 32000


def independent_param_count(s: TowerSizes, vocab: int, ctx: int = 32) -> tuple[int, int, int]:
    """Transformer arithmetic, written without looking at the modules: per block of width d and MLP
    width h, 4 d^2 + 2 d h + h + 9 d (qkv 3d^2+3d, proj d^2+d, fc1 dh+h, fc2 hd+d, two LayerNorms
    4d), 12 d^2 + 13 d at h = 4d; h is int(d * mlp_ratio), timm's rounding."""

    def blocks(d: int, depth: int, mlp_ratio: float) -> int:
        h = int(d * mlp_ratio)
        return depth * (4 * d * d + 2 * d * h + h + 9 * d)

    patches = (s.image_size // s.patch_size) ** 2
    d = s.vision_width
    image = 3 * s.patch_size**2 * d + d + patches * d + d + blocks(d, s.vision_depth, s.vision_mlp_ratio) + 2 * d
    t = s.text_width
    text = vocab * t + ctx * t + blocks(t, s.text_depth, s.text_mlp_ratio) + 2 * t
    total = image + text + d * s.embed_dim + t * s.embed_dim + 1
    return image, text, total


def counted(counts: dict[str, int]) -> tuple[int, int, int]:
    return counts["params_image"], counts["params_text"], counts["params_total"]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_param_counts_match_formula(name):
    assert counted(count_params(name, VOCAB)) == independent_param_count(REGISTRY[name], VOCAB)


# a shape in no registry: odd patch grid (6 x 6 of 8 px), an MLP of 2.5 x (150 features), a text
# tower wider than the image tower with a 3 x MLP, an embedding narrower than both
CUSTOM = TowerSizes(image_size=48, patch_size=8, vision_width=60, vision_depth=3, vision_heads=5, text_width=96,
                    text_depth=2, text_heads=6, embed_dim=40, vision_mlp_ratio=2.5, text_mlp_ratio=3.0)
CUSTOM_RECIPE = ["model.name=mine", "model.image_size=48",
                 "model.vision={patch_size: 8, width: 60, depth: 3, heads: 5, mlp_ratio: 2.5}",
                 "model.text={width: 96, depth: 2, heads: 6, mlp_ratio: 3.0}", "model.embed_dim=40",
                 "model.pos_embed=learned", "phases=[{name: p, samples: 64}]"]


def test_a_recipes_own_shape_builds_that_model():
    cfg = load_recipe(None, CUSTOM_RECIPE).model
    assert cfg.name == "mine" and cfg.sizes == dataclasses.replace(CUSTOM, image_size=224)  # 224: unless given
    assert cfg.resolved_image_size == 48 and cfg.num_patches == 36
    assert counted(count_params(cfg, VOCAB)) == independent_param_count(CUSTOM, VOCAB)
    model = FLIP(cfg, vocab_size=VOCAB)
    assert model.visual.blocks[0].mlp.fc1.out_features == 150 and model.text.blocks[0].mlp.fc1.out_features == 288
    assert model.visual.blocks[0].attn.num_heads == 5 and model.text.blocks[0].attn.num_heads == 6
    images, tokens = torch.randn(2, 3, 48, 48), torch.tensor([[2, 5, 3, 0]] * 2)
    with torch.no_grad():
        image_emb, text_emb, _ = model(images, tokens, 0.5)
    assert image_emb.shape == text_emb.shape == (2, 40)


@pytest.mark.parametrize("name", [*REGISTRY, "mine"])
def test_flops_are_what_torch_counts_in_the_forward(name):
    """flops_per_sample against torch's FlopCounterMode over a real forward, on the meta device (shapes
    only, so g/14 costs nothing) and with eager attention, whose q @ k and attention @ v are matmuls
    the counter sees (it does not count CPU SDPA kernels)."""
    cfg = load_recipe(None, CUSTOM_RECIPE).model if name == "mine" else ModelConfig(name=name)
    side = cfg.resolved_image_size
    with torch.device("meta"):
        model = FLIP(cfg, vocab_size=1000).eval()
        images, tokens = torch.randn(1, 3, side, side), torch.randint(4, 1000, (1, cfg.context_length))
    use_attention(model, "eager")
    for mask in (0.0, 0.75):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images, tokens, mask)
        assert counter.get_total_flops() == flops_per_sample(cfg, mask).forward, mask


def test_model_info_counts_a_recipes_own_shape_and_every_registry_size(tmp_path, capsys):
    from flip_ds.cli import main

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("model:\n  name: mine\n  image_size: 48\n  pos_embed: learned\n"
                      "  vision: {patch_size: 8, width: 60, depth: 3, heads: 5, mlp_ratio: 2.5}\n"
                      "  text: {width: 96, depth: 2, heads: 6, mlp_ratio: 3.0}\n  embed_dim: 40\n")
    assert main(["model-info", "--config", str(recipe), "--vocab-size", str(VOCAB), "--masks", "0", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["model"], row["image_size"], row["sizes"]["vision_mlp_ratio"]) == ("mine", 48, 2.5)
    assert counted(row) == independent_param_count(CUSTOM, VOCAB)
    cfg = load_recipe(None, CUSTOM_RECIPE).model
    assert row["flops"][0]["forward_gflops"] == pytest.approx(flops_per_sample(cfg).forward / 1e9)
    assert main(["model-info", "--json"]) == 0
    assert [r["model"] for r in json.loads(capsys.readouterr().out)] == list(REGISTRY)
    assert main(["model-info", "--model", "G/14"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_sizes_beside_a_registry_name_may_spell_it_out():
    from flip_ds.models.config import TextShape, VisionShape

    spelled = ModelConfig(name="B/16", vision=VisionShape(patch_size=16, width=768), text=TextShape(heads=8),
                          embed_dim=512)
    assert spelled.sizes == REGISTRY["B/16"]
    assert ModelConfig.of_shape("b16-by-hand", REGISTRY["B/16"]).sizes == REGISTRY["B/16"]


# OpenCLIP's published profile (docs/model_profile.csv: image tower incl. projection, M params;
# GFLOPs per 224-px image)
OPENCLIP_IMAGE = {"S/16": (21.81, 9.2), "B/32": (87.85, 8.82), "B/16": (86.19, 35.13), "L/14": (303.97, 162.03),
                  "H/14": (632.08, 334.59), "g/14": (1012.65, 534.06)}


@pytest.mark.parametrize("name", list(OPENCLIP_IMAGE))
def test_image_tower_matches_openclip_published(name):
    params, gflops = OPENCLIP_IMAGE[name]
    s = REGISTRY[name]
    ours = count_params(name, VOCAB)["params_image"] + s.vision_width * s.embed_dim
    assert ours / 1e6 == pytest.approx(params, rel=0.02)
    assert flops_per_sample(ModelConfig(name=name)).image / 1e9 == pytest.approx(gflops, rel=0.02)


def test_vit_h_image_tower_is_about_632m():
    s = REGISTRY["H/14"]
    image = count_params("H/14", VOCAB)["params_image"] + s.vision_width * s.embed_dim
    assert image / 1e6 == pytest.approx(632, rel=0.01)


def test_masking_keeps_exact_count_distinct_subsets_and_is_seeded():
    x = torch.arange(4 * 196, dtype=torch.float32).view(4, 196, 1).expand(4, 196, 8).contiguous()
    kept = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert kept.shape == (4, 49, 8)
    ids = [set(row[:, 0].tolist()) for row in kept]
    assert all(len(s) == 49 for s in ids)
    assert len({frozenset(s) for s in ids}) == 4  # each sample its own subset
    again = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)
    other = random_masking(x, 0.75, torch.Generator().manual_seed(1))
    assert not torch.equal(kept, other)
    for ratio, keep in [(0.5, 98), (0.0, 196), (0.3, 137)]:
        assert random_masking(x, ratio, torch.Generator().manual_seed(0)).shape[1] == keep


def tiny(**kw) -> FLIP:
    torch.manual_seed(0)
    return FLIP(ModelConfig(name="tiny", **kw), vocab_size=100).eval()


def test_ratio_zero_equals_unmasked_forward_bit_for_bit():
    model = tiny(activation_checkpointing=False)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        plain = model.visual.forward_features(images)  # timm's own forward: no masking code involved
        ours = model.visual(images, 0.0)
    assert torch.equal(ours, plain.mean(dim=1))


def test_cls_is_always_kept_and_encoder_sees_only_kept_tokens():
    model = tiny()
    seen = []
    model.visual.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.visual(images, 0.75, torch.Generator().manual_seed(0))
    tokens = seen[0]
    assert tokens.shape[1] == 1 + 16  # CLS + 25% of 64 patches
    assert torch.allclose(tokens[:, 0], model.visual.cls_token[0, 0].expand(2, -1))


def test_gradients_reach_only_kept_patches():
    model = tiny(pos_embed="learned")
    images = torch.randn(1, 3, 64, 64)
    model.visual(images, 0.5, torch.Generator().manual_seed(3)).sum().backward()
    pos_grad = model.visual.pos_embed.grad[0].abs().sum(dim=-1)
    assert int((pos_grad > 0).sum()) == 32  # exactly the kept half of the 64 positions


def test_sincos_pos_embed_is_fixed_and_learned_is_trainable():
    assert not tiny().visual.pos_embed.requires_grad
    assert tiny(pos_embed="learned").visual.pos_embed.requires_grad


def test_pooling_avg_includes_cls_and_cls_pool_takes_token_zero():
    images = torch.randn(2, 3, 64, 64)
    for pool in ("avg", "cls"):
        model = tiny(pool=pool)
        with torch.no_grad():
            tokens = model.visual.forward_features(images)
            expected = tokens.mean(dim=1) if pool == "avg" else tokens[:, 0]
            assert torch.allclose(model.visual(images), expected, atol=1e-6)


def test_text_padding_is_really_masked():
    model = tiny()
    tokens = torch.tensor([[2, 10, 11, 12, 3, 0, 0, 0]])
    with torch.no_grad():
        a = model.encode_text(torch.nn.functional.pad(tokens, (0, 4)))
        b = model.encode_text(tokens)
    assert torch.allclose(a, b, atol=1e-5)  # more padding changes nothing: pads are never attended


def test_causal_text_pools_eos_and_ignores_later_tokens():
    model = tiny(text_attention="causal")
    a = torch.tensor([[2, 10, 11, 3, 0, 0]])
    b = torch.tensor([[2, 10, 11, 3, 57, 58]])  # other tokens after EOS: the causal EOS query never sees them
    c = torch.tensor([[2, 10, 12, 3, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(model.encode_text(a), model.encode_text(b))
        assert not torch.allclose(model.encode_text(a), model.encode_text(c))


def _text_block_input_lengths(model: FLIP, tokens: torch.Tensor, ratio: float) -> tuple[torch.Tensor, list[int]]:
    lengths = []
    hook = model.text.blocks[0].register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        out = model.encode_text(tokens, ratio, torch.Generator().manual_seed(0))
    hook.remove()
    return out, lengths


@pytest.mark.parametrize("text_attention", ["bidirectional", "causal"])
def test_text_masking_drops_tokens_so_the_tower_runs_on_fewer(text_attention):
    model = tiny(activation_checkpointing=False, text_attention=text_attention)
    tokens = torch.tensor([[2] + list(range(10, 30)) + [3] + [0] * 10] * 3)  # 32 tokens, 22 real
    full, full_lengths = _text_block_input_lengths(model, tokens, 0.0)
    masked, masked_lengths = _text_block_input_lengths(model, tokens, 0.5)
    assert full_lengths == [32] and masked_lengths == [16]
    assert not torch.allclose(masked, full)
    with torch.no_grad():
        assert torch.equal(full, model.encode_text(tokens))  # ratio 0 is the unmasked tower, bit for bit


def test_text_masking_keeps_the_pooled_token_and_pad_first_drops_padding_before_words():
    from flip_ds.models.text import drop_tokens

    tokens = torch.tensor([[2] + list(range(10, 30)) + [3] + [0] * 10] * 64)  # 22 real, 10 pads
    valid = tokens != 0
    x = torch.arange(32.0).expand(64, 32).unsqueeze(-1)  # each token carries its position
    eos_at = torch.full((64,), 21)
    for pad_first, keep_at in ((False, torch.zeros(64, dtype=torch.long)), (True, eos_at)):
        kept, kept_valid, pool_at = drop_tokens(x, valid, keep_at, 0.5, pad_first, torch.Generator().manual_seed(0))
        positions = kept.squeeze(-1).long()
        assert positions.shape == (64, 16) and (positions.diff(dim=1) > 0).all()  # kept in their order
        assert torch.equal(kept_valid, positions < 22)
        assert torch.equal(positions[torch.arange(64), pool_at], keep_at)  # the pooled token is still there
        pads_kept = (~kept_valid).sum(dim=1)
        if pad_first:  # 16 kept of 22 real: every pad goes first, then 6 random words
            assert (pads_kept == 0).all()
            assert len({tuple(row.tolist()) for row in positions}) > 1
        else:  # any token may go: about 15 x 10/31 pads are kept per row
            assert 3.0 < pads_kept.float().mean().item() < 7.0


def test_logit_scale_starts_at_flips_value_and_is_fp32():
    model = tiny()
    img, txt, scale = model(torch.randn(2, 3, 64, 64), torch.tensor([[2, 5, 3, 0]] * 2))
    assert torch.allclose(img.norm(dim=-1), torch.ones(2)) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    assert model.logit_scale.shape == (1,) and scale.shape == (1,) and scale.dtype == torch.float32
    assert scale.item() == pytest.approx(1 / 0.07, abs=1e-4)  # 14.2857
    assert scale.item() == pytest.approx(14.29, abs=0.005)


def test_logit_scale_never_exceeds_100_after_steps_that_push_it_up():
    model = tiny()
    opt = torch.optim.SGD([model.logit_scale], lr=1.0)
    for _ in range(3):
        _, _, scale = model(torch.randn(2, 3, 64, 64), torch.tensor([[2, 5, 3, 0]] * 2))
        assert scale.item() <= 100.0 + 1e-4  # exp(log 100) in fp32 is 100.0000076
        opt.zero_grad()
        (-scale).sum().backward()  # wants a larger scale, i.e. a smaller tau
        opt.step()
    assert model.logit_scale.exp().item() > 100.0  # the raw parameter went past the limit ...
    _, _, scale = model(torch.randn(2, 3, 64, 64), torch.tensor([[2, 5, 3, 0]] * 2))
    assert scale.item() == pytest.approx(100.0, rel=1e-6)  # ... the forward still clips it to tau 0.01
    (-scale).sum().backward()
    assert model.logit_scale.grad.item() == 0.0  # and, as jnp.clip, passes no gradient beyond it


def test_weight_decay_rules_name_the_parameters_they_spare():
    from flip_ds.models.flip import decay_exempt

    model = tiny()
    flip, openclip = decay_exempt(model, "flip"), decay_exempt(model, "openclip")
    spared_by_both = {"visual.patch_embed.proj.bias", "visual.blocks.0.norm1.weight", "visual.blocks.0.norm1.bias",
                      "visual.blocks.0.attn.qkv.bias", "visual.blocks.3.mlp.fc2.bias", "visual.norm.weight",
                      "text.blocks.0.norm2.weight", "text.norm.bias"}
    assert spared_by_both <= flip and spared_by_both <= openclip
    assert flip - openclip == {"visual.pos_embed", "text.pos_embed"}
    assert openclip - flip == {"visual.cls_token", "logit_scale"}
    decayed_by_both = {"visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight", "text.token_embed.weight",
                       "visual_proj.weight", "text_proj.weight"}
    assert not decayed_by_both & (flip | openclip)
    names = {name for name, _ in model.named_parameters()}
    assert flip <= names and openclip <= names
    assert len(flip) == len([n for n in names if n.endswith(".bias") or "norm" in n]) + 2


@pytest.mark.parametrize("text_attention", ["bidirectional", "causal"])
def test_eager_attention_matches_sdpa_with_padding_masking_and_causal(text_attention):
    """The eager path a CPU bf16 step trains on computes what SDPA computes (checked in fp32, where
    neither rounds): padded captions, masked patches and text, both text attentions."""
    model = tiny(text_attention=text_attention)
    images = torch.randn(3, 3, 64, 64)
    tokens = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 12, 3, 0, 0, 0], [2, 13, 14, 15, 16, 3]])

    def embeddings() -> list[torch.Tensor]:
        torch.manual_seed(0)
        return list(model(images, tokens, 0.5, 0.3, torch.Generator().manual_seed(1))[:2])

    def on(path: str) -> list[torch.Tensor]:
        use_attention(model, path)
        return embeddings()

    with torch.no_grad():
        fused, eager = on("sdpa"), on("eager")
        model.to(torch.bfloat16)  # the precision the eager path trains in: its scores are rounded to bf16
        images = images.to(torch.bfloat16)
        fused_bf16, eager_bf16 = on("sdpa"), on("eager")
    for a, b in zip(fused, eager):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(fused_bf16, eager_bf16):  # unit vectors: a cosine near 1 is agreement
        assert torch.nn.functional.cosine_similarity(a.float(), b.float()).min() > 0.999


def test_auto_attention_is_eager_only_for_short_cpu_bf16_phases():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert resolve_attention("auto", "cpu", bf16, EAGER_MAX_TOKENS) == "eager"
    assert resolve_attention("auto", "cpu", bf16, EAGER_MAX_TOKENS + 1) == "sdpa"  # long sequences keep SDPA
    assert resolve_attention("auto", "cpu", fp32, 2) == "sdpa"  # fp32 keeps SDPA
    assert resolve_attention("auto", "cuda", bf16, 2) == "sdpa"  # GPUs keep SDPA
    assert resolve_attention("eager", "cuda", fp32, 500) == "eager"  # a forced path is kept
    for name in ("B/16", "L/14"):  # every mask of the registry's 224 px shapes is eager (197 and 257 tokens unmasked)
        shape = ModelConfig(name=name)
        paths = [resolve_attention("auto", "cpu", bf16, shape.image_tokens(m)) for m in (0.0, 0.5, 0.75)]
        assert paths == ["eager"] * 3, name
    assert resolve_attention("auto", "cpu", bf16, ModelConfig(name="B/16", image_size=384).image_tokens(0.0)) == "sdpa"
    model = tiny()
    layers = [m for m in model.modules() if hasattr(m, "fused_attn")]
    assert len(layers) == 8 and all(layer.fused_attn for layer in layers)  # timm's default: SDPA, both towers
    use_attention(model, "eager")
    assert not any(layer.fused_attn for layer in layers)
    use_attention(model, "sdpa")
    assert all(layer.fused_attn for layer in layers)



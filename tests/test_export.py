"""Export without DeepSpeed: the timm vision tower (strict load, same features) and the whole-model file."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch

from flip_ds import load
from flip_ds.checkpoint import Checkpoint, build_from
from flip_ds.cli import main
from flip_ds.config import load_recipe
from flip_ds.config_loader import UsageError
from flip_ds.data.tokenizer import Tokenizer, train_tokenizer
from flip_ds.export import export_model, export_timm, timm_create_call
from flip_ds.models.flip import build_model

CAPTIONS = [f"a {size} {color} {shape} on a {bg} background" for size in ("small", "large")
            for color in ("red", "green", "blue", "yellow") for shape in ("square", "circle", "triangle")
            for bg in ("white", "black")]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return train_tokenizer(CAPTIONS, str(tmp_path_factory.mktemp("tok") / "spm"), vocab_size=40)


TINY_32 = ["model.name=tiny", "model.image_size=32"]
# a vision tower in no registry: 30-px images in 6-px patches (a 5 x 5 grid), 28 wide with 61 MLP
# features, where 61 / 28 * 28 is 60.99999...: a ratio read naively off the module builds timm's
# tower one feature short
ODD_SHAPE = ["model.name=odd", "model.image_size=30",
             "model.vision={patch_size: 6, width: 28, depth: 2, heads: 4, mlp_ratio: 2.1786}",
             "model.text={width: 32, depth: 1, heads: 2}", "model.embed_dim=24"]


def fresh_checkpoint(tokenizer_file: str, pool: str, seed: int = 0, model: list[str] = TINY_32) -> Checkpoint:
    """A randomly initialised FLIP model (`model`: its recipe overrides) as a Checkpoint (what
    read_checkpoint returns)."""
    recipe = load_recipe(None, [*model, f"model.pool={pool}", "model.context_length=16",
                                "phases=[{name: p, samples: 64}]"])
    with open(tokenizer_file, "rb") as f:
        tok_bytes = f.read()
    torch.manual_seed(seed)
    model = build_model(recipe.model, Tokenizer(tokenizer_file, 16).vocab_size)
    for p in model.parameters():  # move every weight off its init so nothing matches by accident
        p.data.add_(torch.randn_like(p) * 0.02)
    return Checkpoint(state_dict=model.state_dict(), recipe=recipe, tokenizer_model=tok_bytes, meta={"step": 7},
                      source="test")


def assert_timm_twin(ckpt: Checkpoint, out, width: int) -> dict[str, object]:
    """Export `ckpt`'s vision tower to `out`, load it as a user would paste the printed code (strict),
    and check that timm's model computes our features; returns create_model's kwargs."""
    kwargs = export_timm(ckpt, out)
    scope: dict = {"timm": timm, "safetensors": safetensors}
    exec(timm_create_call(kwargs, out), scope)
    tm = scope["model"].eval()
    with safetensors.safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["timm_kwargs"]) == kwargs
    flip_model, _ = build_from(ckpt)
    size = ckpt.recipe.model.resolved_image_size
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = flip_model.visual(images), tm(images)
    assert theirs.shape == ours.shape == (3, width)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert ours.std() > 0.1  # real features, not a constant both sides could agree on
    return kwargs


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_timm_export_loads_strictly_and_gives_the_same_features(tmp_path, tokenizer_file, pool):
    kwargs = assert_timm_twin(fresh_checkpoint(tokenizer_file, pool), tmp_path / "vision.safetensors", 128)
    assert kwargs["global_pool"] == ("avg" if pool == "avg" else "token")


def test_timm_export_of_a_shape_of_ones_own(tmp_path, tokenizer_file):
    ckpt = fresh_checkpoint(tokenizer_file, "avg", model=ODD_SHAPE)
    kwargs = assert_timm_twin(ckpt, tmp_path / "odd.safetensors", 28)
    assert (kwargs["img_size"], kwargs["patch_size"], kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"]) == \
        (30, 6, 28, 2, 4)
    state = safetensors.torch.load_file(str(tmp_path / "odd.safetensors"))
    assert state["blocks.0.mlp.fc1.weight"].shape == (61, 28) and state["pos_embed"].shape == (1, 25, 28)


def test_timm_state_dict_without_a_key_fails_strict_load(tmp_path, tokenizer_file):
    """The strict load above is meaningful: a tower missing one tensor is refused by timm."""
    ckpt = fresh_checkpoint(tokenizer_file, "avg")
    kwargs = export_timm(ckpt, tmp_path / "v.safetensors")
    state = safetensors.torch.load_file(str(tmp_path / "v.safetensors"))
    state.pop("norm.weight")
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    with pytest.raises(RuntimeError, match="norm.weight"):
        model.load_state_dict(state, strict=True)


def test_whole_model_export_is_self_contained(tmp_path, tokenizer_file):
    ckpt = fresh_checkpoint(tokenizer_file, "avg", seed=3)
    out = tmp_path / "model.safetensors"
    export_model(ckpt, out)
    (tmp_path / "tokenizer_gone").mkdir()  # nothing beside the file is needed
    model, tokenizer, recipe = load(out)
    assert not model.training
    assert recipe.model.pool == "avg" and recipe.model.image_size == 32 and recipe.phases[0].samples == 64
    for key, value in ckpt.state_dict.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert tokenizer(CAPTIONS).tolist() == Tokenizer(tokenizer_file, 16)(CAPTIONS).tolist()
    with safetensors.safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["meta"]) == {"step": 7}


def test_load_refuses_what_it_cannot_read(tmp_path, tokenizer_file):
    ckpt = fresh_checkpoint(tokenizer_file, "avg")
    export_timm(ckpt, tmp_path / "vision.safetensors")
    with pytest.raises(UsageError, match="not a flip-ds export"):
        load(tmp_path / "vision.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(UsageError, match="not a safetensors file"):
        load(tmp_path / "junk.safetensors")
    with pytest.raises(UsageError, match="does not exist"):
        load(tmp_path / "missing")
    (tmp_path / "run").mkdir()
    with pytest.raises(UsageError, match="is not a flip-ds checkpoint"):
        load(tmp_path / "run")
    other = fresh_checkpoint(tokenizer_file, "avg")
    other.state_dict = {k: v for k, v in other.state_dict.items() if k != "text_proj.weight"}
    export_model(other, tmp_path / "partial.safetensors")
    with pytest.raises(UsageError, match="missing \\['text_proj.weight'\\]"):
        load(tmp_path / "partial.safetensors")


def test_export_cli_needs_an_output(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "give --out and/or --timm-out" in capsys.readouterr().err

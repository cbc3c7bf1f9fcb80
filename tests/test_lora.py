"""LoRA through PEFT: which modules the target groups adapt, that every adapted module acts on
the output, the pipeline round trip (weights and alpha), fusing, and loading errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffusers_mdit import (
    DiffiTPipeline,
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    MDiTPipeline,
    MDiTTextToImagePipeline,
)
from diffusers_mdit.lora import (
    LORA_TARGET_GROUPS,
    get_lora_metadata,
    get_lora_state_dict,
    lora_config,
)
from diffusers_mdit.testing import (
    TINY_DIFFIT_UNET,
    ddim_x0,
    randomize,
    tiny_mdit,
    tiny_text_encoder,
)

LORA_FILE = "pytorch_lora_weights.safetensors"


def adapted_modules(model: nn.Module) -> set[str]:
    return {
        name.removesuffix(".lora_A")
        for name, _ in model.named_modules()
        if name.endswith(".lora_A")
    }


def perturb_lora_b(
    model: nn.Module, seed: int = 1, only: str | None = None, std: float = 0.1
) -> None:
    """Random ``lora_B`` (PEFT starts it at zero, where no test of the adapter could fail)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and (only is None or name.startswith(f"{only}.lora_B")):
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def model_inputs(model: nn.Module) -> dict:
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, 4, 8, 8, generator=generator),
        timestep=torch.tensor([10.0, 500.0]),
    )
    if model.config.num_classes:
        inputs["class_labels"] = torch.tensor([0, 1])
    return inputs


def predict(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(model)).sample


def sample(pipe, **call) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(num_inference_steps=2, generator=generator, output_type="latent", **call).images


# -- target groups ----------------------------------------------------------------------------


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def test_default_targets_are_the_blocks_attention_and_feed_forward_projections():
    model = tiny_mdit(num_classes=3)
    # By hand: every Linear inside a block except the modulation projections (norm*.linear).
    in_blocks = [n for n in linear_names(model) if "_blocks." in n and ".norm" not in n]
    assert len(in_blocks) == 2 * 6 + 2 * 12 + 6  # 2 outer, 2 core, 1 aggregate block
    model.add_adapter(lora_config(rank=2))
    assert adapted_modules(model) == set(in_blocks)
    assert not any(n.startswith("condition_embedding") for n in adapted_modules(model))


@pytest.mark.parametrize(
    "model",
    [
        DiffiTTransformer2DModel(
            sample_size=8, hidden_size=32, num_layers=2, num_attention_heads=2
        ),
        DiffiTUNet2DModel(**TINY_DIFFIT_UNET),
    ],
    ids=["diffit", "diffit_unet"],
)
def test_default_targets_of_diffit_models(model):
    expected = {
        n
        for n in linear_names(model)
        if n.endswith(
            (
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
                "attn.time_to_qkv",
                "attn.to_out.0",
                "mlp.net.0.proj",
                "mlp.net.2",
            )
        )
        and not n.startswith("time_token")
    }
    assert expected
    model.add_adapter(lora_config(rank=2))
    assert adapted_modules(model) == expected


def test_groups_and_module_names_select_targets():
    model = tiny_mdit(num_classes=3)
    model.add_adapter(lora_config(rank=2, target_modules=["cross_attention", "proj_in"]))
    cross = {
        f"core_blocks.{i}.cross_attn.{p}"
        for i in (0, 1)
        for p in ("to_q", "to_k", "to_v", "to_k_time", "to_v_time", "to_out.0")
    }
    assert adapted_modules(model) == cross | {"proj_in"}


def test_fresh_adapter_leaves_the_model_unchanged():
    model = tiny_mdit(num_classes=3)
    base = predict(model)
    model.add_adapter(lora_config(rank=4, alpha=8))
    assert torch.equal(predict(model), base)


@pytest.mark.parametrize("group", sorted(LORA_TARGET_GROUPS))
def test_every_adapted_module_changes_the_output(group):
    """Each module of the group, its lora_B perturbed alone, changes the prediction: no adapted
    layer is bypassed (the GeGLU input projection runs inside a fused autograd function)."""
    model = tiny_mdit(num_classes=3)
    base = predict(model)
    model.add_adapter(lora_config(rank=2, target_modules=group))
    names = sorted(adapted_modules(model))
    assert names
    for name in names:
        perturb_lora_b(model, only=name, std=1.0)
        # Keys pass a per-head LayerNorm and change the output least (~1e-4).
        assert (predict(model) - base).abs().max() > 1e-5, name
        with torch.no_grad():
            model.get_submodule(name).lora_B["default"].weight.zero_()


def test_adapted_feed_forwards_run_their_lora_layers_when_chunked(monkeypatch):
    """On CPU large inputs take the chunked feed-forward; with adapted projections it must fall
    back to the modules' own forwards, so every LoRA layer still acts."""
    from diffusers_mdit.models.layers import GeGLUFeedForward

    monkeypatch.setattr(GeGLUFeedForward, "chunk_bytes", 1)  # every feed-forward is chunked
    model = tiny_mdit(num_classes=3)
    base = predict(model)
    model.add_adapter(lora_config(rank=2, target_modules="feed_forward"))
    for name in sorted(adapted_modules(model)):
        perturb_lora_b(model, only=name, std=1.0)
        assert (predict(model) - base).abs().max() > 1e-5, name
        with torch.no_grad():
            model.get_submodule(name).lora_B["default"].weight.zero_()


# -- pipelines: save, load, fuse --------------------------------------------------------------


def mdit_pipeline():
    return MDiTPipeline(transformer=tiny_mdit(num_classes=3), scheduler=ddim_x0())


def text_pipeline():
    encoder, tokenizer = tiny_text_encoder()
    model = tiny_mdit(cross_attention_dim=32)
    return MDiTTextToImagePipeline(
        transformer=model, scheduler=ddim_x0(), text_encoder=encoder, tokenizer=tokenizer
    )


def diffit_pipeline():
    model = DiffiTTransformer2DModel(
        sample_size=8, hidden_size=32, num_layers=2, num_attention_heads=2, num_classes=3
    )
    return DiffiTPipeline(transformer=randomize(model), scheduler=DDIMScheduler())


PIPELINES = {
    "mdit": (mdit_pipeline, dict(class_labels=[0, 2])),
    "text": (text_pipeline, dict(prompt=["a red cube", "a cat"])),
    "diffit": (diffit_pipeline, dict(class_labels=[0, 2])),
}


def save_adapter(pipe, folder, rank=4, alpha=8.0, metadata=True):
    """Add a LoRA (seeded lora_A, random lora_B) to ``pipe.transformer``, save it to ``folder``."""
    torch.manual_seed(0)
    pipe.transformer.add_adapter(lora_config(rank=rank, alpha=alpha))
    perturb_lora_b(pipe.transformer)
    pipe.save_lora_weights(
        folder,
        transformer_lora_layers=get_lora_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=get_lora_metadata(pipe.transformer) if metadata else None,
    )


@pytest.mark.parametrize("kind", sorted(PIPELINES))
def test_lora_round_trip_through_a_saved_pipeline(tmp_path, kind):
    make, call = PIPELINES[kind]
    pipe = make()
    pipe.save_pretrained(tmp_path / "base")
    base = sample(pipe, **call)
    save_adapter(pipe, tmp_path / "lora")
    adapted = sample(pipe, **call)
    assert (adapted - base).abs().max() > 1e-3

    fresh = type(pipe).from_pretrained(tmp_path / "base")
    assert torch.equal(sample(fresh, **call), base)
    fresh.load_lora_weights(tmp_path / "lora", adapter_name="style")
    assert fresh.get_active_adapters() == ["style"]
    torch.testing.assert_close(sample(fresh, **call), adapted, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["mdit", "diffit"])
def test_lora_saved_with_the_old_attention_names_loads(tmp_path, kind):
    """LoRA files written before the diffusers attention naming (``to_out``, MDiT's
    ``to_k_cond``, DiffiT's fused ``to_qkv``) load to the same adapted model."""
    make, call = PIPELINES[kind]
    pipe = make()
    pipe.save_pretrained(tmp_path / "base")
    save_adapter(pipe, tmp_path / "lora")
    if kind == "diffit":  # a LoRA of the old fused to_qkv had one lora_A for q, k and v
        with torch.no_grad():
            for name, module in pipe.transformer.named_modules():
                if name.endswith("attn.to_q"):
                    attn = pipe.transformer.get_submodule(name.removesuffix(".to_q"))
                    for other in (attn.to_k, attn.to_v):
                        other.lora_A["default"].weight.copy_(module.lora_A["default"].weight)
    adapted = sample(pipe, **call)
    path = tmp_path / "lora" / LORA_FILE
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    state = {f"transformer.{k}": v for k, v in get_lora_state_dict(pipe.transformer).items()}
    legacy = {}
    for key, value in state.items():
        fused = re.match(r"^(.*attn)\.to_q\.(lora_[AB]\.weight)$", key)
        if kind == "diffit" and fused:
            prefix, part = fused.groups()
            parts = [state[f"{prefix}.to_{n}.{part}"] for n in "qkv"]
            legacy[f"{prefix}.to_qkv.{part}"] = parts[0] if "lora_A" in part else torch.cat(parts)
            continue
        if kind == "diffit" and re.match(r"^.*attn\.to_[kv]\.lora_", key):
            continue
        key = re.sub(r"(cross_attn)\.to_(k|v)\.lora_", r"\1.to_\2_cond.lora_", key)
        legacy[key.replace(".to_out.0.", ".to_out.")] = value
    assert not any(".to_out.0." in key for key in legacy)
    # The saved config names the old modules too.
    metadata = {k: v.replace("to_out\\\\.0", "to_out") for k, v in metadata.items()}
    save_file(legacy, path, metadata=metadata)

    fresh = type(pipe).from_pretrained(tmp_path / "base")
    fresh.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(sample(fresh, **call), adapted, rtol=0, atol=1e-6)


def test_alpha_survives_save_and_load(tmp_path, caplog):
    """Equal weights saved with alpha 8 and alpha 4 (scales 2 and 1) load and sample
    differently; saved without metadata they load as alpha = rank."""
    samples, states = {}, {}
    for name, alpha, metadata in [
        ("alpha8", 8.0, True),
        ("alpha4", 4.0, True),
        ("bare", 8.0, False),
    ]:
        pipe = mdit_pipeline()
        save_adapter(pipe, tmp_path / name, rank=4, alpha=alpha, metadata=metadata)
        states[name] = get_lora_state_dict(pipe.transformer)
        loaded = mdit_pipeline()
        loaded.load_lora_weights(tmp_path / name)
        config = loaded.transformer.peft_config["default_0"]
        assert (config.r, config.lora_alpha) == (4, alpha if metadata else 4)
        samples[name] = sample(loaded, class_labels=[0, 2])
    assert "alpha = rank" in caplog.text  # the warning when saving "bare"
    for key, value in states["alpha8"].items():
        assert torch.equal(value, states["alpha4"][key]) and torch.equal(value, states["bare"][key])

    with safe_open(tmp_path / "alpha8" / LORA_FILE, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 8.0
    assert (samples["alpha8"] - samples["alpha4"]).abs().max() > 1e-3
    torch.testing.assert_close(samples["bare"], samples["alpha4"], rtol=0, atol=1e-6)


def test_fuse_matches_the_adapter_and_unfuse_restores_the_base(tmp_path):
    pipe = mdit_pipeline()
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    base = sample(pipe, class_labels=[0, 2])
    save_adapter(pipe, tmp_path / "lora")
    adapted = sample(pipe, class_labels=[0, 2])

    pipe.fuse_lora()
    q = pipe.transformer.core_blocks[0].attn.to_q
    assert not torch.equal(q.base_layer.weight, weights["core_blocks.0.attn.to_q.weight"])
    torch.testing.assert_close(sample(pipe, class_labels=[0, 2]), adapted, rtol=0, atol=1e-5)

    pipe.unfuse_lora()
    torch.testing.assert_close(
        q.base_layer.weight, weights["core_blocks.0.attn.to_q.weight"], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(sample(pipe, class_labels=[0, 2]), adapted, rtol=0, atol=1e-6)
    pipe.unload_lora_weights()
    assert not adapted_modules(pipe.transformer)
    torch.testing.assert_close(sample(pipe, class_labels=[0, 2]), base, rtol=0, atol=1e-6)


def test_fused_and_unloaded_model_keeps_the_adapted_outputs(tmp_path):
    """The deployment path: fuse, drop the LoRA layers, a plain model remains."""
    pipe = mdit_pipeline()
    save_adapter(pipe, tmp_path / "lora")
    adapted = sample(pipe, class_labels=[0, 2])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert not adapted_modules(pipe.transformer)
    assert set(pipe.transformer.state_dict()) == set(tiny_mdit(num_classes=3).state_dict())
    torch.testing.assert_close(sample(pipe, class_labels=[0, 2]), adapted, rtol=0, atol=1e-5)


def test_adapter_weights_and_disabling(tmp_path):
    pipe = mdit_pipeline()
    base = sample(pipe, class_labels=[0, 2])
    save_adapter(pipe, tmp_path / "lora")
    adapted = sample(pipe, class_labels=[0, 2])
    loaded = mdit_pipeline()
    loaded.load_lora_weights(tmp_path / "lora", adapter_name="style")
    loaded.set_adapters("style", 0.0)
    torch.testing.assert_close(sample(loaded, class_labels=[0, 2]), base, rtol=0, atol=1e-6)
    loaded.set_adapters("style", 1.0)
    loaded.disable_lora()
    torch.testing.assert_close(sample(loaded, class_labels=[0, 2]), base, rtol=0, atol=1e-6)
    loaded.enable_lora()
    torch.testing.assert_close(sample(loaded, class_labels=[0, 2]), adapted, rtol=0, atol=1e-6)


# -- errors -----------------------------------------------------------------------------------


def test_loading_into_a_model_without_the_targeted_modules_raises(tmp_path):
    save_adapter(mdit_pipeline(), tmp_path / "lora")
    smaller = MDiTPipeline(
        transformer=tiny_mdit(num_classes=3, num_core_blocks=0), scheduler=ddim_x0()
    )
    with pytest.raises(ValueError, match=r"does not have: core_blocks\.1\.attn\.to_k"):
        smaller.load_lora_weights(tmp_path / "lora")
    assert not adapted_modules(smaller.transformer)


def test_loading_into_a_model_of_other_widths_raises(tmp_path):
    """Our error naming a mismatched weight, not PyTorch's list of size mismatches."""
    save_adapter(mdit_pipeline(), tmp_path / "lora")
    wider = MDiTPipeline(transformer=tiny_mdit(num_classes=3, core_dim=96), scheduler=ddim_x0())
    with pytest.raises(ValueError, match=r"LoRA weight \S+\.lora_[AB]\.weight .* other widths"):
        wider.load_lora_weights(tmp_path / "lora")


def test_pickle_is_refused(tmp_path):
    pipe = mdit_pipeline()
    with pytest.raises(ValueError, match="safe_serialization=False"):
        pipe.save_lora_weights(
            tmp_path,
            transformer_lora_layers={"a.lora_A.weight": torch.ones(1)},
            safe_serialization=False,
        )
    with pytest.raises(ValueError, match="use_safetensors=False"):
        pipe.load_lora_weights(tmp_path, use_safetensors=False)

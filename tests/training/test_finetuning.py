"""Fine-tuning to larger images (appendix J) and LoRA: what trains, what stays, what loads."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffusers_mdit import MDiTPipeline, MDiTTransformer2DModel
from diffusers_mdit.testing import TINY_MDIT, ddim_x0, tiny_mdit
from diffusers_mdit.training.finetuning import expand_core_patch, prepare_finetuning
from diffusers_mdit.training.trainer import add_arguments, train

NO_OUTER = dict(num_outer_in_blocks=0, num_outer_out_blocks=0)


def up(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of ``(B, C, H, W)``."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


# -- the replicated larger core patch ---------------------------------------------------------


def test_expanded_patch_maps_act_on_upsampled_tokens_as_the_old_ones_on_the_originals():
    model = tiny_mdit()
    expanded = tiny_mdit()
    expand_core_patch(expanded, 2)
    h = torch.randn(2, 8, 8, TINY_MDIT["outer_dim"])
    h_up = up(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(
        expanded.core_patch_embed(h_up), model.core_patch_embed(h), rtol=1e-5, atol=1e-5
    )
    core = torch.randn(2, 4, 4, TINY_MDIT["core_dim"])
    old = model.core_unpatch(core).permute(0, 3, 1, 2)
    new = expanded.core_unpatch(core).permute(0, 3, 1, 2)
    torch.testing.assert_close(new, up(old), rtol=1e-5, atol=1e-5)


def test_expanded_model_without_outer_level_is_exactly_the_old_one_on_upsampled_inputs():
    # Without outer blocks the patch maps are the whole story: the 4x4 model on a 2x-upsampled
    # input must reproduce the 2x2 model's output, upsampled, to float rounding.
    model = tiny_mdit(**NO_OUTER)
    expanded = tiny_mdit(**NO_OUTER)
    expand_core_patch(expanded, 2)
    assert expanded.config.core_patch_size == 4 and expanded.config.sample_size == 16
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), None
    with torch.no_grad():
        reference = up(model(x, t, class_labels=labels).sample)
        output = expanded(up(x), t).sample
        unexpanded = model(up(x), t).sample
    torch.testing.assert_close(output, reference, rtol=1e-5, atol=1e-5)
    assert (unexpanded - reference).norm() > 0.1 * reference.norm()  # the test can fail


def test_expanded_model_saves_and_loads_as_it_is(tmp_path):
    model = tiny_mdit()
    expand_core_patch(model, 2)
    model.save_pretrained(tmp_path)
    loaded = MDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.core_patch_size == 4
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([300])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t).sample, model(x, t).sample)


def test_unknown_mode_and_modes_needing_an_mdit_are_reported():
    with pytest.raises(ValueError, match="Unknown fine-tuning mode 'partial'"):
        prepare_finetuning(tiny_mdit(), "partial")
    with pytest.raises(ValueError, match="needs aggregate blocks"):
        prepare_finetuning(tiny_mdit(num_alternating_blocks=0), "aggregate")


# -- train_mdit.py --finetune ------------------------------------------------------------------


def pretrained_pipeline(folder) -> str:
    """A randomised tiny class-conditional MDiT for the digits (3 channels, 10 classes),
    saved as a pipeline: every parameter nonzero, so any update is visible."""
    model = tiny_mdit(in_channels=3, num_classes=10)
    MDiTPipeline(transformer=model, scheduler=ddim_x0()).save_pretrained(folder)
    return str(folder)


def finetune(tmp_path, mode: str, **extra):
    base = pretrained_pipeline(tmp_path / "base")
    values = dict(
        output_dir=str(tmp_path / mode), pretrained_model_name_or_path=base, finetune=mode,
        resolution=16, train_batch_size=4, max_train_steps=3, checkpointing_steps=3,
        learning_rate=1e-3, report_to="none", core_kernel_size=3, seed=0, **extra,
    )  # fmt: skip
    argv = []
    for key, value in values.items():
        argv += [f"--{key}"] if value is None else [f"--{key}", str(value)]
    train(add_arguments(argparse.ArgumentParser()).parse_args(argv))
    before = load_file(os.path.join(base, "transformer", "diffusion_pytorch_model.safetensors"))
    after_dir = os.path.join(tmp_path, mode, "transformer")
    after = load_file(os.path.join(after_dir, "diffusion_pytorch_model.safetensors"))
    return before, after, after_dir


def changed(before, after) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.mark.parametrize("use_ema", [False, True])
def test_aggregate_mode_changes_exactly_the_aggregate_blocks(tmp_path, use_ema):
    extra = dict(use_ema=None, ema_decay=0.5) if use_ema else {}
    before, after, folder = finetune(tmp_path, "aggregate", **extra)
    assert after.keys() == before.keys()
    assert changed(before, after) == {name for name in before if "aggregate" in name}
    config = MDiTTransformer2DModel.load_config(folder)
    assert config["core_attention_type"] == "neighborhood" and config["core_kernel_size"] == 3


def test_patch_mode_changes_exactly_the_patch_projections(tmp_path, capsys):
    before, after, folder = finetune(tmp_path, "patch")
    patch = {"core_patch_embed.proj.weight", "core_unpatch.proj.weight"}
    assert after.keys() == before.keys()
    assert {n for n in before if before[n].shape != after[n].shape} == patch  # grown 2x2 -> 4x4
    same_shape = {n for n in before if n not in patch}
    assert changed({n: before[n] for n in same_shape}, after) == set()
    grown = MDiTTransformer2DModel.from_pretrained(folder)
    assert grown.config.core_patch_size == 4 and grown.config.sample_size == 16
    # The projections did train: they differ from a fresh replication of the originals.
    replicated = MDiTTransformer2DModel.from_pretrained(tmp_path / "base" / "transformer")
    expand_core_patch(replicated, 2)
    for name in patch:
        assert not torch.equal(replicated.state_dict()[name], after[name])
    assert "fine-tuning mode 'patch'" in capsys.readouterr().out  # trainable vs total reported


def test_full_mode_changes_every_parameter(tmp_path):
    before, after, _ = finetune(tmp_path, "full")
    assert changed(before, after) == set(before)


def test_finetune_needs_a_pretrained_model_matching_the_data(tmp_path):
    parse = add_arguments(argparse.ArgumentParser()).parse_args
    with pytest.raises(ValueError, match="needs --pretrained_model_name_or_path"):
        train(parse(["--finetune", "patch", "--output_dir", str(tmp_path / "a")]))
    with pytest.raises(ValueError, match="no config.json"):
        train(parse(["--pretrained_model_name_or_path", str(tmp_path), "--output_dir",
                     str(tmp_path / "b"), "--report_to", "none"]))  # fmt: skip
    folder = tmp_path / "uncond"
    MDiTPipeline(transformer=tiny_mdit(in_channels=3), scheduler=ddim_x0()).save_pretrained(folder)
    with pytest.raises(ValueError, match="num_classes=0 but the training data needs 10"):
        train(parse(["--pretrained_model_name_or_path", str(folder), "--output_dir",
                     str(tmp_path / "c"), "--report_to", "none"]))  # fmt: skip


def test_lora_mode_trains_only_the_adapter_and_saves_it_for_the_base_pipeline(tmp_path, capsys):
    base = pretrained_pipeline(tmp_path / "base")
    argv = ["--output_dir", str(tmp_path / "lora"), "--pretrained_model_name_or_path", base,
            "--finetune", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--resolution", "16",
            "--train_batch_size", "4", "--max_train_steps", "3", "--checkpointing_steps", "3",
            "--learning_rate", "1e-3", "--report_to", "none", "--use_ema",
            "--ema_decay", "0.5"]  # fmt: skip
    train(add_arguments(argparse.ArgumentParser()).parse_args(argv))
    assert "fine-tuning mode 'lora'" in capsys.readouterr().out
    assert not (tmp_path / "lora" / "transformer").exists()  # the adapter only
    adapter = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B trained

    pipe = MDiTPipeline.from_pretrained(base)
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    labels, generator = [1, 7], lambda: torch.Generator().manual_seed(0)
    call = dict(class_labels=labels, height=16, width=16, num_inference_steps=3, output_type="pt")
    plain = pipe(generator=generator(), **call).images
    pipe.load_lora_weights(tmp_path / "lora")
    (config,) = pipe.transformer.peft_config.values()
    assert (config.r, config.lora_alpha) == (4, 8)  # alpha survives
    adapted = pipe(generator=generator(), **call).images
    assert not torch.allclose(plain, adapted)
    state = pipe.transformer.state_dict()
    base_weights = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert all(torch.equal(original[k], base_weights[k]) for k in original)  # base untouched

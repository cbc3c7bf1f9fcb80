"""Destructive testing: each switch changes exactly its block and is undone on exit; the
re-sampling is deterministic, so the deltas are the switches' effects."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.explain import cli
from diffusers_mdit.explain.common import block_names, capture_outputs
from diffusers_mdit.explain.destructive import (
    block_as_identity,
    destructive_test,
    image_deltas,
    outer_kernel,
    plot_destructive,
    rope_disabled,
)
from diffusers_mdit.testing import ddim_x0, tiny_mdit

NAMES = ["outer_in.0", "core.0", "aggregate.0", "core.1", "outer_out.0"]


@pytest.fixture(scope="module")
def model():
    return tiny_mdit(num_classes=10).eval()


def forward(model, switch=None):
    """Model output and every block's input and output, under ``switch`` if given."""
    torch.manual_seed(0)
    sample, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 7])
    blocks = dict(block_names(model))
    inputs = {}
    handles = [
        block.register_forward_pre_hook(
            lambda _m, args, name=name: inputs.__setitem__(name, args[0])
        )
        for name, block in blocks.items()
    ]
    try:
        with (
            torch.no_grad(),
            switch or contextlib.nullcontext(),
            capture_outputs(blocks) as outputs,
        ):
            out = model(sample, torch.tensor([500, 500]), class_labels=labels).sample
    finally:
        for handle in handles:
            handle.remove()
    return out, inputs, {name: values[0] for name, values in outputs.items()}


def no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def state(model):
    return [(b.attn.rope.enabled, b.attn.kernel_size) for _, b in block_names(model)]


@pytest.mark.parametrize("index", range(len(NAMES)))
@pytest.mark.parametrize("test", ["rope", "identity"])
def test_a_switch_changes_exactly_its_block_and_is_undone(model, test, index):
    name, block = block_names(model)[index]
    before_state = state(model)
    out, _, baseline = forward(model)
    switch = rope_disabled(block) if test == "rope" else block_as_identity(block)
    switched_out, inputs, switched = forward(model, switch)
    for earlier in NAMES[:index]:
        assert torch.equal(switched[earlier], baseline[earlier]), earlier
    assert not torch.allclose(switched[name], baseline[name], atol=1e-5)
    if test == "identity":
        assert torch.equal(switched[name], inputs[name])  # h = x
    assert not torch.allclose(switched_out, out, atol=1e-6)
    # undone: same output, no hooks, RoPE on, kernels unchanged
    assert torch.equal(forward(model)[0], out)
    assert no_hooks(model) and state(model) == before_state
    assert all(rope for rope, _ in state(model))


@pytest.mark.parametrize("name", ["outer_in.0", "outer_out.0"])
def test_outer_kernel_changes_exactly_its_block_and_is_undone(model, name):
    blocks = dict(block_names(model))
    assert blocks[name].attn.kernel_size == 3
    index = NAMES.index(name)
    out, _, baseline = forward(model)
    switched_out, _, switched = forward(model, outer_kernel(blocks[name], 1))
    for earlier in NAMES[:index]:
        assert torch.equal(switched[earlier], baseline[earlier])
    assert not torch.allclose(switched[name], baseline[name], atol=1e-5)
    assert not torch.allclose(switched_out, out, atol=1e-6)
    assert blocks[name].attn.kernel_size == 3
    assert torch.equal(forward(model)[0], out)


def test_switches_are_undone_when_an_exception_is_raised_inside(model):
    blocks = dict(block_names(model))
    out = forward(model)[0]
    before = state(model)
    for switch in (
        rope_disabled(blocks["core.1"]),
        block_as_identity(blocks["aggregate.0"]),
        outer_kernel(blocks["outer_in.0"], 1),
    ):
        with pytest.raises(RuntimeError, match="inside"), switch:
            raise RuntimeError("raised inside")
    assert state(model) == before and no_hooks(model)
    assert torch.equal(forward(model)[0], out)


@pytest.mark.parametrize("kernel", [0, 2, -3, 4, 3.0, "5", True])
def test_bad_kernels_are_refused(model, kernel):
    block = dict(block_names(model))["outer_in.0"]
    with pytest.raises(ValueError, match="odd positive int"), outer_kernel(block, kernel):
        pass
    assert block.attn.kernel_size == 3


def test_kernel_of_a_global_attention_block_is_refused(model):
    block = dict(block_names(model))["core.0"]  # tiny MDiT's core attention is global
    with pytest.raises(ValueError, match="global self-attention"), outer_kernel(block, 3):
        pass
    assert block.attn.kernel_size is None


def test_image_deltas_known_values():
    a = torch.zeros(1, 3, 2, 2)
    b = a.clone()
    b[0, 0, 0, 0] = 0.6  # MSE = 0.36 / 12 = 0.03
    mean, largest, psnr = image_deltas(b, a)
    assert mean == pytest.approx(0.05) and largest == pytest.approx(0.6)
    assert psnr == pytest.approx(10 * torch.log10(torch.tensor(1 / 0.03)).item())
    assert image_deltas(a, a) == (0.0, 0.0, float("inf"))


def test_end_to_end_on_a_tiny_pipeline_plots_and_cli(tmp_path):
    pipe = MDiTPipeline(transformer=tiny_mdit(num_classes=10), scheduler=ddim_x0())
    pipe.set_progress_bar_config(disable=True)
    result = destructive_test(
        pipe, kernels=(1,), num_images=2, num_inference_steps=2, progress=False
    )
    assert result.baseline_repeat_max_abs_delta == 0.0  # deterministic re-sampling
    assert result.class_labels == [0, 1] and result.baseline_kernels == {
        "outer_in.0": 3,
        "outer_out.0": 3,
    }
    keys = [(v.test, v.block, v.kernel) for v in result.variants]
    assert keys == [("rope", n, None) for n in NAMES] + [("identity", n, None) for n in NAMES] + [
        ("kernel", "outer_in.0", 1),
        ("kernel", "outer_out.0", 1),
    ]
    for v in result.variants:
        assert 0 < v.mean_abs_delta <= v.max_abs_delta <= 1
        assert 0 < v.psnr < float("inf")
    assert result.images["baseline"].shape == (2, 4, 8, 8)
    assert no_hooks(pipe.transformer)

    only_rope = destructive_test(
        pipe, tests=("rope",), num_images=2, num_inference_steps=2, progress=False
    )
    assert [v.mean_abs_delta for v in only_rope.variants] == [
        v.mean_abs_delta for v in result.variants if v.test == "rope"
    ]
    with pytest.raises(ValueError, match="Unknown destructive tests"):
        destructive_test(pipe, tests=("ropes",), progress=False)

    paths = plot_destructive(result, result.images, str(tmp_path / "figures"))
    names = sorted(p.rsplit("/", 1)[-1] for p in paths)
    assert names == ["destructive_identity.png", "destructive_kernel.png", "destructive_rope.png"]
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in paths)

    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    argv = ["destructive", str(tmp_path / "pipe"), "--output_dir", str(out), "--tests", "identity"]
    cli.main([*argv, "--num_images", "2", "--num_inference_steps", "2"])
    data = json.loads((out / "destructive.json").read_text())
    assert [v["block"] for v in data["variants"]] == NAMES
    assert data["baseline_repeat_max_abs_delta"] == 0.0 and "images" not in data
    assert (out / "destructive_identity.png").is_file()
    assert not (out / "destructive_rope.png").exists()

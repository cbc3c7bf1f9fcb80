"""diffusers' FirstBlockCache on latent DiffiT (``DiffiTTransformer2DModel.enable_cache``).

When the first block's residual has changed little since the last computed step, the hooks skip
the other blocks and return the first block's output plus the tail residual cached then. The
expected output of such a step is computed here without the cache, by replacing the last
block's output with that sum in an uncached copy of the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig

from diffusers_mdit import DiffiTPipeline
from diffusers_mdit.testing import ddim_x0, tiny_diffit

INPUTS = [
    (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.tensor(t))
    for seed, t in ((0, [500.0, 500.0]), (1, [480.0, 480.0]))
]


def block_outputs(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last block's outputs of an uncached forward."""
    seen = {}
    hooks = [
        block.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
        for i, block in ((0, model.blocks[0]), (-1, model.blocks[-1]))
    ]
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return seen[0], seen[-1]


def attention_calls(model) -> list[int]:
    calls = []
    for i, block in enumerate(model.blocks):
        block.attn.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    return calls


@pytest.fixture
def model():
    return tiny_diffit(num_layers=4)


def test_a_skipped_step_is_the_first_block_plus_the_cached_tail_residual(model):
    reference = copy.deepcopy(model)
    head_1, tail_1 = block_outputs(reference, INPUTS[0])
    head_2, _ = block_outputs(reference, INPUTS[1])
    replace = reference.blocks[-1].register_forward_hook(lambda m, a, out: head_2 + tail_1 - head_1)
    with torch.no_grad():
        expected = reference(*INPUTS[1]).sample
        replace.remove()
        full = reference(*INPUTS[1]).sample

    model.enable_cache(FirstBlockCacheConfig(threshold=1e9))  # always skip after a full step
    calls = attention_calls(model)
    with torch.no_grad():
        with model.cache_context("cond"):
            first = model(*INPUTS[0]).sample
            assert calls == [0, 1, 2, 3]
            skipped = model(*INPUTS[1]).sample
        assert calls == [0, 1, 2, 3, 0]  # only the first block ran
        assert torch.equal(first, reference(*INPUTS[0]).sample)
    torch.testing.assert_close(skipped, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(skipped, full, atol=1e-4)  # the skip changed the output


def test_a_large_change_recomputes_and_disabling_restores(model):
    reference = copy.deepcopy(model)
    model.enable_cache(FirstBlockCacheConfig(threshold=1e-6))
    calls = attention_calls(model)
    with torch.no_grad():
        with model.cache_context("cond"):
            outputs = [model(*inputs).sample for inputs in INPUTS]
        assert calls == [0, 1, 2, 3] * 2
        for out, inputs in zip(outputs, INPUTS, strict=True):
            assert torch.equal(out, reference(*inputs).sample)
        model.disable_cache()
        assert torch.equal(model(*INPUTS[1]).sample, reference(*INPUTS[1]).sample)


def test_other_cache_techniques_are_refused(model):
    with pytest.raises(NotImplementedError, match="FirstBlockCacheConfig only"):
        model.enable_cache(FasterCacheConfig())


def test_pipeline_with_guidance_switched_off_mid_run():
    """One cache state per batch layout: with guidance switched off half way the batch halves,
    which a single state would mix. Threshold 0 recomputes every step, so the images equal the
    uncached pipeline's; a large threshold skips steps and changes them, the same way in every
    call (the pipeline resets the cache after a call)."""

    def run(pipe):
        def off_half_way(p, i, t, kwargs):
            if i == 1:
                p._guidance_scale = 0.0
            return kwargs

        generator = torch.Generator().manual_seed(0)
        return pipe(
            class_labels=[1, 2],
            guidance_scale=3.0,
            num_inference_steps=4,
            generator=generator,
            output_type="latent",
            callback_on_step_end=off_half_way,
        ).images

    pipe = DiffiTPipeline(transformer=tiny_diffit(num_classes=3), scheduler=ddim_x0())
    uncached = run(pipe)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    assert torch.equal(run(pipe), uncached)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    skipping = run(pipe)
    assert not torch.allclose(skipping, uncached)
    assert torch.equal(run(pipe), skipping)  # the pipeline resets the cache after a call

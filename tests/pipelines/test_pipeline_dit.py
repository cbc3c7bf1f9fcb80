"""DiTBaselinePipeline: the original DiT sampled with every scheduler our objectives train with,
guidance through the model's null label, latent and pixel space, saving and loading."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_mdit import DiTBaselinePipeline, DiTBaselineTransformer2DModel, testing
from diffusers_mdit.testing import ddim_x0, tiny_vae


def tiny_dit(**overrides) -> DiTBaselineTransformer2DModel:
    return testing.tiny_dit(**{"in_channels": 3, "num_classes": 10, **overrides})


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "scheduler, out_channels",
    [
        (ddim_x0(), 3),
        (DDPMScheduler(), 3),
        (DDPMScheduler(variance_type="learned_range"), 6),
        (FlowMatchEulerDiscreteScheduler(), 3),
    ],
    ids=["x0-ddim", "epsilon-ddpm", "epsilon-learned-variance", "flow"],
)
def test_every_objectives_scheduler_samples_with_guidance(scheduler, out_channels):
    pipe = DiTBaselinePipeline(transformer=tiny_dit(out_channels=out_channels), scheduler=scheduler)
    out = pipe(class_labels=[1, 2], num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    assert out.images.shape == (2, 3, 8, 8) and torch.isfinite(out.images).all()


def test_guidance_mixes_the_label_and_the_null_label_num_classes():
    # One deterministic DDIM x0 step from t = 999 lands exactly on the predicted x0.
    model = tiny_dit()
    pipe = DiTBaselinePipeline(transformer=model, scheduler=ddim_x0())
    noise = torch.randn(2, 3, 8, 8, generator=generator())
    out = pipe(
        class_labels=[4, 7],
        latents=noise,
        num_inference_steps=1,
        guidance_scale=3.0,
        eta=0.0,
        output_type="latent",
    ).images
    t = torch.full((2,), 999)
    cond = model(noise, t, class_labels=torch.tensor([4, 7])).sample
    uncond = model(noise, t, class_labels=torch.tensor([10, 10])).sample
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond))


def test_latent_space_with_a_vae_and_a_reloaded_pipeline_samples_the_same(tmp_path):
    model = tiny_dit(in_channels=4)
    pipe = DiTBaselinePipeline(transformer=model, scheduler=ddim_x0(), vae=tiny_vae())
    images = pipe(class_labels=[3], num_inference_steps=2, generator=generator(), output_type="pt")
    assert images.images.shape == (1, 3, 16, 16)
    pipe.save_pretrained(tmp_path)
    again = DiTBaselinePipeline.from_pretrained(tmp_path)
    assert type(again.transformer) is DiTBaselineTransformer2DModel
    reloaded = again(
        class_labels=[3], num_inference_steps=2, generator=generator(), output_type="pt"
    )
    torch.testing.assert_close(reloaded.images, images.images)


def test_unconditional_model_uses_batch_size_and_rejects_guidance():
    pipe = DiTBaselinePipeline(transformer=tiny_dit(num_classes=0), scheduler=DDIMScheduler())
    images = pipe(batch_size=3, num_inference_steps=2, output_type="np").images
    assert images.shape == (3, 8, 8, 3)
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(batch_size=1, num_inference_steps=2, guidance_scale=2.0)


def test_bad_inputs_are_refused():
    pipe = DiTBaselinePipeline(transformer=tiny_dit(), scheduler=ddim_x0())
    with pytest.raises(ValueError, match="square"):
        pipe(class_labels=[1], height=8, width=12, num_inference_steps=1)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(class_labels=[1], height=9, width=9, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        pipe(class_labels=[11], num_inference_steps=1)


@pytest.mark.parametrize("family", ["dit", "diffit"])
def test_guidance_on_an_unconditional_model_is_refused(family):
    from diffusers_mdit import DiffiTPipeline
    from diffusers_mdit.testing import tiny_diffit

    if family == "dit":
        pipe = DiTBaselinePipeline(transformer=tiny_dit(num_classes=0), scheduler=ddim_x0())
    else:
        pipe = DiffiTPipeline(transformer=tiny_diffit(in_channels=3), scheduler=ddim_x0())
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        pipe(height=8, width=8, num_inference_steps=1, guidance_scale=4.0, output_type="pt")

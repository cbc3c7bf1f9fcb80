"""Pipelines end to end with tiny random components, in pixel space and with a tiny VAE."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_mdit import (
    DiffiTPipeline,
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    MDiTPipeline,
    MDiTTextToImagePipeline,
)
from diffusers_mdit.testing import (
    TINY_DIFFIT_UNET,
    ddim_x0,
    randomize,
    tiny_mdit,
    tiny_text_encoder,
    tiny_vae,
)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# -- MDiTPipeline ---------------------------------------------------------------------------------


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_mdit_pixel_space_output_types_and_non_square_sizes(output_type):
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0())
    out = pipe(
        class_labels=[1, 2],
        height=8,
        width=12,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=generator(),
        output_type=output_type,
    ).images
    if output_type == "pil":
        assert len(out) == 2 and isinstance(out[0], PIL.Image.Image) and out[0].size == (12, 8)
    elif output_type == "np":
        assert out.shape == (2, 8, 12, 3) and out.min() >= 0 and out.max() <= 1
    else:
        assert out.shape == (2, 3, 8, 12)


def test_mdit_with_vae_decodes_latents():
    vae = tiny_vae()
    pipe = MDiTPipeline(transformer=tiny_mdit(num_classes=10), scheduler=ddim_x0(), vae=vae)
    assert pipe.vae_scale_factor == 2
    latents = pipe(class_labels=[3], num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    images = pipe(class_labels=[3], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_same_seed_same_images_other_seed_other_images():
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0())

    def run(seed):
        return pipe(class_labels=[4], num_inference_steps=3, generator=generator(seed),
                    output_type="np").images  # fmt: skip

    assert np.array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))


def test_guidance_scale_one_equals_the_conditional_branch_alone():
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0())
    labels = torch.tensor([2, 7])
    start = torch.randn(2, 3, 8, 8, generator=generator())
    conditional = {"class_labels": labels}
    unconditional = {"class_labels": torch.full_like(labels, 10)}
    alone = pipe.sample(start.clone(), conditional, None, 3, 1.0, eta=0.0)
    guided = pipe.sample(start.clone(), conditional, unconditional, 3, 1.0, eta=0.0)
    torch.testing.assert_close(guided, alone, rtol=1e-5, atol=1e-5)
    stronger = pipe.sample(start.clone(), conditional, unconditional, 3, 4.0, eta=0.0)
    assert (stronger - alone).abs().max() > 1e-3


def test_unconditional_model_uses_batch_size_and_rejects_guidance():
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=3), scheduler=ddim_x0())
    images = pipe(batch_size=3, num_inference_steps=2, output_type="pt").images
    assert images.shape == (3, 3, 8, 8)
    with pytest.raises(ValueError, match="unconditional branch"):
        pipe(batch_size=1, num_inference_steps=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(class_labels=[1], num_inference_steps=2)


def test_negative_aux_conditioning_and_dynamic_thresholding():
    model = tiny_mdit(in_channels=3, num_classes=10, use_aux_conditions=True)
    pipe = MDiTPipeline(transformer=model, scheduler=ddim_x0())
    kwargs = dict(class_labels=[5], num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    plain = pipe(generator=generator(), **kwargs).images
    negative = pipe(generator=generator(), image_scale=1.0, negative_image_scale=0.75, **kwargs)
    assert (negative.images - plain).abs().max() > 1e-4
    latents = pipe(
        generator=generator(),
        dynamic_thresholding=(0.9, 1.4),
        **{**kwargs, "output_type": "latent"},
    ).images
    assert latents.abs().max() <= 1.4 + 1e-5


@pytest.mark.parametrize("kind", ["class", "text"])
def test_core_attention_and_core_patch_schedule_are_restored_after_the_call(kind):
    if kind == "class":
        pipe = MDiTPipeline(
            transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0()
        )
        condition = dict(class_labels=[1])
    else:
        pipe, condition = text_pipeline(), dict(prompt="a cat")
    model = pipe.transformer
    factors = []

    def record(pipeline, step, timestep, tensors):
        factors.append(pipeline.core_resample_factor)
        return tensors

    out = pipe(
        **condition,
        height=16,
        width=16,
        num_inference_steps=4,
        core_attention="neighborhood",
        core_kernel_size=3,
        core_patch_schedule=0.5,
        callback_on_step_end=record,
        output_type="pt",
    ).images
    assert out.shape == (1, 3, 16, 16)
    assert factors == [2, 2, 1, 1]
    assert pipe.core_resample_factor == 1 and model.config.core_attention_type == "global"
    assert not model.core_patch_embed._forward_pre_hooks and not model.core_unpatch._forward_hooks


def test_per_block_core_kernels_are_restored_after_a_core_attention_call():
    model = tiny_mdit(in_channels=3, num_classes=10, core_kernel_sizes=[3, None, None])
    pipe = MDiTPipeline(transformer=model, scheduler=ddim_x0())
    pipe(class_labels=[1], height=16, width=16, num_inference_steps=2, core_attention="global",
         output_type="pt")  # fmt: skip
    assert model.config.core_kernel_sizes == [3, None, None]
    assert [block.attn.kernel_size for block in model.core_sequence()] == [3, None, None]


def test_callback_can_replace_latents():
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0())
    calls = []

    def zero(pipeline, step, timestep, tensors):
        calls.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = pipe(
        class_labels=[1],
        num_inference_steps=3,
        callback_on_step_end=zero,
        callback_on_step_end_tensor_inputs=["latents"],
        output_type="latent",
    ).images
    assert calls == [0, 1, 2] and out.abs().max() == 0


@pytest.mark.parametrize(
    "scheduler, out_channels",
    [
        (DDPMScheduler(variance_type="learned_range"), 6),
        (DDPMScheduler(), 3),
        (FlowMatchEulerDiscreteScheduler(), 3),
    ],
)
def test_epsilon_learned_variance_and_flow_matching_schedulers(scheduler, out_channels):
    model = tiny_mdit(in_channels=3, out_channels=out_channels, num_classes=10)
    pipe = MDiTPipeline(transformer=model, scheduler=scheduler)
    out = pipe(class_labels=[1, 2], num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    assert out.images.shape == (2, 3, 8, 8) and torch.isfinite(out.images).all()


def test_ddim_eta_one_on_a_cosine_schedule_stays_finite():
    # In float32 diffusers' DDIM step takes the square root of a rounding-negative number here.
    scheduler = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=False,
        timestep_spacing="trailing",
    )
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=scheduler)
    out = pipe(class_labels=[1, 2], num_inference_steps=5, eta=1.0, output_type="pt").images
    assert torch.isfinite(out).all()


def test_bad_sizes_and_output_types():
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0())
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe(class_labels=[1], height=10, width=8)
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], output_type="jpeg")
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        pipe(class_labels=[11])
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe(class_labels=[1], height=12, width=12, core_patch_schedule=0.5)


# -- text to image --------------------------------------------------------------------------------


def text_pipeline(vae=None):
    encoder, tokenizer = tiny_text_encoder()
    model = tiny_mdit(cross_attention_dim=32, in_channels=4 if vae else 3)
    return MDiTTextToImagePipeline(
        transformer=model, scheduler=ddim_x0(), text_encoder=encoder, tokenizer=tokenizer, vae=vae
    )


def test_text_to_image_prompts_negative_prompts_and_reload(tmp_path):
    pipe = text_pipeline(vae=tiny_vae())
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    images = pipe(["a red cube", "a cat"], generator=generator(), **kwargs).images
    assert images.shape == (2, 16, 16, 3)
    other = pipe(["a blue ball", "a cat"], generator=generator(), **kwargs).images
    assert not np.allclose(images[0], other[0])
    negative = pipe(
        ["a red cube", "a cat"], negative_prompt=["blurry", "dark"], generator=generator(), **kwargs
    ).images
    assert not np.allclose(images, negative)
    embeddings, mask = pipe.encode_prompt("a long prompt that is cut", max_sequence_length=16)
    assert embeddings.shape == (1, 16, 32) and mask.shape == (1, 16)

    pipe.save_pretrained(tmp_path)
    loaded = MDiTTextToImagePipeline.from_pretrained(tmp_path)
    again = loaded(["a red cube", "a cat"], generator=generator(), **kwargs).images
    np.testing.assert_array_equal(again, images)


# -- DiffiT -------------------------------------------------------------------------------------


def test_diffit_latent_class_conditional_with_three_channel_power_cosine_guidance():
    model = randomize(
        DiffiTTransformer2DModel(
            sample_size=8, hidden_size=32, num_layers=1, num_attention_heads=2, num_classes=10
        )
    )
    pipe = DiffiTPipeline(transformer=model, scheduler=DDPMScheduler(), vae=tiny_vae())
    images = pipe(
        class_labels=[1, 2],
        num_inference_steps=3,
        guidance_scale=4.0,
        guidance_channels=3,
        guidance_schedule="power-cosine",
        output_type="np",
    ).images
    assert images.shape == (2, 16, 16, 3)


def test_diffit_image_space_unconditional():
    model = randomize(DiffiTUNet2DModel(**TINY_DIFFIT_UNET))
    pipe = DiffiTPipeline(transformer=model, scheduler=DDIMScheduler())
    images = pipe(batch_size=2, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 16, 16)

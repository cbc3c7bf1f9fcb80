"""The contracts of ``tests/contracts.py`` over every model and pipeline, with a tiny config of
each preset family (MDiT, the DiT analog ``{0, 0, 0, L}``, the original DiT baseline, latent
DiffiT in both time conditionings, the image-space DiffiT U-Net)."""

from __future__ import annotations

import pytest
import torch
from contracts import ModelContract, PipelineContract

from diffusers_mdit import (
    DiffiTPipeline,
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    DiTBaselinePipeline,
    DiTBaselineTransformer2DModel,
    MDiTPipeline,
    MDiTTextToImagePipeline,
)
from diffusers_mdit.testing import (
    TINY_DIFFIT,
    TINY_DIFFIT_UNET,
    TINY_DIT,
    TINY_MDIT,
    ddim_x0,
    randomize,
    tiny_mdit,
    tiny_text_encoder,
    tiny_vae,
)


def _noise(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- models ---------------------------------------------------------------------------------------


class TestMDiTContract(ModelContract):
    @pytest.fixture
    def model(self):
        return tiny_mdit(num_classes=3, cross_attention_dim=16, use_aux_conditions=True)

    def inputs(self, batch=2):
        return dict(
            hidden_states=_noise(batch, 4, 8, 8),
            timestep=torch.tensor([10.0, 700.0])[:batch],
            class_labels=torch.tensor([0, 2])[:batch],
            encoder_hidden_states=_noise(batch, 3, 16, seed=1),
            encoder_attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]])[:batch],
            image_scale=torch.tensor([0.5, 1.0])[:batch],
            aspect_ratio=torch.tensor([1.0, 0.75])[:batch],
        )


class TestDiTAnalogContract(ModelContract):
    @pytest.fixture
    def model(self):
        config = {**TINY_MDIT, "num_outer_in_blocks": 0, "num_outer_out_blocks": 0}
        return tiny_mdit(**{**config, "num_alternating_blocks": 0, "num_core_blocks": 2})

    def inputs(self, batch=2):
        return dict(hidden_states=_noise(batch, 4, 8, 8), timestep=torch.tensor([10.0, 700.0]))


class TestDiffiTContract(ModelContract):
    fused_legacy_qkv = True

    @pytest.fixture(params=["tmsa", "adaln"])
    def model(self, request):
        model = DiffiTTransformer2DModel(
            **TINY_DIFFIT, num_classes=3, time_conditioning=request.param
        )
        return randomize(model)

    def inputs(self, batch=2):
        return dict(
            hidden_states=_noise(batch, 4, 8, 8),
            timestep=torch.tensor([10.0, 700.0]),
            class_labels=torch.tensor([0, 2]),
        )


class TestDiffiTUNetContract(ModelContract):
    fused_legacy_qkv = True
    attention_kwargs_name = "cross_attention_kwargs"

    @pytest.fixture
    def model(self):
        return randomize(DiffiTUNet2DModel(**TINY_DIFFIT_UNET, num_classes=3))

    def inputs(self, batch=2):
        # ``sample=`` as diffusers' U-Nets name it.
        return dict(
            sample=_noise(batch, 3, 16, 16),
            timestep=torch.tensor([10.0, 700.0]),
            class_labels=torch.tensor([0, 2]),
        )


class TestDiTBaselineContract(ModelContract):
    legacy_attention_names = False
    attention_kwargs_name = "cross_attention_kwargs"

    @pytest.fixture
    def model(self):
        return randomize(DiTBaselineTransformer2DModel(**TINY_DIT, num_classes=3))

    def inputs(self, batch=2):
        return dict(
            hidden_states=_noise(batch, 4, 8, 8),
            timestep=torch.tensor([10.0, 700.0]),
            class_labels=torch.tensor([0, 2]),
        )


def test_compile_repeated_blocks_on_cpu():
    """``compile_repeated_blocks`` finds the blocks named by ``_repeated_blocks``."""
    model = tiny_mdit(num_classes=3)
    x, t = _noise(1, 4, 8, 8), torch.tensor([10.0])
    with torch.no_grad():
        reference = model(x, t).sample
        model.compile_repeated_blocks(backend="eager")
        compiled = [m for m in model.modules() if hasattr(m, "_compiled_call_impl")]
        assert any(getattr(m, "_compiled_call_impl", None) is not None for m in compiled)
        torch.testing.assert_close(model(x, t).sample, reference)
    for cls in (DiffiTTransformer2DModel, DiffiTUNet2DModel):
        assert cls._repeated_blocks and cls._no_split_modules


def test_an_explicit_attention_backend_computes_in_the_autocast_dtype(monkeypatch):
    """Paper default: float32 attention under bf16 autocast; an explicitly chosen backend gets
    bf16 inputs, as fused kernels need."""
    import torch.nn.functional as F
    from diffusers.models.attention_dispatch import attention_backend

    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append(query.dtype)
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_mdit(num_classes=3)
    x, t = _noise(1, 4, 8, 8), torch.tensor([10.0])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t)
        assert seen and set(seen) == {torch.float32}
        seen.clear()
        model.set_attention_backend("native")
        model(x, t)
        model.reset_attention_backend()
        assert torch.bfloat16 in seen  # global attention; neighborhood attention stays float32
        seen.clear()
        model(x, t)
        assert set(seen) == {torch.float32}
        seen.clear()
        with attention_backend("_native_math"):  # diffusers' context manager chooses too
            model(x, t)
        assert torch.bfloat16 in seen


# -- pipelines ------------------------------------------------------------------------------------


class TestMDiTPipelineContract(PipelineContract):
    @pytest.fixture
    def pipe(self):
        model = tiny_mdit(num_classes=3)
        return MDiTPipeline(transformer=model, scheduler=ddim_x0(), vae=tiny_vae())

    def call_inputs(self):
        return dict(class_labels=[1, 2], num_inference_steps=4, guidance_scale=2.0,
                    output_type="latent")  # fmt: skip


class TestMDiTTextToImagePipelineContract(PipelineContract):
    @pytest.fixture
    def pipe(self):
        encoder, tokenizer = tiny_text_encoder()
        model = tiny_mdit(in_channels=3, cross_attention_dim=32)
        return MDiTTextToImagePipeline(
            transformer=model, scheduler=ddim_x0(), text_encoder=encoder, tokenizer=tokenizer
        )

    def call_inputs(self):
        return dict(prompt="a cat", num_inference_steps=4, guidance_scale=2.0,
                    output_type="latent")  # fmt: skip

    def test_prompt_embeds_equal_the_prompt(self, pipe):
        embeds, mask = pipe.encode_prompt("a cat")
        negative, negative_mask = pipe.encode_prompt("a dog")
        by_text = self.run(pipe, negative_prompt="a dog", num_images_per_prompt=2)
        inputs = {k: v for k, v in self.call_inputs().items() if k != "prompt"}
        by_embeds = pipe(
            **inputs,
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            negative_prompt_embeds=negative,
            negative_prompt_attention_mask=negative_mask,
            num_images_per_prompt=2,
            generator=torch.Generator().manual_seed(0),
        ).images
        torch.testing.assert_close(by_text, by_embeds, atol=1e-6, rtol=1e-5)
        with pytest.raises(ValueError, match="not both"):
            pipe(prompt="a cat", prompt_embeds=embeds, num_inference_steps=1)

    def test_encode_prompt_needs_no_transformer(self, pipe):
        encoder_only = MDiTTextToImagePipeline(
            transformer=None, scheduler=ddim_x0(), text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
        )  # fmt: skip
        embeds, mask = encoder_only.encode_prompt(["a cat", "a dog"], num_images_per_prompt=2)
        assert embeds.shape[:2] == mask.shape and embeds.shape[0] == 4


class TestDiffiTPipelineContract(PipelineContract):
    @pytest.fixture
    def pipe(self):
        model = randomize(DiffiTTransformer2DModel(**TINY_DIFFIT, num_classes=3))
        return DiffiTPipeline(transformer=model, scheduler=ddim_x0(), vae=tiny_vae())

    def call_inputs(self):
        return dict(class_labels=[1, 2], num_inference_steps=4, guidance_scale=2.0,
                    output_type="latent")  # fmt: skip


class TestDiTBaselinePipelineContract(PipelineContract):
    @pytest.fixture
    def pipe(self):
        model = randomize(DiTBaselineTransformer2DModel(**TINY_DIT, num_classes=3))
        return DiTBaselinePipeline(transformer=model, scheduler=ddim_x0(), vae=tiny_vae())

    def call_inputs(self):
        return dict(class_labels=[1, 2], num_inference_steps=4, guidance_scale=2.0,
                    output_type="latent")  # fmt: skip


class TestDiffiTUNetPipelineContract(PipelineContract):
    guided = False

    @pytest.fixture
    def pipe(self):
        model = randomize(DiffiTUNet2DModel(**TINY_DIFFIT_UNET))
        return DiffiTPipeline(transformer=model, scheduler=ddim_x0())

    def call_inputs(self):
        return dict(batch_size=1, num_inference_steps=4, output_type="latent")

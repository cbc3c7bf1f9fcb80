"""DiTBaselinePipeline: sampling the original DiT with our objectives' schedulers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers

from ..models import DiTBaselineTransformer2DModel
from .base import TransformerDiffusionPipeline, sampling_arguments
from .pipeline_mdit import batch_labels, label_branches


class DiTBaselinePipeline(TransformerDiffusionPipeline):
    r"""Sampling with :class:`~diffusers_mdit.DiTBaselineTransformer2DModel`, class-conditional
    or unconditional, in latent space (with ``vae``) or pixel space (without).

    Ours rather than diffusers' ``DiTPipeline``, which needs a VAE, always runs guidance with
    the fixed null label 1000 and drops a learned variance before the scheduler step: this one
    shares the MDiT and DiffiT pipelines' loop (``pipelines/base.py``), so it takes every
    scheduler our objectives train with (DDIM for x0, DDPM for epsilon with or without a
    learned variance, flow matching), pixel or latent space, the model's own null label
    ``num_classes``, and saves and loads with the package's checks.

    Args:
        transformer: The DiT model.
        scheduler: A diffusers scheduler (see :class:`~diffusers_mdit.MDiTPipeline`).
        vae: Optional ``AutoencoderKL`` for latent models.
    """

    def __init__(
        self,
        transformer: DiTBaselineTransformer2DModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self._setup_image_processor()

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor | None = None,
        batch_size: int = 1,
        num_images_per_prompt: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        guidance_schedule: str = "constant",
        guidance_power: float = 4.0,
        guidance_channels: int | None = None,
        eta: float = 1.0,
        dynamic_thresholding: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images; arguments as :meth:`MDiTPipeline.__call__` (square sizes only;
        DiT samples ImageNet with ``guidance_scale=4.0`` and ``guidance_channels=3``)."""
        sampling = sampling_arguments(locals())
        config = self.transformer.config
        height = height or self.default_size()
        width = width or self.default_size()
        device = self._execution_device
        # 1. Check inputs
        self.check_common_inputs(
            height, width, num_inference_steps, output_type, callback_on_step_end_tensor_inputs
        )
        if height != width:
            raise ValueError(f"DiT samples square images only, got {height}x{width}.")
        # 2. Conditioning
        labels, batch = batch_labels(
            class_labels, batch_size, num_images_per_prompt, config.num_classes, device
        )
        conditional, unconditional = label_branches(labels, config.num_classes, guidance_scale)
        # 3. Denoise and decode
        latents = self.prepare_latents(batch, height, width, generator, latents)
        return self.generate(
            latents, conditional, unconditional, sampling, output_type, return_dict
        )

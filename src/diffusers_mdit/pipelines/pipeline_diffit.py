"""DiffiTPipeline: latent class-conditional and image-space unconditional DiffiT sampling."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers

from ..models import DiffiTTransformer2DModel, DiffiTUNet2DModel
from .base import TransformerDiffusionPipeline, sampling_arguments
from .pipeline_mdit import batch_labels, label_branches


class DiffiTPipeline(TransformerDiffusionPipeline):
    r"""Sampling with a DiffiT model: :class:`~diffusers_mdit.DiffiTTransformer2DModel` on VAE
    latents (pass ``vae``) or :class:`~diffusers_mdit.DiffiTUNet2DModel` in pixel space.

    The paper's latent model samples with classifier-free guidance on the first three latent
    channels (``guidance_channels=3``) and, at 256px, a power-cosine guidance schedule computed
    from the timestep as the authors' code does (``guidance_schedule="power-cosine"``); at 512px
    a constant scale. The official NVIDIA weights and their exact sampling settings:
    :mod:`diffusers_mdit.models.conversion_diffit` (``OFFICIAL_SAMPLING``,
    ``official_diffit_scheduler``) and ``scripts/convert_diffit_to_diffusers.py``.

    Args:
        transformer: The DiffiT model.
        scheduler: A diffusers scheduler (DDPM / DDIM / an EDM-style scheduler for the image
            space models, whose paper setting is EDM's deterministic sampler).
        vae: Optional ``AutoencoderKL`` for latent models.
    """

    def __init__(
        self,
        transformer: DiffiTTransformer2DModel | DiffiTUNet2DModel,
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
        eta: float = 0.0,
        dynamic_thresholding: tuple[float, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images; arguments as :meth:`MDiTPipeline.__call__` (``eta`` defaults to
        0, deterministic DDIM)."""
        sampling = sampling_arguments(locals())
        config = self.transformer.config
        # 1. Check inputs
        height = height or self.default_size()
        width = width or self.default_size()
        device = self._execution_device
        self.check_common_inputs(
            height, width, num_inference_steps, output_type, callback_on_step_end_tensor_inputs
        )

        # 2. Conditioning, and the unconditional branch of classifier-free guidance
        labels, batch = batch_labels(
            class_labels, batch_size, num_images_per_prompt, config.num_classes, device
        )
        conditional, unconditional = label_branches(labels, config.num_classes, guidance_scale)

        # 3. Initial latents, then 4. denoise and decode
        latents = self.prepare_latents(batch, height, width, generator, latents)
        return self.generate(
            latents, conditional, unconditional, sampling, output_type, return_dict
        )

"""Shared machinery of our pipelines: size checks, latents, the guided denoising loop, decoding.

Every pipeline has a ``transformer`` (any model of this package), a diffusers ``scheduler`` and
an optional ``vae`` (``AutoencoderKL``). Without a VAE the pipeline samples in pixel space: the
model's output space is the image in [-1, 1].

Schedulers are diffusers' own: DDIM (``eta``, default 1.0 as in the MDiT paper) for x0 models
(``prediction_type="sample"``), DDPM for epsilon models (learned variance when its
``variance_type`` is ``"learned_range"``), ``FlowMatchEulerDiscreteScheduler`` for
rectified-flow (velocity) models. Scheduler arguments that a scheduler lacks (``eta``,
``generator``, ``scale_model_input``) are only passed where it has them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from contextlib import nullcontext
from numbers import Integral, Real
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.cache_utils import CacheMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..hub import HubPipelineMixin
from ..lora import MDiTLoraLoaderMixin
from .guidance import (
    apply_guidance,
    dynamic_threshold,
    guidance_scale_at,
    prediction_to_x0,
    x0_to_prediction,
)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# Call arguments every pipeline forwards unchanged to :meth:`TransformerDiffusionPipeline.sample`.
SAMPLING_ARGUMENTS = (
    "num_inference_steps",
    "guidance_scale",
    "guidance_schedule",
    "guidance_power",
    "guidance_channels",
    "eta",
    "generator",
    "dynamic_thresholding",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
)


def sampling_arguments(call_arguments: dict[str, Any]) -> dict[str, Any]:
    """The :data:`SAMPLING_ARGUMENTS` among a pipeline call's arguments (its ``locals()``),
    checked: a NaN guidance scale would otherwise turn every image into NaN silently."""
    sampling = {name: call_arguments[name] for name in SAMPLING_ARGUMENTS}
    for name in ("guidance_scale", "guidance_power", "eta"):
        value = sampling[name]
        if value is not None and not (
            isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
        ):
            raise ValueError(
                f"{name} must be a finite number, got {value!r}; pass a real value "
                "(guidance_scale=1.0 samples without guidance)."
            )
    channels = sampling["guidance_channels"]
    if channels is not None and (not _is_int(channels) or channels < 1):
        raise ValueError(
            f"guidance_channels must be a positive integer (or None for all), got {channels!r}."
        )
    return sampling


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


class TransformerDiffusionPipeline(HubPipelineMixin, DiffusionPipeline, MDiTLoraLoaderMixin):
    """Base class; subclasses build the conditioning and call :meth:`sample`. The transformer's
    LoRA adapters load, save and fuse through :class:`~diffusers_mdit.lora.MDiTLoraLoaderMixin`.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def _setup_image_processor(self) -> None:
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # -- diffusers' call-state properties, read and set by ``callback_on_step_end`` ---------------

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def guidance_scale(self) -> float:
        """The current guidance scale; a callback may change it between steps."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """diffusers' rule: guidance runs while the scale is above 1 (a callback that sets
        ``pipe._guidance_scale = 0.0`` switches it off for the remaining steps)."""
        return self._guidance_scale > 1

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a callback to skip the remaining steps."""
        return self._interrupt

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    # -- checks and inputs ---------------------------------------------------------------------

    def check_common_inputs(
        self,
        height: int,
        width: int,
        num_inference_steps: int,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> None:
        for name, size in (("height", height), ("width", width)):
            if not _is_int(size) or size < 1:
                raise ValueError(
                    f"{name} must be a positive integer of pixels, got {size!r}; pass a "
                    "positive size or None for the model's default size."
                )
        if not _is_int(num_inference_steps):
            raise ValueError(
                f"num_inference_steps must be an integer, got {num_inference_steps!r}; pass a "
                "whole number of steps such as 50."
            )
        multiple = self.vae_scale_factor * self.transformer.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (VAE factor "
                f"{self.vae_scale_factor} x the model's size multiple "
                f"{self.transformer.size_multiple}), got {height}x{width}."
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not available; "
                f"choose from {self._callback_tensor_inputs}."
            )

    def default_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        channels = self.transformer.config.in_channels
        factor = self.vae_scale_factor
        shape = (batch_size, channels, height // factor, width // factor)
        device, dtype = self._execution_device, self.transformer.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    # -- the loop ------------------------------------------------------------------------------

    def sample(
        self,
        latents: torch.Tensor,
        conditional: dict[str, Any],
        unconditional: dict[str, Any] | None,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_schedule: str = "constant",
        guidance_power: float = 4.0,
        guidance_channels: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        dynamic_thresholding: tuple[float, float] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        before_step: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Denoise ``latents``. ``conditional`` / ``unconditional`` are the model keyword
        arguments of the two guidance branches (``unconditional=None``: no guidance);
        ``before_step(i, n)`` lets a pipeline change the model between steps."""
        scheduler, model = self.scheduler, self.transformer
        scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        if getattr(scheduler, "alphas_cumprod", None) is not None:
            # DDIM with eta=1 computes sqrt(1 - a_prev - sigma_t^2), which is ~a_t >= 0 in exact
            # arithmetic but rounds negative (NaN) in float32 at the first step of a cosine
            # schedule (a_999 = 2.4e-9). Float64 schedule values keep it non-negative.
            scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        timesteps = scheduler.timesteps
        channels = model.config.in_channels
        step_kwargs = {}
        step_parameters = inspect.signature(scheduler.step).parameters
        if "eta" in step_parameters and eta is not None:
            step_kwargs["eta"] = eta
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator
        learned_variance = getattr(scheduler.config, "variance_type", None) in (
            "learned",
            "learned_range",
        )
        model_kwargs = conditional
        if unconditional is not None:
            model_kwargs = {
                key: _stack(unconditional.get(key), value) for key, value in conditional.items()
            }

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self._num_timesteps = len(timesteps)
        self._guidance_scale = guidance_scale
        self._interrupt = False
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            if before_step is not None:
                before_step(i, len(timesteps))
            guide = unconditional is not None and self.do_classifier_free_guidance
            model_input = latents
            if hasattr(scheduler, "scale_model_input"):
                model_input = scheduler.scale_model_input(model_input, t)
            if guide:
                model_input = torch.cat([model_input, model_input])
            timestep = t.expand(model_input.shape[0]).to(model_input.device)
            # A cache (CacheMixin.enable_cache) keeps one state per batch layout: guidance can stop.
            cache = (
                model.cache_context("cond_uncond" if guide else "cond")
                if isinstance(model, CacheMixin)
                else nullcontext()
            )
            with cache:
                output = model(model_input, timestep, **(model_kwargs if guide else conditional))
            output = output.sample
            if guide:
                uncond, cond = output.chunk(2)
                scale = guidance_scale_at(
                    self._guidance_scale,
                    i,
                    len(timesteps),
                    guidance_schedule,
                    guidance_power,
                    timestep=t,
                    num_train_timesteps=getattr(scheduler.config, "num_train_timesteps", 1000),
                )
                output = apply_guidance(
                    cond, uncond, scale, min(guidance_channels or channels, channels)
                )
            prediction, variance = output[:, :channels], output[:, channels:]
            if dynamic_thresholding is not None:
                x0 = prediction_to_x0(scheduler, prediction, latents, t)
                x0 = dynamic_threshold(x0, *dynamic_thresholding)
                prediction = x0_to_prediction(scheduler, x0, latents, t)
            if learned_variance and variance.shape[1]:
                prediction = torch.cat([prediction, variance], dim=1)
            latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample

            if callback_on_step_end is not None:
                available = {"latents": latents}
                names = callback_on_step_end_tensor_inputs or []
                results = callback_on_step_end(self, i, t, {n: available[n] for n in names})
                latents = results.pop("latents", latents)
        return latents

    def generate(
        self,
        latents: torch.Tensor,
        conditional: dict[str, Any],
        unconditional: dict[str, Any] | None,
        sampling: dict[str, Any],
        output_type: str,
        return_dict: bool,
        before_step: Callable[[int, int], None] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """:meth:`sample`, :meth:`decode`, and the pipeline output."""
        latents = self.sample(
            latents, conditional, unconditional, before_step=before_step, **sampling
        )
        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # -- output --------------------------------------------------------------------------------

    def decode(self, latents: torch.Tensor, output_type: str):
        """``latents`` as images of ``output_type`` (``"latent"`` returns them unchanged)."""
        if output_type == "latent":
            return latents
        vae = getattr(self, "vae", None)
        if vae is not None:
            scaled = latents / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None):
                scaled = scaled + vae.config.shift_factor
            images = vae.decode(scaled.to(vae.dtype)).sample
        else:
            images = latents
        return self.image_processor.postprocess(images.float(), output_type=output_type)


def _stack(unconditional, conditional):
    """Batch the two guidance branches: ``[unconditional, conditional]``."""
    if conditional is None:
        return None
    if not isinstance(conditional, torch.Tensor):
        return conditional
    if unconditional is None:
        unconditional = conditional
    return torch.cat([unconditional, conditional])

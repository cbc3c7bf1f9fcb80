"""MDiTPipeline: class-conditional and unconditional sampling with an MDiT model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from diffusers.models import AutoencoderKL
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers

from ..models import MDiTTransformer2DModel
from .base import TransformerDiffusionPipeline, sampling_arguments


def batch_labels(
    class_labels: int | list[int] | torch.Tensor | None,
    batch_size: int,
    num_images_per_prompt: int,
    num_classes: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, int]:
    """Labels repeated ``num_images_per_prompt`` times (``None`` for unconditional models),
    and the resulting batch size. Without labels a class-conditional model samples the null
    class ``num_classes``."""
    for name, count in (
        ("batch_size", batch_size),
        ("num_images_per_prompt", num_images_per_prompt),
    ):
        if not isinstance(count, Integral) or isinstance(count, bool) or count < 1:
            raise ValueError(f"{name} must be a positive integer, got {count!r}.")
    if class_labels is None:
        batch = batch_size * num_images_per_prompt
        if num_classes == 0:
            return None, batch
        return torch.full((batch,), num_classes, dtype=torch.long, device=device), batch
    if num_classes == 0:
        raise ValueError(
            "class_labels were given but the model is unconditional (num_classes=0); "
            "call the pipeline with batch_size=... instead."
        )
    if batch_size != 1:
        raise ValueError(
            f"Give class_labels or batch_size, not both: with labels the batch is one image per "
            f"label (times num_images_per_prompt), so batch_size={batch_size} would be ignored. "
            "Repeat the labels instead, e.g. class_labels=[3] * 4."
        )
    labels = torch.as_tensor(class_labels).reshape(-1)
    if labels.numel() == 0:
        raise ValueError("class_labels is empty; give at least one class id.")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"class_labels must be integer class ids, got {labels.tolist()} ({labels.dtype}); "
            "pass ints such as [1, 7]."
        )
    labels = labels.long()
    if bool(((labels < 0) | (labels > num_classes)).any()):
        raise ValueError(
            f"class_labels must lie in [0, {num_classes}] ({num_classes} = null), got "
            f"{labels.tolist()}."
        )
    labels = labels.repeat_interleave(num_images_per_prompt).to(device)
    return labels, labels.numel()


def label_branches(
    labels: torch.Tensor | None, num_classes: int, guidance_scale: float
) -> tuple[dict, dict | None]:
    """The model inputs of the conditional branch and, under guidance, of the unconditional
    one (every label replaced by the null label ``num_classes``) for a class-label pipeline."""
    conditional = {} if labels is None else {"class_labels": labels}
    if guidance_scale == 1.0:
        return conditional, None
    if labels is None:
        raise ValueError(
            "guidance_scale != 1 needs a class-conditional model; use guidance_scale=1."
        )
    return conditional, {"class_labels": torch.full_like(labels, num_classes)}


class CoreResampling:
    """HiDiffusion's resolution-aware schedule as the MDiT paper adapts it (appendix J.2): while
    :attr:`factor` is above 1, the core runs at ``1 / factor`` of its usual resolution, with
    average pooling before the core patch embedding and bilinear upsampling after its
    un-patching. A sampling trick, not part of the architecture, so it lives here and reaches
    the model through forward hooks on ``core_patch_embed`` and ``core_unpatch``, removed by
    :meth:`remove`."""

    def __init__(self, model: MDiTTransformer2DModel):
        self.factor = 1
        self._handles = [
            model.core_patch_embed.register_forward_pre_hook(self._down),
            model.core_unpatch.register_forward_hook(self._up),
        ]

    def _down(self, _module, inputs):
        if self.factor == 1:
            return None
        grid = inputs[0].permute(0, 3, 1, 2)  # (B, H, W, C) -> a channels-last NCHW view
        return (F.avg_pool2d(grid, self.factor).permute(0, 2, 3, 1),)

    def _up(self, _module, _inputs, output):
        if self.factor == 1:
            return None
        grid = output.permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=self.factor, mode="bilinear", align_corners=False)
        return grid.permute(0, 2, 3, 1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class MDiTCoreOptionsMixin:
    """The MDiT-only sampling options of :class:`MDiTPipeline` and
    :class:`~diffusers_mdit.MDiTTextToImagePipeline`: switching the core's self-attention for
    one call (``core_attention``, ``core_kernel_size``) and the HiDiffusion-style
    ``core_patch_schedule``."""

    @property
    def core_resample_factor(self) -> int:
        """How far the core's resolution is reduced at the current step (1: not at all)."""
        resampling = getattr(self, "_core_resampling", None)
        return 1 if resampling is None else resampling.factor

    def check_core_patch_schedule(self, schedule: float | None, height: int, width: int) -> None:
        """``core_patch_schedule`` halves the core resolution: the size must allow it."""
        if schedule is None:
            return
        if not (isinstance(schedule, Real) and 0 <= schedule <= 1):
            raise ValueError(
                f"core_patch_schedule is the fraction of the steps run at half core resolution, "
                f"so it must lie in [0, 1], got {schedule!r}."
            )
        multiple = 2 * self.vae_scale_factor * self.transformer.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"core_patch_schedule halves the core resolution, so height and width must be "
                f"multiples of {multiple}, got {height}x{width}."
            )

    @contextlib.contextmanager
    def core_settings(
        self, attention: str | None, kernel_size: int | None, patch_schedule: float | None
    ):
        """For one call: switch the core's self-attention (``attention``, ``kernel_size``)
        and yield the ``before_step`` hook of the HiDiffusion-style ``patch_schedule`` (the
        core at half resolution for that fraction of the first steps); both are restored
        afterwards."""
        model = self.transformer
        resampling = CoreResampling(model) if patch_schedule is not None else None
        self._core_resampling = resampling

        def before_step(step: int, total: int) -> None:
            if resampling is not None:
                resampling.factor = 2 if step < patch_schedule * total else 1

        config = model.config
        previous = (config.core_attention_type, config.core_kernel_size)
        previous_per_block = getattr(config, "core_kernel_sizes", None)
        if attention is not None:
            model.set_core_attention(attention, kernel_size)
        try:
            yield before_step
        finally:
            self._core_resampling = None
            if resampling is not None:
                resampling.remove()
            if attention is not None:
                model.set_core_attention(*previous)
                if previous_per_block is not None:
                    model.set_core_kernel_sizes(previous_per_block)


class MDiTPipeline(MDiTCoreOptionsMixin, TransformerDiffusionPipeline):
    r"""Sampling with :class:`~diffusers_mdit.MDiTTransformer2DModel`, class-conditional or
    unconditional, in latent space (with ``vae``) or pixel space (without).

    Args:
        transformer: The MDiT model.
        scheduler: A diffusers scheduler: ``DDIMScheduler`` (``prediction_type="sample"``,
            ``clip_sample=False``, ``timestep_spacing="trailing"``) for x0 models as in the
            paper, ``DDPMScheduler`` for epsilon models, ``FlowMatchEulerDiscreteScheduler``
            for rectified flow.
        vae: Optional ``AutoencoderKL``; its ``scaling_factor`` is read from its config.
    """

    def __init__(
        self,
        transformer: MDiTTransformer2DModel,
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
        image_scale: float | None = None,
        aspect_ratio: float | None = None,
        negative_image_scale: float | None = None,
        dynamic_thresholding: tuple[float, float] | None = None,
        core_attention: str | None = None,
        core_kernel_size: int | None = None,
        core_patch_schedule: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            class_labels: Class id(s) for a class-conditional model (``num_classes`` = null).
            batch_size: Number of images for an unconditional model (with ``class_labels`` the
                batch is one image per label: leave it at 1).
            num_images_per_prompt: Images per class label.
            height, width: Output size in pixels; defaults to the model's ``sample_size``
                times the VAE factor. Any multiple of the model's and VAE's factors works,
                non-square included.
            num_inference_steps: Denoising steps.
            guidance_scale: Classifier-free guidance scale; 1 disables guidance (the paper
                samples ImageNet with 3.0).
            guidance_schedule: ``"constant"``, ``"power-cosine"`` (scale ramps up as the
                timestep falls, DiffiT's ramp; ``guidance_power`` sets it) or
                ``"power-cosine-step"`` (the same ramp over the step index).
            guidance_channels: Guide only the first channels (DiT's 3-channel guidance).
            eta: DDIM's eta (the paper samples with 1.0); ignored by other schedulers.
            image_scale, aspect_ratio: Auxiliary conditions for models built with
                ``use_aux_conditions=True`` (G.4); ``None`` = dropped.
            negative_image_scale: Image scale of the unconditional branch ("negative
                conditioning", H.1: 0.75 removes the blur of high guidance); also enables
                guidance for models without classes.
            dynamic_thresholding: ``(p, s)``: clip predicted x0 at the ``p`` quantile and scale
                to ``[-s, s]`` (H.1 uses ``(0.9, 1.4)``).
            core_attention: ``"neighborhood"`` or ``"global"`` core attention for this call
                (neighborhood with ``core_kernel_size`` for sizes above the training size).
            core_patch_schedule: HiDiffusion-style schedule (J.2): for the first
                ``core_patch_schedule`` fraction of the steps the core runs at half
                resolution (pooled in, bilinearly upsampled out).
            generator: ``torch.Generator``(s) for reproducible sampling.
            latents: Initial noise ``(B, C, h, w)`` instead of sampling it.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: Return an ``ImagePipelineOutput`` instead of a tuple.
            callback_on_step_end: ``fn(pipeline, step, timestep, tensors) -> dict`` after every
                step; a returned ``"latents"`` replaces the current latents.
            callback_on_step_end_tensor_inputs: Names of tensors passed to the callback.
        """
        sampling = sampling_arguments(locals())
        model = self.transformer
        config = model.config
        # 1. Check inputs
        height = height or self.default_size()
        width = width or self.default_size()
        device = self._execution_device
        self.check_common_inputs(
            height, width, num_inference_steps, output_type, callback_on_step_end_tensor_inputs
        )
        if (image_scale, aspect_ratio, negative_image_scale) != (None,) * 3 and not (
            config.use_aux_conditions
        ):
            raise ValueError(
                "image_scale / aspect_ratio / negative_image_scale need a model built with "
                "use_aux_conditions=True."
            )
        self.check_core_patch_schedule(core_patch_schedule, height, width)

        # 2. Conditioning, and the unconditional branch of classifier-free guidance
        labels, batch = batch_labels(
            class_labels, batch_size, num_images_per_prompt, config.num_classes, device
        )

        def aux(value):
            return None if value is None else torch.full((batch,), float(value), device=device)

        conditional = {
            "class_labels": labels,
            "image_scale": aux(image_scale),
            "aspect_ratio": aux(aspect_ratio),
        }
        unconditional = None
        if guidance_scale != 1.0:
            if config.num_classes == 0 and negative_image_scale is None:
                raise ValueError(
                    "guidance_scale != 1 needs an unconditional branch: a class-conditional "
                    "model or negative_image_scale. Use guidance_scale=1.0."
                )
            unconditional = dict(conditional)
            if labels is not None:
                unconditional["class_labels"] = torch.full_like(labels, config.num_classes)
            if negative_image_scale is not None:
                unconditional["image_scale"] = aux(negative_image_scale)
        conditional = {k: v for k, v in conditional.items() if v is not None}
        if unconditional is not None:
            unconditional = {k: v for k, v in unconditional.items() if v is not None}

        # 3. Initial latents
        latents = self.prepare_latents(batch, height, width, generator, latents)

        # 4. Denoise with the call's core options, then decode
        with self.core_settings(core_attention, core_kernel_size, core_patch_schedule) as before:
            return self.generate(
                latents, conditional, unconditional, sampling, output_type, return_dict, before
            )

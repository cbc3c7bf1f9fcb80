"""Input checks and normalisation shared by the models: every message names the problem and
the fix."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch


def check_positive_sizes(**sizes) -> None:
    """Every size (a width, channel count, patch, head or window size) must be an integer
    >= 1: zero divides by zero and a negative one fails deep inside torch. ``None`` (a
    documented default) is skipped."""
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(
                f"{name} must be a positive integer, got {value!r}; give a value >= 1."
            )


def check_positive_ratios(**ratios) -> None:
    """Every ratio (a hidden-width multiplier, a frequency base) must be a finite number > 0."""
    for name, value in ratios.items():
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < math.inf:
            raise ValueError(
                f"{name} must be a finite number > 0, got {value!r}; give a positive value."
            )


def check_kernel_size(name: str, kernel_size) -> None:
    """A neighborhood-attention kernel must be odd and positive: every query sits at the centre
    of its window (NATTEN semantics), as for ``core_kernel_sizes``."""
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, Integral)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(
            f"{name} must be an odd positive kernel size (the query sits at the centre of its "
            f"neighborhood), got {kernel_size!r}; use an odd size such as 3, 7 or 15."
        )


def check_sample(hidden_states: torch.Tensor, in_channels: int, multiple: int, why: str) -> None:
    """``hidden_states`` must be ``(B, in_channels, H, W)`` with ``H, W`` multiples of
    ``multiple`` (``why`` says where the multiple comes from), and floating point: the models
    cast floating inputs to their own dtype, integer ones (e.g. uint8 images) are refused."""
    if not isinstance(hidden_states, torch.Tensor):
        raise ValueError(
            f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}; "
            "pass torch.as_tensor(...)."
        )
    if not hidden_states.is_floating_point():
        raise ValueError(
            f"hidden_states must be a floating point tensor, got {hidden_states.dtype}. Convert "
            "it with .float() (images scaled to [-1, 1], latents as the VAE encodes them)."
        )
    if hidden_states.ndim != 4 or hidden_states.shape[1] != in_channels:
        raise ValueError(
            f"hidden_states must be (batch, {in_channels}, height, width), got "
            f"{tuple(hidden_states.shape)}. Pass inputs with in_channels={in_channels} channels "
            f"or build the model with in_channels={hidden_states.shape[1]}."
        )
    height, width = hidden_states.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(
            f"Height and width must be multiples of {multiple} ({why}), got {height}x{width}. "
            f"Resize or pad the input to a multiple of {multiple}."
        )


def check_class_labels(class_labels: torch.Tensor | None, num_classes: int, batch: int) -> None:
    """Labels must be ``(batch,)`` in ``[0, num_classes]`` (``num_classes`` is the null label)
    and only given to class-conditional models."""
    if class_labels is None:
        return
    if num_classes == 0:
        raise ValueError(
            "class_labels were given but the model is unconditional (num_classes=0). "
            "Drop class_labels or build the model with num_classes > 0."
        )
    if (
        not isinstance(class_labels, torch.Tensor)
        or class_labels.is_floating_point()
        or (class_labels.dtype in (torch.bool, torch.complex64, torch.complex128))
    ):
        got = class_labels.dtype if isinstance(class_labels, torch.Tensor) else type(class_labels)
        raise ValueError(
            f"class_labels must be an integer tensor of class ids, got {got}. Pass "
            "torch.tensor(labels, dtype=torch.long)."
        )
    if class_labels.shape != (batch,):
        raise ValueError(
            f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}."
        )
    # Meta tensors (parameter and FLOP counting) have no values to check.
    if class_labels.device.type == "meta":
        return
    if bool(((class_labels < 0) | (class_labels > num_classes)).any()):
        raise ValueError(
            f"class_labels must lie in [0, {num_classes}] ({num_classes} is the null label), "
            f"got values in [{int(class_labels.min())}, {int(class_labels.max())}]."
        )


def null_labels_if_missing(
    class_labels: torch.Tensor | None, num_classes: int, batch: int, device: torch.device
) -> torch.Tensor:
    """``class_labels``, or the null label ``num_classes`` for every sample."""
    if class_labels is not None:
        return class_labels
    return torch.full((batch,), num_classes, device=device, dtype=torch.long)


def check_batch_size(name: str, value: torch.Tensor | None, batch: int) -> None:
    """A per-sample input (``value``, when given) must have ``batch`` rows, like
    ``hidden_states``."""
    if value is not None and (value.ndim == 0 or value.shape[0] != batch):
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but hidden_states has a batch of {batch}; "
            f"give {name} one row per sample ({batch})."
        )


def expand_timestep(timestep, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or ``(B,)`` timestep as a ``(batch,)`` tensor on ``device``."""
    timestep = torch.as_tensor(timestep, device=device).reshape(-1)
    if timestep.numel() not in (1, batch):
        raise ValueError(
            f"timestep must be a scalar or hold one value per sample ({batch}), got "
            f"{timestep.numel()} values; pass one timestep or {batch}."
        )
    return timestep.expand(batch)

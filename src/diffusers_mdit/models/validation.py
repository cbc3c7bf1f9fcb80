"""Input checks and normalisation shared by the models: every message names the problem and
the fix."""

from __future__ import annotations

import torch


def check_sample(hidden_states: torch.Tensor, in_channels: int, multiple: int, why: str) -> None:
    """``hidden_states`` must be ``(B, in_channels, H, W)`` with ``H, W`` multiples of
    ``multiple`` (``why`` says where the multiple comes from)."""
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


def expand_timestep(timestep, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or ``(B,)`` timestep as a ``(batch,)`` tensor on ``device``."""
    return torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)

"""Sampling features of the papers, independent of any pipeline: classifier-free guidance (all
channels or DiT's first three), DiffiT's power-cosine guidance schedule, dynamic thresholding
with MDiT's post-clip scale, and conversions between a scheduler's prediction and x0.
"""

from __future__ import annotations

import math

import torch

GUIDANCE_SCHEDULES = ("constant", "power-cosine", "power-cosine-step")


def guidance_scale_at(
    scale: float,
    step: int,
    num_steps: int,
    schedule: str = "constant",
    power: float = 4.0,
    timestep: float | torch.Tensor | None = None,
    num_train_timesteps: int = 1000,
) -> float:
    """The guidance scale at sampling step ``step`` (0 = the noisiest) of ``num_steps``, whose
    timestep is ``timestep`` (of ``num_train_timesteps``).

    ``"constant"``: ``scale`` throughout. ``"power-cosine"`` (DiffiT at 256px: the authors'
    ``forward_with_cfg``, as MDT's): ``1 + (scale - 1) * (1 - cos(pi * progress ** power)) / 2``
    with ``progress = 1 - timestep / num_train_timesteps``, almost no guidance early and nearly
    the full ``scale`` at the end (``progress`` = 1 at timestep 0). ``"power-cosine-step"``:
    the same ramp over the step index, ``progress = step / (num_steps - 1)`` (this package's
    earlier form; it differs from the authors' when the steps are not evenly spread over the
    timesteps). The power, 4, is MDT's and DiffiT's code; the DiffiT paper does not state it.
    """
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(
            f"Unknown guidance schedule {schedule!r}; use one of {', '.join(GUIDANCE_SCHEDULES)}."
        )
    if schedule == "constant" or scale == 1.0:
        return scale
    if schedule == "power-cosine-step":
        progress = step / max(num_steps - 1, 1)
    elif timestep is None:
        raise ValueError("The 'power-cosine' guidance schedule needs the step's timestep.")
    else:
        progress = 1.0 - float(timestep) / num_train_timesteps
    return 1.0 + (scale - 1.0) * (1.0 - math.cos(math.pi * progress**power)) / 2.0


def apply_guidance(
    conditional: torch.Tensor,
    unconditional: torch.Tensor,
    scale: float,
    channels: int | None = None,
) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``, on the first ``channels`` channels only when given
    (DiT's and DiffiT's 3-channel guidance; the other channels keep the conditional output)."""
    guided = unconditional + scale * (conditional - unconditional)
    if channels is None or channels >= conditional.shape[1]:
        return guided
    return torch.cat([guided[:, :channels], conditional[:, channels:]], dim=1)


def dynamic_threshold(x0: torch.Tensor, quantile: float, post_scale: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding with MDiT's post-clip scale (H.1, figure 21: p=0.9,
    s=1.4): per sample, ``t = max(quantile_p(|x0|), 1)``; ``x0 = clip(x0, -t, t) / t * s``,
    so values end up in ``[-s, s]``."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    threshold = torch.quantile(flat, quantile, dim=1).clamp(min=1.0)
    threshold = threshold.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return torch.maximum(torch.minimum(x0, threshold), -threshold) / threshold * post_scale


def prediction_to_x0(
    scheduler, output: torch.Tensor, sample: torch.Tensor, timestep
) -> torch.Tensor:
    """x0 implied by a model ``output`` at ``timestep`` for the scheduler's parameterisation."""
    if _is_flow_matching(scheduler):
        sigma = _flow_sigma(scheduler, timestep, sample)
        return sample - sigma * output
    alpha, sigma = _alpha_sigma(scheduler, timestep, sample)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - sigma * output) / alpha
    if kind == "sample":
        return output
    if kind == "v_prediction":
        return alpha * sample - sigma * output
    raise ValueError(f"Dynamic thresholding does not support prediction_type {kind!r}.")


def x0_to_prediction(scheduler, x0: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
    """Inverse of :func:`prediction_to_x0`."""
    if _is_flow_matching(scheduler):
        sigma = _flow_sigma(scheduler, timestep, sample)
        return (sample - x0) / sigma.clamp(min=1e-8)
    alpha, sigma = _alpha_sigma(scheduler, timestep, sample)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - alpha * x0) / sigma
    if kind == "sample":
        return x0
    return (alpha * sample - x0) / sigma  # v_prediction


def _is_flow_matching(scheduler) -> bool:
    return not hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "sigmas")


def _alpha_sigma(scheduler, timestep, sample):
    alphas = scheduler.alphas_cumprod.to(sample.device)[int(timestep)]
    return alphas.sqrt().to(sample.dtype), (1 - alphas).sqrt().to(sample.dtype)


def _flow_sigma(scheduler, timestep, sample):
    index = scheduler.index_for_timestep(timestep) if scheduler.step_index is None else None
    index = scheduler.step_index if index is None else index
    return scheduler.sigmas[index].to(sample.device, sample.dtype)

"""Regularisers of the MDiT paper and the total training loss.

- Variance matching (section 3.4, eq. 2; rectified flow in H.2, eq. 7): match the per-sample,
  per-channel spatial variance of the x0 estimate to that of the data.
- Patch regularisation (appendix E, listing 1): penalise excess spectral power of the MDiT
  core's un-patch output at the frequencies of its 2x2 checkerboard.

Both are used only for part of training (the paper stops patch regularisation at 100k steps);
:func:`scheduled_weight` switches a term's weight off at a given step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .objectives import NoisyBatch, TrainingObjective


def scheduled_weight(weight: float, step: int, stop_step: int | None) -> float:
    """``weight`` before ``stop_step``, 0 from it on (``None``: never stop). E: patch
    regularisation "discontinued after 100,000 steps"; the same switch serves variance
    matching."""
    if stop_step is not None and step >= stop_step:
        return 0.0
    return weight


def variance_matching_loss(
    x0_hat: torch.Tensor,
    x0: torch.Tensor,
    weight: float = 1.0,
    time_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 2's regulariser per sample, ``(B,)``:
    ``weight * time_weight * (1/C) sum_c |var_c(x0) - var_c(x0_hat)|``.

    ``var_c`` is the variance of channel ``c`` of one sample over its spatial positions (the
    unbiased sample variance, ``torch.var``'s default; the paper says "per sample sample
    variance"). ``x0_hat`` and ``x0`` are ``(B, C, H, W)``. ``weight`` is ``lambda_VAR``
    (0.02-0.1 in section 5.4, 0.1 for rectified flow in H.2); ``time_weight`` ``(B,)`` is the
    objective's :meth:`~TrainingObjective.variance_matching_time_weight` (``w_VAR(t)`` of eq. 7
    for rectified flow).
    """
    predicted = x0_hat.float().var(dim=(-2, -1))
    true = x0.float().var(dim=(-2, -1))
    loss = weight * (true - predicted).abs().mean(dim=1)
    if time_weight is not None:
        loss = time_weight.to(loss.device, loss.dtype) * loss
    return loss


def patch_regularization_loss(activation: torch.Tensor) -> torch.Tensor:
    """Listing 1 (``patch_loss``): excess spectral power of the core un-patch output at the
    checkerboard frequencies, ``(B,)``.

    ``activation`` is the MDiT core's ``Unpatch`` output, channels-last ``(B, H, W, C)``.
    Steps, as in the listing: (1) the checkerboard frequencies of a 2x2 un-patching are
    ``(0, W/2)``, ``(H/2, 0)`` and ``(H/2, W/2)``; (2) ``|FFT2|`` over ``H, W`` in float32;
    (3) the baseline is the mean magnitude per sample and channel with those three
    frequencies zeroed, divided by ``H * W`` (the listing's ``(xf * mask).mean``, so the DC
    term is included and the three masked entries count as zeros); (4) the goal is the
    spectrum with the three frequencies replaced by that baseline; (5) ``relu(|FFT| - goal)``
    with the goal detached, so only power above the baseline is penalised and no gradient
    flows through the baseline; (6) mean over ``H, W, C``, i.e. the summed excess divided by
    ``H * W * C``. The baseline is per sample and channel as in the listing's code (its prose
    says "mean ... across batches and channels").
    """
    _, height, width, _ = activation.shape
    spectrum = torch.fft.fft2(activation.float(), dim=(-3, -2)).abs()
    checkerboard = [(0, width // 2), (height // 2, 0), (height // 2, width // 2)]
    mask = torch.ones(height, width, 1, dtype=spectrum.dtype, device=spectrum.device)
    for row, column in checkerboard:
        mask[row, column] = 0
    baseline = (spectrum * mask).mean(dim=(-3, -2))
    goal = spectrum.clone()
    for row, column in checkerboard:
        goal[:, row, column] = baseline
    return F.relu(spectrum - goal.detach()).mean(dim=(-3, -2, -1))


class ActivationCapture:
    """Keeps the output of ``module`` from the latest forward pass, through a forward hook:
    the way to reach ``model.core_unpatch``'s output for :func:`patch_regularization_loss`
    without changing the model. Use as a context manager or call :meth:`remove`.

    Example::

        with ActivationCapture(model.core_unpatch) as capture:
            output = model(batch.noisy, batch.model_timesteps).sample
        patch = patch_regularization_loss(capture.take())
    """

    def __init__(self, module: nn.Module):
        self._output: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._store)

    def _store(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._output = output

    def take(self) -> torch.Tensor:
        """The captured output, forgotten here so that it does not outlive its graph."""
        if self._output is None:
            raise RuntimeError("No output captured: the module did not run since the last take().")
        output, self._output = self._output, None
        return output

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> ActivationCapture:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def training_losses(
    objective: TrainingObjective,
    model_output: torch.Tensor,
    batch: NoisyBatch,
    variance_matching_weight: float = 0.0,
    patch_activation: torch.Tensor | None = None,
    patch_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The batch-mean loss terms and their sum, ``{"objective", "variance_matching", "patch",
    "loss"}``: the objective's loss, plus ``variance_matching_weight`` times eq. 2 (with the
    objective's time weight), plus ``patch_weight`` times listing 1 on ``patch_activation``.
    A term with weight 0 (e.g. switched off by :func:`scheduled_weight`) is not computed and
    reads 0."""
    zero = model_output.new_zeros((), dtype=torch.float32)
    terms = {"objective": objective.loss(model_output, batch).mean()}
    terms["variance_matching"] = zero
    if variance_matching_weight:
        x0_hat = objective.predict_x0(model_output, batch.noisy, batch.timesteps)
        time_weight = objective.variance_matching_time_weight(batch.timesteps)
        terms["variance_matching"] = variance_matching_loss(
            x0_hat, batch.x0, variance_matching_weight, time_weight
        ).mean()
    terms["patch"] = zero
    if patch_weight and patch_activation is not None:
        terms["patch"] = patch_weight * patch_regularization_loss(patch_activation).mean()
    terms["loss"] = terms["objective"] + terms["variance_matching"] + terms["patch"]
    return terms

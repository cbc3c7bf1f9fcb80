"""Core contribution over the sampling steps (MDiT paper appendix D, figure 15).

At every sampling step the outer level adds the core's (un-patched) output ``c`` to its own
skip stream ``s`` (``h = s + c``). Per sample this records

- the L2 norms of ``c`` and ``s`` (per token over channels, averaged over tokens, so the
  numbers do not depend on the grid size) and their ratio ``|c| / |s|``;
- the channel-wise relative contribution ``rho(c, s)`` of eq. 4, element by element, summed
  and divided by ``sum(|c| + |s|)``: the *relative contribution*, in ``[-1, 1]``, positive
  where the core dominates the sum; and the share of channels whose mean ``rho`` over tokens is
  positive (channels the core dominates).

Eq. 4 takes four sign cases (``c - s``, ``s - c``, ``c + s``, ``-c - s``); in every case it
equals ``|c| - |s|``, which the tests check case by case. Mean and standard deviation over the
samples are reported per step, as in figure 15.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .common import add_sampling_arguments, pyplot, sampling_labels, save_figure

HELP = "Core contribution per sampling step: core/skip L2 norms, ratio, rho of eq. 4."


def rho(c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Channel-wise relative contribution of eq. 4, element by element::

    rho(c, s) = c - s    if c >= 0 and s >= 0
                s - c    if c <  0 and s <  0
                c + s    if c >= 0 and s <  0
                -c - s   if c <  0 and s >= 0
    """
    c_pos, s_pos = c >= 0, s >= 0
    return torch.where(
        c_pos & s_pos,
        c - s,
        torch.where(~c_pos & ~s_pos, s - c, torch.where(c_pos & ~s_pos, c + s, -c - s)),
    )


@dataclass
class StepStatistics:
    """Per-sample statistics of one model call, each ``(B,)``."""

    core_norm: torch.Tensor
    skip_norm: torch.Tensor
    ratio: torch.Tensor
    relative_contribution: torch.Tensor
    core_dominant_channels: torch.Tensor


def contribution_statistics(core: torch.Tensor, skip: torch.Tensor) -> StepStatistics:
    """Statistics of channels-last ``core`` and ``skip`` grids ``(B, H, W, C)``."""
    core, skip = core.double(), skip.double()
    core_norm = core.norm(dim=-1).mean((1, 2))
    skip_norm = skip.norm(dim=-1).mean((1, 2))
    r = rho(core, skip)
    relative = r.sum((1, 2, 3)) / (core.abs() + skip.abs()).sum((1, 2, 3)).clamp_min(1e-30)
    dominant = (r.mean((1, 2)) > 0).double().mean(-1)
    return StepStatistics(core_norm, skip_norm, core_norm / skip_norm, relative, dominant)


@contextlib.contextmanager
def capture_core_and_skip(model: nn.Module):
    """Record ``(core, skip)`` of every forward call of an MDiT: the skip stream entering the
    core's patch embedding and the core's un-patched output, the two terms of ``h = s + c``.
    Yields a list that grows by one pair per call."""
    if not getattr(model, "has_outer_level", False):
        raise ValueError(
            "Core contribution compares the core with the outer level's skip stream, but this "
            "model has no outer level (M = N = 0, e.g. the DiT analog or DiffiT)."
        )
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    pending: list[torch.Tensor] = []

    def before_core(_module, inputs):
        pending.append(inputs[0].detach())

    def after_core(_module, _inputs, output):
        skip = pending.pop()
        if output.shape != skip.shape:  # e.g. a core_patch_schedule step (CoreResampling)
            raise RuntimeError(
                "Core contribution needs the core at full resolution; sample without "
                "core_patch_schedule."
            )
        pairs.append((output.detach(), skip))

    handles = [
        model.core_patch_embed.register_forward_pre_hook(before_core),
        model.core_unpatch.register_forward_hook(after_core),
    ]
    try:
        yield pairs
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class CoreContributionResult:
    """Mean and standard deviation over samples, per sampling step (lists of length steps).

    Attributes:
        timesteps: The scheduler's timestep of each step.
        peak_step: 1-based step with the largest mean core/skip norm ratio.
    """

    timesteps: list[int]
    num_samples: int
    core_norm_mean: list[float]
    core_norm_std: list[float]
    skip_norm_mean: list[float]
    skip_norm_std: list[float]
    ratio_mean: list[float]
    ratio_std: list[float]
    relative_contribution_mean: list[float]
    relative_contribution_std: list[float]
    core_dominant_channels_mean: list[float]
    core_dominant_channels_std: list[float]
    peak_step: int


@torch.no_grad()
def core_contribution(
    pipeline,
    num_images: int = 64,
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> CoreContributionResult:
    """Sample ``num_images`` images (classes cycled for class-conditional models) and collect
    the core contribution statistics at every step. With ``guidance_scale != 1`` only the
    conditional half of each guided batch is used (the hidden states of the images actually
    being generated, as in the spectrum analysis)."""
    model = pipeline.transformer
    fields = StepStatistics.__dataclass_fields__
    per_step: list[dict[str, list[torch.Tensor]]] = [
        {name: [] for name in fields} for _ in range(num_inference_steps)
    ]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    starts = range(0, num_images, batch_size)
    for start in tqdm(starts, desc="core-contribution", disable=not progress):
        count = min(batch_size, num_images - start)
        with capture_core_and_skip(model) as pairs:
            pipeline(
                **sampling_labels(pipeline, count, start, "Core contribution"),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="latent",
            )
        if len(pairs) != num_inference_steps:
            raise RuntimeError(
                f"Expected one model call per step ({num_inference_steps}), got {len(pairs)}; "
                "core contribution supports single-call schedulers (DDIM, DDPM, Euler)."
            )
        for step, (core, skip) in enumerate(pairs):
            # A guided call batches [unconditional, conditional]: keep the images being made.
            stats = contribution_statistics(core[-count:], skip[-count:])
            for name in fields:
                per_step[step][name].append(getattr(stats, name))
    timesteps = [int(t) for t in pipeline.scheduler.timesteps]

    def summary(name):
        values = [torch.cat(step[name]) for step in per_step]
        mean = [float(v.mean()) for v in values]
        std = [float(v.std(unbiased=False)) for v in values]
        return mean, std

    columns = {}
    for name in fields:
        columns[f"{name}_mean"], columns[f"{name}_std"] = summary(name)
    return CoreContributionResult(
        timesteps=timesteps,
        num_samples=num_images,
        peak_step=int(np.argmax(columns["ratio_mean"])) + 1,
        **columns,
    )


def plot_core_contribution(result: CoreContributionResult, path: str) -> str:
    """Figure 15 (a-b): L2 norms of core and skip, and their ratio with the relative
    contribution, mean and 1-sigma band over samples vs sampling step; the peak-ratio step
    dashed."""
    plt = pyplot()
    steps = np.arange(1, len(result.timesteps) + 1)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)

    def band(ax, name, label, color):
        mean = np.array(getattr(result, f"{name}_mean"))
        std = np.array(getattr(result, f"{name}_std"))
        ax.plot(steps, mean, color=color, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)

    band(left, "core_norm", "core output", "tab:red")
    band(left, "skip_norm", "skip connection", "tab:blue")
    left.set_ylabel("L2 norm per token")
    left.set_title("(a) L2 norms")
    band(right, "ratio", "L2 norm ratio core / skip", "tab:green")
    band(right, "relative_contribution", "relative contribution (eq. 4)", "tab:purple")
    right.axhline(0, color="grey", linewidth=0.6)
    right.set_title("(b) ratio and channel-wise relative contribution")
    for ax in (left, right):
        ax.axvline(result.peak_step, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel(
            f"sampling step (of {len(steps)}; dashed: peak ratio, step {result.peak_step})"
        )
        ax.legend(fontsize=8)
    figure.suptitle(f"Core contribution, mean and 1-sigma over {result.num_samples} samples")
    return save_figure(figure, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_sampling_arguments(parser, num_images=64)
    parser.add_argument("--batch_size", type=int, default=32, help="images per pipeline call")


def run_cli(loaded, args: argparse.Namespace) -> dict:
    pipeline = loaded.require_pipeline("core-contribution")
    result = core_contribution(
        pipeline,
        args.num_images,
        args.num_inference_steps,
        args.guidance_scale,
        args.batch_size,
        seed=args.seed,
    )
    path = plot_core_contribution(result, os.path.join(args.output_dir, "core_contribution.png"))
    print(f"core-contribution: wrote {path}")
    print(" step  timestep  |core|/|skip|  relative contribution")
    relative = zip(result.relative_contribution_mean, result.relative_contribution_std, strict=True)
    for i, (t, (mean, std)) in enumerate(zip(result.timesteps, relative, strict=True)):
        ratio = f"{result.ratio_mean[i]:8.3f}+-{result.ratio_std[i]:.3f}"
        print(f"{i + 1:5d} {t:9d} {ratio} {mean:+10.3f}+-{std:.3f}")
    return {"result": result, "png": [path]}

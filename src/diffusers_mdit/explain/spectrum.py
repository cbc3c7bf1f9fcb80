"""Radial spectral power of the core blocks' outputs (MDiT paper section 3.3, figure 3).

At one sampling step (12 of 25 in the paper, near the peak core contribution) the output
hidden states of every core-level block (core and aggregate blocks) are captured; each is
Fourier transformed over the grid per channel, and the magnitudes ``|F|`` are averaged over
samples and channels and over rings of equal integer radius around the zero frequency: a
1-D radial profile per block, from the mean (radius 0) to the highest frequencies. Figure 3
compares these profiles through the depth of the core; aggregate blocks are drawn dashed red.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .common import (
    add_sampling_arguments,
    block_names,
    pyplot,
    require_block_levels,
    sampling_labels,
    save_figure,
)

HELP = "Radial spectral power of every core block's output at one sampling step (figure 3)."

CORE_LEVELS = ("core", "aggregate")


def radial_radius(height: int, width: int) -> torch.Tensor:
    """``(height, width)`` integer distance (rounded) of each frequency from the zero
    frequency, for a spectrum shifted by ``torch.fft.fftshift`` (zero at ``(H // 2, W // 2)``)."""
    y = torch.arange(height, dtype=torch.float64) - height // 2
    x = torch.arange(width, dtype=torch.float64) - width // 2
    return torch.sqrt(y[:, None] ** 2 + x[None, :] ** 2).round().long()


def radial_power(x: torch.Tensor) -> torch.Tensor:
    """Radial profile of the 2-D amplitude spectrum of channels-last grids ``(B, H, W, C)``.

    The FFT runs over ``H`` and ``W`` per sample and channel (orthonormal, so a grid's total
    energy does not depend on its size); ``|F|`` is averaged over samples and channels,
    shifted so the zero frequency is in the centre and averaged over the frequencies at each
    integer radius (rounded distance from the centre). Returns ``(bins,)`` float64, index =
    radius in cycles per grid: bin 0 is the mean (DC), the last bin the corners,
    ``bins = round(sqrt((H // 2)^2 + (W // 2)^2)) + 1``.

    The magnitude ``|F|`` rather than the power ``|F|^2``: the paper flattens "the absolute
    values"; on figure 3's log axis the two differ by a factor of 2 in slope only.
    """
    if x.ndim != 4:
        raise ValueError(f"Expected channels-last grids (B, H, W, C), got shape {tuple(x.shape)}.")
    height, width = x.shape[1:3]
    spectrum = torch.fft.fft2(x.double(), dim=(1, 2), norm="ortho").abs().mean((0, 3))
    spectrum = torch.fft.fftshift(spectrum, dim=(0, 1)).flatten()
    radius = radial_radius(height, width).flatten()
    bins = int(radius.max()) + 1
    total = torch.zeros(bins, dtype=torch.float64).index_add_(0, radius, spectrum)
    count = torch.bincount(radius, minlength=bins).double()
    return total / count


@dataclass
class SpectrumResult:
    """Radial profiles of the core-level blocks at one sampling step.

    Attributes:
        step: 1-based sampling step of the capture.
        timestep: The scheduler's timestep at that step.
        blocks: Block names in execution order (``"core.0"``, ``"aggregate.0"``, ...).
        levels: ``"core"`` or ``"aggregate"`` per block.
        profiles: Per block, :func:`radial_power` of its output (index = radius).
        grid: ``(H, W)`` of the core grid.
        num_samples: Samples averaged (the conditional half when guided).
    """

    step: int
    num_inference_steps: int
    timestep: int
    guidance_scale: float
    num_samples: int
    grid: tuple[int, int]
    blocks: list[str]
    levels: list[str]
    profiles: list[list[float]]


@contextlib.contextmanager
def capture_at_call(
    model: nn.Module, blocks: dict[str, nn.Module], call: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Record each block's output during the model's ``call``-th forward (0-based) only;
    yields ``{name: output}``, filled once that call has run."""
    calls = [-1]
    outputs: dict[str, torch.Tensor] = {}

    def count(_module, _args):
        calls[0] += 1

    def record(_module, _args, output, name):
        if calls[0] == call:
            outputs[name] = (output[0] if isinstance(output, tuple) else output).detach()

    handles = [model.register_forward_pre_hook(count)]
    for name, block in blocks.items():
        handles.append(
            block.register_forward_hook(lambda m, a, o, name=name: record(m, a, o, name))
        )
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def core_level_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The core and aggregate blocks of an MDiT, by name, in execution order."""
    require_block_levels(model, "The spectrum of core blocks")
    return {name: b for name, b in block_names(model) if name.rsplit(".", 1)[0] in CORE_LEVELS}


@torch.no_grad()
def spectral_analysis(
    pipeline,
    step: int | None = None,
    num_images: int = 16,
    num_inference_steps: int = 25,
    guidance_scale: float = 1.0,
    seed: int = 0,
) -> SpectrumResult:
    """Sample ``num_images`` (classes cycled for class-conditional models) and take the radial
    profile of every core-level block's output at sampling ``step`` (1-based; default
    ``num_inference_steps // 2``, the paper's 12 of 25).

    With classifier-free guidance the model sees ``[unconditional, conditional]``; only the
    conditional half is used, the hidden states of the images actually being generated.
    """
    step = num_inference_steps // 2 if step is None else step
    if not 1 <= step <= num_inference_steps:
        raise ValueError(
            f"step must be in 1..num_inference_steps ({num_inference_steps}), got {step}."
        )
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}.")
    model = pipeline.transformer
    blocks = core_level_blocks(model)
    labels = sampling_labels(pipeline, num_images, analysis="The spectrum analysis")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with capture_at_call(model, blocks, step - 1) as outputs:
        pipeline(
            **labels,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            output_type="latent",
        )
    if set(outputs) != set(blocks):
        raise RuntimeError(
            f"Captured {sorted(outputs)} at step {step}, expected every core block; the "
            "scheduler must call the model once per step (DDIM, DDPM, Euler)."
        )
    guided = guidance_scale != 1.0
    profiles, grid = [], None
    for name in blocks:
        hidden = outputs[name]
        if guided:
            hidden = hidden.chunk(2)[1]
        grid = tuple(hidden.shape[1:3])
        profiles.append(radial_power(hidden.float()).tolist())
    return SpectrumResult(
        step=step,
        num_inference_steps=num_inference_steps,
        timestep=int(pipeline.scheduler.timesteps[step - 1]),
        guidance_scale=guidance_scale,
        num_samples=num_images,
        grid=grid,
        blocks=list(blocks),
        levels=[name.rsplit(".", 1)[0] for name in blocks],
        profiles=profiles,
    )


def plot_spectrum(result: SpectrumResult, output_dir: str) -> str:
    """``spectrum.png``, figure 3: radial profile per core block, coloured by depth
    (viridis, early dark), aggregate blocks dashed red; log y."""
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(result.blocks)))
    for name, level, profile, colour in zip(
        result.blocks, result.levels, result.profiles, colours, strict=True
    ):
        style = {"color": "red", "linestyle": "--"} if level == "aggregate" else {"color": colour}
        ax.plot(np.arange(len(profile)), profile, marker=".", label=name, **style)
    ax.set_yscale("log")
    ax.set_xlabel(f"radius (cycles per {result.grid[0]}x{result.grid[1]} core grid)")
    ax.set_ylabel("mean |FFT| of block output")
    ax.set_title(
        f"Radial spectral power, step {result.step}/{result.num_inference_steps} "
        f"(t={result.timestep}), {result.num_samples} samples"
    )
    ax.legend(fontsize=7, ncol=2)
    return save_figure(figure, os.path.join(output_dir, "spectrum.png"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--step", type=int, default=None, help="1-based sampling step (default: steps // 2)"
    )
    add_sampling_arguments(parser, num_images=16)


def run_cli(loaded, args: argparse.Namespace) -> dict:
    pipeline = loaded.require_pipeline("spectrum")
    result = spectral_analysis(
        pipeline,
        step=args.step,
        num_images=args.num_images,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    path = plot_spectrum(result, args.output_dir)
    print(f"spectrum: wrote {path}")
    print(f"  step {result.step}/{result.num_inference_steps} (t={result.timestep}), |F| by radius")
    for name, profile in zip(result.blocks, result.profiles, strict=True):
        print(f"  {name:>12}: " + " ".join(f"{p:9.4g}" for p in profile))
    return {"result": result, "png": [path]}

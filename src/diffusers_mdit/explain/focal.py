"""Axial-RoPE focal patterns (MDiT paper appendix I.5, figure 30).

Axial RoPE turns a query's position pairs into the amplitudes of a 2-D harmonic series: pair
``j`` of the x group oscillates as ``cos(theta_j dx)`` with the column offset ``dx``, pair ``j``
of the y group as ``cos(theta_j dy)``. Weighting each harmonic with the pair's mean energy
``|z|^2`` from the RoPE probe and summing gives a head's focal pattern around a token,

    F(dx, dy) = (sum_j a_j cos(theta_j dx) + sum_j b_j cos(theta_j dy)) / P,

with ``a``, ``b`` the x and y pair energies and ``P`` the number of position pairs, so a head
that spreads its energy evenly (every ``|z|^2 = 2``) peaks at 2 in the centre, the paper's
plotting range ``[0, 2]``. Offsets are in the layer's own tokens (outer: latent pixels, core:
patches, aggregate: merged 2x2 patches); neighborhood windows are drawn as red squares.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import numpy as np
import torch

from .common import pyplot, save_figure
from .rope_probe import RopeProbeResult, rope_probe

HELP = "Axial-RoPE focal pattern of every head around a centre token (appendix I.5)."


def focal_pattern(
    position_energy: np.ndarray | torch.Tensor, frequencies: list[float], size: int = 16
) -> np.ndarray:
    """A head's ``(size, size)`` focal pattern from the mean ``|z|^2`` of its ``P`` position
    pairs (x pairs then y pairs, ``P / 2`` each, with angular frequencies ``frequencies``),
    centred on token ``(size // 2, size // 2)``; rows are ``dy``, columns ``dx``."""
    energy = np.asarray(position_energy, dtype=np.float64)
    theta = np.asarray(frequencies, dtype=np.float64)
    half = len(theta)
    if energy.shape != (2 * half,):
        raise ValueError(
            f"Expected {2 * half} position-pair energies (x then y), got shape {energy.shape}."
        )
    offsets = np.arange(size) - size // 2
    along_x = (energy[:half, None] * np.cos(theta[:, None] * offsets)).sum(0)
    along_y = (energy[half:, None] * np.cos(theta[:, None] * offsets)).sum(0)
    return (along_y[:, None] + along_x[None, :]) / (2 * half)


@dataclass
class FocalResult:
    """Focal patterns per layer and head (``patterns[layer][head]`` is ``(size, size)``)."""

    layers: list[str]
    kernel_sizes: list[int | None]
    size: int
    patterns: list[list[np.ndarray]]
    centre_amplitude: list[list[float]]
    anisotropy: list[list[float]]


def focal_patterns(probe: RopeProbeResult, size: int = 16, which: str = "q") -> FocalResult:
    """Focal patterns of every head from a RoPE probe of an axial-RoPE model (``which``: the
    query (``"q"``, as figure 30) or key vectors).

    ``anisotropy`` per head is ``(sum a - sum b) / (sum a + sum b)``: +1 for a head that only
    encodes columns (vertical bars), -1 for rows only (horizontal bars), 0 for balanced."""
    if probe.axes != 2:
        raise ValueError("Focal patterns need axial (2-D) RoPE; this probe is of a 1-D model.")
    p = probe.num_position_pairs
    patterns, centre, anisotropy = [], [], []
    for layer in probe.layers:
        energy = getattr(layer, which)[:, :p] + 2.0  # |z|^2 of the position pairs
        patterns.append([focal_pattern(e, probe.frequencies, size) for e in energy])
        centre.append([float(e.mean()) for e in energy])
        x, y = energy[:, : p // 2].sum(1), energy[:, p // 2 :].sum(1)
        anisotropy.append(((x - y) / (x + y)).tolist())
    return FocalResult(
        layers=[layer.name for layer in probe.layers],
        kernel_sizes=[layer.kernel_size for layer in probe.layers],
        size=size,
        patterns=patterns,
        centre_amplitude=centre,
        anisotropy=anisotropy,
    )


def plot_focal(result: FocalResult, path: str) -> str:
    """Figure 30: one row per layer, heads side by side, amplitude range [0, 2]; neighborhood
    windows in red."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    rows = len(result.layers)
    cols = max(len(p) for p in result.patterns)
    figure, axes = plt.subplots(
        rows, cols, figsize=(1.2 * cols + 1.5, 1.2 * rows + 0.6), squeeze=False
    )
    image = None
    centre = result.size // 2
    for r, (name, kernel, heads) in enumerate(
        zip(result.layers, result.kernel_sizes, result.patterns, strict=True)
    ):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(heads):
                ax.axis("off")
                continue
            image = ax.imshow(heads[c], cmap="inferno", vmin=0, vmax=2, interpolation="nearest")
            if kernel is not None:
                start = centre - kernel // 2 - 0.5
                ax.add_patch(
                    Rectangle((start, start), kernel, kernel, fill=False, color="red", lw=1)
                )
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    figure.colorbar(image, ax=axes, shrink=0.6, label="focal amplitude")
    figure.suptitle(
        f"Axial-RoPE query focal patterns around the centre of {result.size}x{result.size} tokens"
    )
    return save_figure(figure, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=16, help="tokens per side of the pattern")
    parser.add_argument("--num_tokens", type=int, default=4096, help="random tokens per layer")
    parser.add_argument("--vectors", choices=["q", "k"], default="q", help="query or key heads")


def run_cli(loaded, args: argparse.Namespace) -> dict:
    probe = rope_probe(loaded.model, args.num_tokens, seed=args.seed)
    result = focal_patterns(probe, args.size, args.vectors)
    path = plot_focal(result, os.path.join(args.output_dir, "focal.png"))
    print(f"focal: wrote {path}")
    for name, centre, aniso in zip(
        result.layers, result.centre_amplitude, result.anisotropy, strict=True
    ):
        print(
            f"  {name:>12}: centre amplitude {np.mean(centre):.2f}, "
            f"anisotropy (x - y) / (x + y) {np.mean(aniso):+.2f}"
        )
    return {
        "layers": result.layers,
        "kernel_sizes": result.kernel_sizes,
        "size": result.size,
        "centre_amplitude": result.centre_amplitude,
        "anisotropy": result.anisotropy,
        "patterns": result.patterns,
        "png": [path],
    }

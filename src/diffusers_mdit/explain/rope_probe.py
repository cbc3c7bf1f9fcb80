"""RoPE attention probe (MDiT paper section 4.1, figures 5 and 88; appendix K for language
models).

Every self-attention layer is fed random normal activations; the queries and keys it makes are
read as complex pairs, and the mean squared magnitude of each pair, minus 2, is recorded per
head. With LayerNorm-ed queries and keys (zero mean, unit variance over a head's ``D``
channels) the ``D / 2`` pairs of a head share an energy of ``D``, so a pair's mean ``|z|^2`` is
2 on average and ``|z|^2 - 2`` says whether the layer's projections reach it more (> 0, red) or
less (< 0, blue) than average. Pairs that RoPE rotates carry position; the others
(partial-head RoPE) carry none, so a head whose energy sits in one group or the other is
**positional** or **semantic**, and one with moderate energy in both is **hybrid**.

Classification rule (the paper gives the three classes but no threshold; ours): with
``E_pos`` and ``E_sem`` the mean ``|z|^2`` of a head's position and semantic pairs (Q and K
averaged), a group is *weak* when its mean is below ``weak_fraction`` (default 0.5) of the
head's overall mean 2. A head is positional when its semantic pairs are weak, semantic when its
position pairs are weak, hybrid otherwise (the shared energy budget keeps both from being weak).

The probe works for every layer built on our :class:`GridSelfAttention` (MDiT, any block
level) and for rotary language models through :func:`rope_probe_language_model` (GPT-J's
interleaved pairs, Llama/NeoX's rotate-half pairs).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models.attention import GridSelfAttention
from .common import block_names, has_block_levels, pyplot, save_figure

HELP = "RoPE attention probe: per-head Q/K complex magnitudes, positional/semantic/hybrid heads."

CLASSES = ("positional", "semantic", "hybrid")


@dataclass
class LayerProbe:
    """Probe of one self-attention layer.

    Attributes:
        name: Layer (block) name, e.g. ``"core.3"``.
        q, k: ``(heads, head_dim / 2)`` mean ``|z|^2 - 2`` of each complex pair of each head
            (pairs ordered position first: x then y for 2-D RoPE, then semantic).
        position_energy, semantic_energy: Per head, mean ``|z|^2`` of its position and semantic
            pairs (Q and K averaged).
        classes: Per head ``"positional"``, ``"semantic"`` or ``"hybrid"``.
        kernel_size: The layer's neighborhood size (``None``: global attention).
    """

    name: str
    q: np.ndarray
    k: np.ndarray
    position_energy: list[float]
    semantic_energy: list[float]
    classes: list[str]
    kernel_size: int | None = None


@dataclass
class RopeProbeResult:
    """Probe of every self-attention layer of a model.

    Attributes:
        layers: Per layer, in execution order.
        num_position_pairs: Complex pairs per head that RoPE rotates (``r_dim``).
        axes: 2 for axial RoPE (the position pairs split into x then y), 1 for language models.
        frequencies: RoPE angular frequency of each position pair (per axis for axial RoPE).
        weak_fraction: The classification threshold used.
        counts: Number of heads of each class, over all layers.
    """

    layers: list[LayerProbe]
    num_position_pairs: int
    axes: int
    frequencies: list[float]
    weak_fraction: float
    counts: dict[str, int] = field(default_factory=dict)

    def classes_by_layer(self) -> dict[str, dict[str, int]]:
        """``{layer: {class: heads}}``."""
        return {layer.name: {c: layer.classes.count(c) for c in CLASSES} for layer in self.layers}


def complex_magnitudes(vectors: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
    """Mean ``|z|^2 - 2`` per head and complex pair.

    Args:
        vectors: ``(N, heads, head_dim)`` unit-variance query or key vectors.
        pair_index: ``(pairs, 2)`` channel indices of the real and imaginary part of each pair,
            in the order to report them.

    Returns:
        ``(heads, pairs)``.
    """
    vectors = vectors.double()
    real = vectors[..., pair_index[:, 0]]
    imag = vectors[..., pair_index[:, 1]]
    return (real.square() + imag.square()).mean(0) - 2.0


def classify_heads(
    q: torch.Tensor | np.ndarray,
    k: torch.Tensor | np.ndarray,
    num_position_pairs: int,
    weak_fraction: float = 0.5,
) -> tuple[list[str], list[float], list[float]]:
    """Positional / semantic / hybrid per head from ``|z|^2 - 2`` arrays ``(heads, pairs)``
    whose first ``num_position_pairs`` pairs carry position (see the module docstring).

    Returns the classes and each head's mean position and semantic pair energy ``|z|^2``.
    """
    energy = (torch.as_tensor(q) + torch.as_tensor(k)).double() / 2 + 2.0
    position = energy[:, :num_position_pairs].mean(1)
    if num_position_pairs < energy.shape[1]:
        semantic = energy[:, num_position_pairs:].mean(1)
    else:  # every pair rotates (e.g. Llama): no semantic pairs to compare with
        semantic = torch.full_like(position, float("nan"))
    weak = weak_fraction * 2.0
    classes = []
    for pos, sem in zip(position.tolist(), semantic.tolist(), strict=True):
        if math.isnan(sem):
            classes.append("positional")
        elif sem < weak <= pos:
            classes.append("positional")
        elif pos < weak <= sem:
            classes.append("semantic")
        else:
            classes.append("hybrid")
    return classes, position.tolist(), semantic.tolist()


def _counts(layers: list[LayerProbe]) -> dict[str, int]:
    classes = [c for layer in layers for c in layer.classes]
    return {c: classes.count(c) for c in CLASSES}


# -- our models -----------------------------------------------------------------------------


def attention_layers(model: nn.Module) -> list[tuple[str, GridSelfAttention]]:
    """The model's RoPE self-attention layers, named by block (``"outer_in.0"``, ...) for
    models with block levels (MDiT) and by module path otherwise."""
    if has_block_levels(model):
        return [(name, block.attn) for name, block in block_names(model)]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GridSelfAttention)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no GridSelfAttention layers with partial-head RoPE to "
            "probe; for a rotary language model use rope_probe_language_model."
        )
    return layers


def _grid_pair_index(head_dim: int) -> torch.Tensor:
    pairs = torch.arange(head_dim // 2)
    return torch.stack([2 * pairs, 2 * pairs + 1], dim=1)


@torch.no_grad()
def rope_probe(
    model: nn.Module,
    num_tokens: int = 4096,
    weak_fraction: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> RopeProbeResult:
    """Probe every RoPE self-attention layer of ``model`` (MDiT, or any model built on our
    :class:`GridSelfAttention`) with ``num_tokens`` random normal input tokens.

    The tokens go through the layer's own :meth:`GridSelfAttention.project` (projection,
    per-head LayerNorm, rotation; the rotation leaves magnitudes unchanged).
    """
    layers = attention_layers(model)
    generator = torch.Generator().manual_seed(seed)
    side = max(1, int(math.sqrt(num_tokens)))
    probes = []
    rope = layers[0][1].rope
    for name, attn in tqdm(layers, desc="rope-probe", disable=not progress):
        weight = attn.to_q.weight
        x = torch.randn(1, side, side, weight.shape[1], generator=generator)
        q, k, _ = attn.project(x.to(device=weight.device, dtype=weight.dtype))
        index = _grid_pair_index(attn.head_dim).to(q.device)
        q = complex_magnitudes(q.flatten(0, 2), index).cpu()
        k = complex_magnitudes(k.flatten(0, 2), index).cpu()
        classes, position, semantic = classify_heads(
            q, k, attn.rope.num_position_pairs, weak_fraction
        )
        probes.append(
            LayerProbe(name, q.numpy(), k.numpy(), position, semantic, classes, attn.kernel_size)
        )
    return RopeProbeResult(
        layers=probes,
        num_position_pairs=rope.num_position_pairs,
        axes=2,
        frequencies=rope.frequencies().tolist(),
        weak_fraction=weak_fraction,
        counts=_counts(probes),
    )


# -- rotary language models (appendix K) -----------------------------------------------------


def _language_model_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, attention)`` for each layer: modules with ``q_proj`` and ``k_proj``."""
    layers = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "q_proj", None), nn.Linear)
        and isinstance(getattr(module, "k_proj", None), nn.Linear)
    ]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with q_proj and k_proj; the "
            "language-model probe supports GPT-J and Llama-style (transformers) models."
        )
    return layers


def _rotary_layout(config) -> tuple[int, int, str, float]:
    """``(head_dim, rotary_dim, style, base)`` from a transformers config."""
    heads = config.num_attention_heads if hasattr(config, "num_attention_heads") else config.n_head
    hidden = config.hidden_size if hasattr(config, "hidden_size") else config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    rope = getattr(config, "rope_parameters", None) or {}
    base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if getattr(config, "rotary_dim", None):  # GPT-J: interleaved pairs (rotate_every_two)
        return head_dim, int(config.rotary_dim), "interleaved", base
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return head_dim, int(head_dim * (factor or 1.0)), "half", base


def language_model_pair_index(head_dim: int, rotary_dim: int, style: str) -> torch.Tensor:
    """Channel pairs of a rotary head, rotated pairs first (by frequency, fastest first), then
    the unrotated channels in consecutive pairs.

    ``style="interleaved"`` (GPT-J): pair ``i`` is channels ``(2i, 2i + 1)``;
    ``style="half"`` (Llama, GPT-NeoX): pair ``i`` is ``(i, i + rotary_dim / 2)``.
    """
    if style not in ("interleaved", "half"):
        raise ValueError(f"Unknown rotary style {style!r}; use 'interleaved' or 'half'.")
    half = rotary_dim // 2
    i = torch.arange(half)
    rotated = torch.stack([2 * i, 2 * i + 1] if style == "interleaved" else [i, i + half], dim=1)
    rest = torch.arange(rotary_dim, head_dim).view(-1, 2)
    return torch.cat([rotated, rest])


@torch.no_grad()
def rope_probe_language_model(
    model: nn.Module,
    num_tokens: int = 4096,
    weak_fraction: float = 0.5,
    normalize: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> RopeProbeResult:
    """The same probe for a rotary transformers language model (GPT-J, Llama, ...).

    Random normal hidden states go through each layer's ``q_proj`` and ``k_proj``. Language
    models do not LayerNorm their queries and keys, so with ``normalize`` (default) each head
    vector is LayerNorm-ed first, putting every head on the same unit-variance scale as in
    MDiT; the paper notes the probe is less telling without such normalisation. Grouped-query
    keys are repeated to their query heads for the classification.
    """
    config = model.config
    head_dim, rotary_dim, style, base = _rotary_layout(config)
    index = language_model_pair_index(head_dim, rotary_dim, style)
    generator = torch.Generator().manual_seed(seed)
    probes = []
    for name, attn in tqdm(_language_model_layers(model), desc="rope-probe", disable=not progress):
        weight = attn.q_proj.weight
        x = torch.randn(num_tokens, weight.shape[1], generator=generator)
        x = x.to(device=weight.device, dtype=weight.dtype)
        q = attn.q_proj(x).float().unflatten(-1, (-1, head_dim))
        k = attn.k_proj(x).float().unflatten(-1, (-1, head_dim))
        if normalize:
            q, k = F.layer_norm(q, (head_dim,)), F.layer_norm(k, (head_dim,))
        q = complex_magnitudes(q, index.to(q.device)).cpu()
        k = complex_magnitudes(k, index.to(k.device)).cpu()
        k_per_query = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
        classes, position, semantic = classify_heads(q, k_per_query, rotary_dim // 2, weak_fraction)
        probes.append(LayerProbe(name, q.numpy(), k.numpy(), position, semantic, classes))
    frequencies = base ** (-torch.arange(rotary_dim // 2, dtype=torch.float64) * 2 / rotary_dim)
    return RopeProbeResult(
        layers=probes,
        num_position_pairs=rotary_dim // 2,
        axes=1,
        frequencies=frequencies.tolist(),
        weak_fraction=weak_fraction,
        counts=_counts(probes),
    )


# -- plot -----------------------------------------------------------------------------------

CLASS_COLOURS = {"positional": "tab:orange", "semantic": "tab:blue", "hybrid": "tab:purple"}


def plot_rope_probe(result: RopeProbeResult, path: str, title: str | None = None) -> str:
    """Heat map like figure 5: layers along x (their heads side by side), complex channels
    along y grouped x-position / y-position / semantic (position / semantic for language
    models), Q above K; red = strong, blue = weak; a strip under each panel gives each head's
    class."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    pairs = result.layers[0].q.shape[1]
    widths = [layer.q.shape[0] for layer in result.layers]
    edges = np.cumsum([0] + widths)
    figure, axes = plt.subplots(
        4,
        1,
        figsize=(max(6.0, 0.12 * edges[-1] + 2), max(5.0, 0.09 * pairs * 2 + 2.5)),
        gridspec_kw={"height_ratios": [pairs, 1.2, pairs, 1.2]},
        constrained_layout=True,
    )
    p = result.num_position_pairs
    groups = (
        [(p / 4, "x pos."), (3 * p / 4, "y pos."), ((p + pairs) / 2, "semantic")]
        if result.axes == 2
        else [(p / 2, "position"), ((p + pairs) / 2, "semantic")]
    )
    image = None
    class_map = ListedColormap([CLASS_COLOURS[c] for c in CLASSES])
    for row, which in ((0, "q"), (2, "k")):
        ax = axes[row]
        values = np.concatenate([getattr(layer, which).T for layer in result.layers], axis=1)
        image = ax.imshow(values, aspect="auto", cmap="coolwarm", vmin=-2, vmax=2,
                          interpolation="nearest")  # fmt: skip
        for edge in edges[1:-1]:
            ax.axvline(edge - 0.5, color="black", linewidth=1.0)
        boundaries = [p / 2, p] if result.axes == 2 else [p]
        for boundary in boundaries:
            if boundary < pairs:
                ax.axhline(boundary - 0.5, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks([g[0] - 0.5 for g in groups], [g[1] for g in groups])
        ax.set_xticks([])
        ax.set_ylabel(which.upper())
        strip = axes[row + 1]
        classes = [CLASSES.index(c) for layer in result.layers for c in layer.classes]
        strip.imshow([classes], aspect="auto", cmap=class_map, vmin=-0.5, vmax=2.5,
                     interpolation="nearest")  # fmt: skip
        for edge in edges[1:-1]:
            strip.axvline(edge - 0.5, color="black", linewidth=1.0)
        strip.set_yticks([])
        strip.set_xticks([])
    names = [layer.name for layer in result.layers]
    axes[3].set_xticks((edges[:-1] + edges[1:]) / 2 - 0.5, names, rotation=90, fontsize=7)
    figure.colorbar(image, ax=axes[[0, 2]], label="mean |z|² − 2", shrink=0.8)
    figure.legend(
        handles=[Patch(color=CLASS_COLOURS[c], label=f"{c} head") for c in CLASSES],
        loc="outside lower center",
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    axes[0].set_title(title or "RoPE attention probe (heads per layer; red strong, blue weak)")
    return save_figure(figure, path)


# -- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num_tokens", type=int, default=4096, help="random tokens per layer")
    parser.add_argument(
        "--weak_fraction",
        type=float,
        default=0.5,
        help="a channel group is weak below this fraction of the mean pair energy 2",
    )


def run_cli(loaded, args: argparse.Namespace) -> dict:
    result = rope_probe(loaded.model, args.num_tokens, args.weak_fraction, seed=args.seed)
    path = plot_rope_probe(result, os.path.join(args.output_dir, "rope_probe.png"))
    print(f"rope-probe: wrote {path}")
    for name, counts in result.classes_by_layer().items():
        print(f"  {name:>12}: " + ", ".join(f"{n} {c}" for c, n in counts.items()))
    return {"result": result, "classes_by_layer": result.classes_by_layer(), "png": [path]}

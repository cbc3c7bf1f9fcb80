"""Layer-wise MLP probes (MDiT paper section 4.2, figure 5e; appendix F.2, figures 17 and 18).

Classification probes (Alain & Bengio, 2017) read how much class information each block's
hidden state carries. The model is frozen and run unconditionally (``c = null``) on clean
inputs (``t = 0``; an x0 model then reconstructs its input) or, for the timestep sweep of
appendix F.2, on inputs noised to timestep ``t``. Every block output ``(B, H, W, C)`` is
average-pooled over its grid to ``(B, C)`` (the probe's "average pooling input layer"), and a
two-layer MLP (Linear-GELU-Linear) is trained per block on a fixed, seeded, stratified split;
its top-1 accuracy on the held-out part is plotted against normalised network depth, with the
core region (core and aggregate blocks) marked. The paper sees the accuracy rise through the
encoder half ("semantic encode"), peak near 60% of the depth and fall again ("semantic
decode"); over timesteps the peak accuracy is highest at moderate noise (t = 110 on ImageNet).

The paper does not give the probe's width, optimiser or schedule; ours: features standardised
with the training part's statistics, hidden width 256, AdamW (lr 1e-3, weight decay 1e-4),
mini-batches of 256, 100 epochs.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.splits import stratified_split
from .common import (
    block_names,
    capture_outputs,
    normalised_depth,
    pyplot,
    require_block_levels,
    save_figure,
)

HELP = "Layer-wise MLP probes: class accuracy of every block's pooled output vs depth (4.2, F.2)."

CORE_LEVELS = ("core", "aggregate")


# -- the probe ------------------------------------------------------------------------------


@dataclass
class ProbeScore:
    """Top-1 accuracy of one trained probe on the held-out and the training features."""

    accuracy: float
    train_accuracy: float


def train_probe(
    features_train: torch.Tensor,
    labels_train: torch.Tensor,
    features_test: torch.Tensor,
    labels_test: torch.Tensor,
    hidden: int = 256,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    num_classes: int | None = None,
    seed: int = 0,
) -> ProbeScore:
    """Train a two-layer MLP probe (Linear-GELU-Linear) and score it.

    Args:
        features_train, features_test: ``(N, C)`` pooled features; both are standardised with
            the training features' per-channel mean and standard deviation.
        labels_train, labels_test: ``(N,)`` integer classes in ``[0, num_classes)``.
        hidden: Hidden width of the MLP.
        epochs: Passes over the training features, in seeded random mini-batches.
        batch_size: Mini-batch size (the whole set when larger).
        lr, weight_decay: AdamW settings.
        num_classes: Output width (default: one more than the largest label seen).
        seed: Seeds the initialisation and the batch order: the result is deterministic.

    Returns:
        Top-1 accuracy on the held-out and on the training features.
    """
    x_train = features_train.detach().float().cpu()
    x_test = features_test.detach().float().cpu()
    y_train = labels_train.detach().long().cpu()
    y_test = labels_test.detach().long().cpu()
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(
            f"Features must be (N, C) with the same C, got {tuple(x_train.shape)} and "
            f"{tuple(x_test.shape)}; pool block outputs with pooled_block_features first."
        )
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError("Each feature row needs exactly one label.")
    if len(x_train) == 0 or len(x_test) == 0:
        raise ValueError("The probe needs at least one training and one held-out example.")
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    mean = x_train.mean(0)
    std = x_train.std(0, unbiased=False).clamp_min(1e-6)
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std

    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = nn.Sequential(
            nn.Linear(x_train.shape[1], hidden), nn.GELU(), nn.Linear(hidden, num_classes)
        )
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(x_train), generator=generator)
            for batch in order.split(batch_size):
                loss = F.cross_entropy(probe(x_train[batch]), y_train[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        accuracy = (probe(x_test).argmax(1) == y_test).float().mean().item()
        train_accuracy = (probe(x_train).argmax(1) == y_train).float().mean().item()
    return ProbeScore(accuracy=accuracy, train_accuracy=train_accuracy)


# -- features -------------------------------------------------------------------------------


def noised_inputs(
    x0: torch.Tensor, noise: torch.Tensor, timestep: int, scheduler=None
) -> torch.Tensor:
    """``x0`` diffused to ``timestep`` (scheduler units, 0 .. num_train_timesteps - 1).

    ``timestep = 0`` is the clean input itself (the paper's ``t = 0``). Schedulers with
    ``add_noise`` (DDPM, DDIM) noise with their own schedule, a default ``DDPMScheduler`` when
    ``scheduler`` is None; flow-matching schedulers use ``x_t = (1 - s) x0 + s noise`` with
    ``s = timestep / num_train_timesteps`` (the model sees ``s * T``, as in training).
    """
    if timestep == 0:
        return x0
    if scheduler is None:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler()
    total = scheduler.config.num_train_timesteps
    if not 0 <= timestep < total:
        raise ValueError(f"Timestep {timestep} is outside the scheduler's range 0..{total - 1}.")
    if hasattr(scheduler, "add_noise"):
        t = torch.full((x0.shape[0],), int(timestep), dtype=torch.long, device=x0.device)
        return scheduler.add_noise(x0, noise, t)
    if hasattr(scheduler, "scale_noise"):
        sigma = timestep / total
        return (1 - sigma) * x0 + sigma * noise
    raise ValueError(
        f"{type(scheduler).__name__} can neither add_noise nor scale_noise; pass a DDPM, DDIM "
        "or flow-matching scheduler."
    )


def _probe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    require_block_levels(model, "The MLP probe")
    return block_names(model)


@torch.no_grad()
def pooled_block_features(
    model: nn.Module,
    images: torch.Tensor,
    timestep: int = 0,
    batch_size: int = 64,
    noise_seed: int = 0,
    scheduler=None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Average-pooled output of every block of a frozen MDiT, run unconditionally.

    Args:
        model: An MDiT (``blocks_in_order``); it is not modified.
        images: ``(N, in_channels, H, W)`` clean model inputs (latents for latent models).
        timestep: Diffusion timestep; inputs are noised to it with :func:`noised_inputs`.
        batch_size: Images per forward pass.
        noise_seed: Seeds the noise (drawn batch by batch, so it depends on ``batch_size``).
        scheduler: Noise schedule for ``timestep > 0`` (see :func:`noised_inputs`).
        progress: Show a progress bar.

    Returns:
        ``{block name: (N, C_block)}`` float32 on the CPU, in execution order.
    """
    blocks = _probe_blocks(model)
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(noise_seed)
    pooled: dict[str, list[torch.Tensor]] = {name: [] for name, _ in blocks}
    batches = images.split(batch_size)
    with capture_outputs(dict(blocks)) as outputs:
        for x0 in tqdm(batches, desc=f"mlp-probe t={timestep}", disable=not progress):
            noise = torch.randn(x0.shape, generator=generator)
            x = noised_inputs(x0.float(), noise, timestep, scheduler)
            x = x.to(device=parameter.device, dtype=parameter.dtype)
            model(x, timestep, class_labels=None)
            for name, captured in outputs.items():
                if len(captured) != 1:
                    raise RuntimeError(f"Block {name} ran {len(captured)} times in one forward.")
                h = captured.pop()  # channels-last (B, H, W, C): pool every axis but B and C
                pooled[name].append(h.float().mean(dim=tuple(range(1, h.ndim - 1))).cpu())
    return {name: torch.cat(chunks) for name, chunks in pooled.items()}


# -- the analysis ---------------------------------------------------------------------------


@dataclass
class MLPProbeResult:
    """Probe accuracy of every block at every timestep.

    Attributes:
        blocks: Block names in execution order (``"outer_in.0"``, ``"core.0"``, ...).
        levels: Each block's level (``outer_in``, ``core``, ``aggregate``, ``outer_out``).
        depth: Normalised depth of each block, ``(i + 0.5) / blocks``.
        widths: Pooled feature width of each block.
        timesteps: The diffusion timesteps probed.
        accuracy: ``(timesteps, blocks)`` held-out top-1 accuracy.
        train_accuracy: ``(timesteps, blocks)`` top-1 accuracy on the training part.
        num_classes: Classes in the labels.
        num_train, num_test: Sizes of the training and held-out parts.
        chance_level: ``1 / num_classes``.
        majority_baseline: Held-out accuracy of always answering the training part's most
            frequent class (the chance level for unbalanced labels).
        max_accuracy: Per timestep, the best block's accuracy.
        peak_block, peak_depth: Per timestep, that block and its depth.
        core_region: ``(start, end)`` normalised depth spanned by the core and aggregate blocks.
    """

    blocks: list[str]
    levels: list[str]
    depth: list[float]
    widths: list[int]
    timesteps: list[int]
    accuracy: np.ndarray
    train_accuracy: np.ndarray
    num_classes: int
    num_train: int
    num_test: int
    chance_level: float
    majority_baseline: float
    max_accuracy: list[float] = field(default_factory=list)
    peak_block: list[str] = field(default_factory=list)
    peak_depth: list[float] = field(default_factory=list)
    core_region: tuple[float, float] | None = None

    def table(self) -> dict[int, dict[str, float]]:
        """``{timestep: {block: accuracy}}``."""
        return {
            t: dict(zip(self.blocks, row.tolist(), strict=True))
            for t, row in zip(self.timesteps, self.accuracy, strict=True)
        }


def core_region(levels: list[str]) -> tuple[float, float] | None:
    """Normalised depth ``(start, end)`` covered by the core-level blocks (block ``i`` of ``n``
    spans ``[i / n, (i + 1) / n]``), or ``None`` without any."""
    core = [i for i, level in enumerate(levels) if level in CORE_LEVELS]
    if not core:
        return None
    return core[0] / len(levels), (core[-1] + 1) / len(levels)


def mlp_probe(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    timesteps: tuple[int, ...] | list[int] = (0,),
    scheduler=None,
    train_fraction: float = 0.8,
    hidden: int = 256,
    epochs: int = 100,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> MLPProbeResult:
    """Probe every block of a frozen MDiT at every timestep (section 4.2; appendix F.2).

    Args:
        model: MDiT with ``blocks_in_order``, run unconditionally (null class).
        images: ``(N, in_channels, H, W)`` clean model inputs (latents for latent models).
        labels: ``(N,)`` integer classes (any values; mapped to ``0 .. K - 1``).
        timesteps: Diffusion timesteps to probe at (0: clean inputs, the paper's section 4.2).
        scheduler: Noise schedule for ``t > 0`` (the pipeline's; default ``DDPMScheduler``).
        train_fraction: Share of each class used to train the probes; the rest scores them.
        hidden, epochs: Probe width and training epochs (:func:`train_probe`).
        batch_size: Images per forward pass of the model.
        seed: Seeds the split, the noise and the probes.
        progress: Show progress bars.
    """
    labels = torch.as_tensor(labels).long().cpu()
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"Need one label per image: {len(images)} images, labels of shape "
            f"{tuple(labels.shape)}."
        )
    if (labels < 0).any():
        raise ValueError(
            "Some labels are negative (-1 marks unlabelled images); the probe needs a labelled "
            "dataset (class sub-folders or a label column)."
        )
    classes, labels = torch.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("The probe needs at least two classes in the labels.")
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("Give at least one timestep to probe at.")
    named = _probe_blocks(model)
    names = [name for name, _ in named]
    levels = [level for level, _ in model.blocks_in_order()]
    train, test = stratified_split(labels, train_fraction, seed)
    counts = torch.bincount(labels[train], minlength=len(classes))
    majority = (labels[test] == counts.argmax()).float().mean().item()

    accuracy = np.zeros((len(timesteps), len(names)))
    train_accuracy = np.zeros_like(accuracy)
    widths: list[int] = []
    for row, t in enumerate(timesteps):
        features = pooled_block_features(
            model,
            images,
            t,
            batch_size,
            noise_seed=seed + row,
            scheduler=scheduler,
            progress=progress,
        )
        widths = [features[name].shape[1] for name in names]
        for column, name in enumerate(
            tqdm(names, desc=f"probes t={t}", disable=not progress, leave=False)
        ):
            x = features[name]
            score = train_probe(
                x[train],
                labels[train],
                x[test],
                labels[test],
                hidden=hidden,
                epochs=epochs,
                num_classes=len(classes),
                seed=seed,
            )
            accuracy[row, column] = score.accuracy
            train_accuracy[row, column] = score.train_accuracy

    depth = normalised_depth(len(names))
    peaks = accuracy.argmax(1)
    return MLPProbeResult(
        blocks=names,
        levels=levels,
        depth=depth,
        widths=widths,
        timesteps=timesteps,
        accuracy=accuracy,
        train_accuracy=train_accuracy,
        num_classes=len(classes),
        num_train=len(train),
        num_test=len(test),
        chance_level=1.0 / len(classes),
        majority_baseline=majority,
        max_accuracy=accuracy.max(1).tolist(),
        peak_block=[names[i] for i in peaks],
        peak_depth=[depth[i] for i in peaks],
        core_region=core_region(levels),
    )


# -- plots ----------------------------------------------------------------------------------


def _edges(values: list[float]) -> np.ndarray:
    """Cell edges around sorted centres (midpoints; half a gap beyond the ends)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 1:
        return np.array([values[0] - 0.5, values[0] + 0.5])
    middle = (values[1:] + values[:-1]) / 2
    return np.concatenate(
        [[values[0] - (middle[0] - values[0])], middle, [values[-1] + (values[-1] - middle[-1])]]
    )


def plot_mlp_probe(result: MLPProbeResult, output_dir: str) -> list[str]:
    """``mlp_probe.png``: accuracy vs normalised depth, one line per timestep, core region
    shaded between dashed lines, chance level dotted (figures 5e and 18). With more than one
    timestep also ``mlp_probe_timesteps.png``: heat map of accuracy over timestep (x) and depth
    (y), core region between horizontal dashed lines, the maximum per timestep above it
    (figure 17). Returns the paths written."""
    plt = pyplot()
    paths = []
    figure, ax = plt.subplots(figsize=(7, 4.2), constrained_layout=True)
    if result.core_region is not None:
        start, end = result.core_region
        ax.axvspan(start, end, color="0.9", zorder=0, label="core region")
        for edge in (start, end):
            ax.axvline(edge, color="0.4", linestyle="--", linewidth=1.0)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(result.timesteps)))
    for t, row, colour in zip(result.timesteps, result.accuracy, colours, strict=True):
        ax.plot(result.depth, row, marker="o", color=colour, label=f"t = {t}")
    ax.axhline(result.chance_level, color="black", linestyle=":", linewidth=1.0, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("normalised network depth")
    ax.set_ylabel("top-1 probe accuracy (held out)")
    ax.set_title("MLP probe accuracy per block (frozen model, unconditional)")
    top = ax.secondary_xaxis("top")
    top.set_xticks(result.depth, result.blocks, rotation=90, fontsize=7)
    ax.legend(fontsize=8, loc="best")
    paths.append(save_figure(figure, os.path.join(output_dir, "mlp_probe.png")))

    if len(result.timesteps) > 1:
        order = np.argsort(result.timesteps)
        timesteps = [result.timesteps[i] for i in order]
        accuracy = result.accuracy[order]
        figure, (top_ax, heat_ax) = plt.subplots(
            2,
            1,
            figsize=(7, 6),
            sharex=True,
            constrained_layout=True,
            gridspec_kw={"height_ratios": [1, 3]},
        )
        top_ax.plot(timesteps, accuracy.max(1), marker="o", color="black")
        top_ax.axhline(result.chance_level, color="black", linestyle=":", linewidth=1.0)
        top_ax.set_ylim(0, 1.02)
        top_ax.set_ylabel("max accuracy")
        top_ax.set_title("MLP probe accuracy vs diffusion timestep and depth")
        x_edges = _edges(timesteps)
        y_edges = np.linspace(0, 1, len(result.blocks) + 1)
        mesh = heat_ax.pcolormesh(
            x_edges, y_edges, accuracy.T, cmap="magma", vmin=0, vmax=1, shading="flat"
        )
        if accuracy.size <= 400:
            for i, t in enumerate(timesteps):
                for j, depth in enumerate(result.depth):
                    value = accuracy[i, j]
                    heat_ax.text(
                        t,
                        depth,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if value > 0.6 else "white",
                    )
        if result.core_region is not None:
            for edge in result.core_region:
                heat_ax.axhline(edge, color="cyan", linestyle="--", linewidth=1.2)
        heat_ax.set_xlabel("diffusion timestep t")
        heat_ax.set_ylabel("normalised network depth")
        heat_ax.set_xticks(timesteps)
        figure.colorbar(mesh, ax=heat_ax, label="top-1 probe accuracy")
        paths.append(save_figure(figure, os.path.join(output_dir, "mlp_probe_timesteps.png")))
    return paths


# -- data and command line ------------------------------------------------------------------


def load_labelled_images(
    loaded,
    dataset: str = "digits",
    num_images: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    image_column: str = "image",
    label_column: str = "label",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs ``(N, in_channels, H, W)`` and labels ``(N,)`` for ``loaded``'s model.

    ``dataset`` is ``"digits"`` (scikit-learn's, built in), a local ``imagefolder`` directory
    (class sub-folders) or a Hugging Face dataset name with a label column. Images are made at
    the model's ``sample_size`` (times the VAE factor, then encoded, for latent pipelines);
    ``num_images`` keeps a seeded random subset.
    """
    from ..data import DigitsDataset, ImageDataset

    model = loaded.model
    vae = getattr(loaded.pipeline, "vae", None) if loaded.pipeline is not None else None
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    resolution = model.config.sample_size * factor
    channels = 3 if vae is not None else model.config.in_channels
    if channels not in (1, 3):
        raise ValueError(
            f"The model takes {channels} input channels but has no VAE to encode images; use a "
            "pipeline folder with its VAE, or a pixel-space model with 1 or 3 channels."
        )
    if dataset == "digits":
        data = DigitsDataset(resolution=resolution, channels=channels)
    else:
        local = os.path.isdir(dataset)
        data = ImageDataset(
            dataset_name=None if local else dataset,
            train_data_dir=dataset if local else None,
            resolution=resolution,
            channels=channels,
            image_column=image_column,
            label_column=label_column,
        )
        if data.labels is None:
            raise ValueError(
                f"Dataset {dataset!r} has no labels (no column {label_column!r}); the probe "
                "needs classes: use an imagefolder with class sub-folders, a dataset with a "
                "label column (--label_column), or --dataset digits."
            )
    indices = torch.arange(len(data))
    if num_images is not None and num_images < len(data):
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(data), generator=generator)[:num_images].sort().values
    labels = torch.tensor([data.label(int(i)) for i in indices], dtype=torch.long)
    if isinstance(data, DigitsDataset):
        images = data.images[indices]
    else:
        images = torch.stack(
            [data[int(i)]["pixel_values"] for i in tqdm(indices, desc="loading images")]
        )
    if vae is not None:
        from ..data.shards import encode_latents

        with torch.no_grad():
            images = torch.cat(
                [encode_latents(vae, batch).float().cpu() for batch in images.split(batch_size)]
            )
    return images, labels


def _timesteps(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"--timesteps takes comma-separated integers such as 0,100,250, got {text!r}."
        ) from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (built in), an imagefolder directory with class sub-folders, or a "
        "Hugging Face dataset name with labels",
    )
    parser.add_argument("--label_column", default="label", help="label column of the dataset")
    parser.add_argument("--image_column", default="image", help="image column of the dataset")
    parser.add_argument(
        "--timesteps", type=_timesteps, default=[0], help="comma list of diffusion timesteps"
    )
    parser.add_argument("--num_images", type=int, default=None, help="cap on images (seeded)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--train_fraction", type=float, default=0.8, help="probe training share")
    parser.add_argument("--epochs", type=int, default=100, help="probe training epochs")
    parser.add_argument("--hidden", type=int, default=256, help="probe hidden width")


def run_cli(loaded, args: argparse.Namespace) -> dict:
    images, labels = load_labelled_images(
        loaded,
        args.dataset,
        args.num_images,
        args.seed,
        args.batch_size,
        args.image_column,
        args.label_column,
    )
    scheduler = loaded.pipeline.scheduler if loaded.pipeline is not None else None
    result = mlp_probe(
        loaded.model,
        images,
        labels,
        timesteps=args.timesteps,
        scheduler=scheduler,
        train_fraction=args.train_fraction,
        hidden=args.hidden,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    paths = plot_mlp_probe(result, args.output_dir)
    print(f"mlp-probe: wrote {', '.join(paths)}")
    print(
        f"  {result.num_train} training / {result.num_test} held-out images, "
        f"{result.num_classes} classes, chance {result.chance_level:.3f}, "
        f"majority {result.majority_baseline:.3f}"
    )
    print(f"  {'block':>12} " + " ".join(f"{'t=' + str(t):>7}" for t in result.timesteps))
    for j, name in enumerate(result.blocks):
        print(f"  {name:>12} " + " ".join(f"{v:7.3f}" for v in result.accuracy[:, j]))
    for t, best, block in zip(
        result.timesteps, result.max_accuracy, result.peak_block, strict=True
    ):
        print(f"  t={t}: peak {best:.3f} at {block}")
    return {"result": result, "table": result.table(), "png": paths}

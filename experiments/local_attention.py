"""Issue 9 item 4 (An et al. 2024, "On Inductive Biases That Enable Generalization of Diffusion
Transformers", arXiv 2410.21273): local attention windows and generalization.

A DiT analog {0, 0, 0, L} on the 16x16 digits, with a core patch of 2 so that its core token
grid is 8x8 (64 tokens; with the demo's patch of 4 a 4x4 grid leaves a 3x3 window little to
restrict), trained on the first N images of a fixed training split (N in {10, 100, 1000} and
the whole split) with and without neighborhood attention in chosen core blocks
(``core_kernel_sizes``) in several placements and window sizes: by default global everywhere,
3x3-token windows in the first 2 or the first 4 of the 6 blocks, 5x5 in the first 2;
``--arms`` also offers 3x3 in the last 2 blocks and 5x5 in the first 4. A stratified 20% of
the digits (``diffusers_mdit.data.digits_split``) is held out and never trained on. Every run uses
the identical recipe and step count.

Generalization, as in the paper: at fixed noise levels t of the 1000-step training schedule and
with fixed (seeded) noise, the images the run trained on (at most ``--eval_images`` of them) and
as many held-out images are noised, the trained model (EMA weights, the saved pipeline's
transformer, true class label) predicts x0 in one step, and ``PSNR(x0_hat, x0)`` (x0_hat
clipped to the data range [-1, 1], so peak-to-peak 2) is averaged per image set. The gap
``PSNR_train - PSNR_held`` per t, and its mean over t, measures memorisation: large when the
model reproduces its training images but not new ones. Sample quality of each run: the offline
digits metrics (classifier FD, conditional accuracy).

    python -m experiments.local_attention            # 4 arms x 4 sizes x 2 seeds (CPU, ~2.7 h)
    python -m experiments.local_attention --quick    # CI smoke run

Defaults and their cost: in the recorded runs (2-core CPU, one torch thread, another experiment
on the other core) training took 244-365 s a run (median 274 s; on 64 tokens the neighborhood
attention is one masked dense attention, so local arms cost the same) and scoring ~21 s: ~5 min
per run (one run took 673 s while the test suite shared the machine), ~80 min for each seed's
16 runs. Finished runs are reused, so two processes with disjoint ``--sizes`` or ``--seeds``
(one thread each) halve the wall time, and a final run over everything only collects them.
With OMP_NUM_THREADS=2 beside another busy
process a step took 50x longer (8.1 s at batch 32): on a shared machine use one thread. The
batch is 16 rather than the other experiments' 64 because, at equal time, smaller batches
learned the 8x8-grid model faster (global arm, full split: batch 64 x 800 steps 232 s, FD 146,
accuracy 31%; batch 32 x 1200 steps 203 s, FD 84, 66%; batch 16 x 2000 steps 193 s, FD 58,
78%).

Writes ``<results_dir>/local_attention.json`` (rows: one per arm x N x seed x t; summary: per
arm x N, means over seeds) / ``.csv`` (the rows), ``local_attention.png`` (gap vs noise level,
one panel per N, one line per arm) and ``local_attention_sizes.png`` (mean gap, held-out PSNR
and FD vs N, one line per arm).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import lru_cache

import numpy as np
import torch

from .common import (
    DIT_DIGITS,
    Recipe,
    add_run_arguments,
    arm_folder,
    digits_quality,
    parameter_count,
    recipe_dict,
    sample_classes,
    spread,
    train_in_stages,
    training_flops_per_step,
    write_rows,
)

# The DiT analog at a core patch of 2 (an 8x8 core grid, 4x the demo's tokens), made cheaper
# to fit the CPU budget: core width 64 (2 heads of 32) instead of 128, 6 core blocks instead
# of 7; the demo's timestep features.
LOCAL_DIT = dict(DIT_DIGITS, core_patch_size=2, core_dim=64, num_core_blocks=6)
GRID = 16 // LOCAL_DIT["core_patch_size"]


def local_windows(kernel: int, blocks) -> list[int | None]:
    """``core_kernel_sizes`` with neighborhood attention of ``kernel`` in ``blocks`` (0-based
    positions in the core sequence), global attention elsewhere."""
    return [kernel if i in blocks else None for i in range(LOCAL_DIT["num_core_blocks"])]


ARMS = {
    "global": LOCAL_DIT,
    "k3 blocks 1-2": dict(LOCAL_DIT, core_kernel_sizes=local_windows(3, range(2))),
    "k3 blocks 1-4": dict(LOCAL_DIT, core_kernel_sizes=local_windows(3, range(4))),
    "k5 blocks 1-2": dict(LOCAL_DIT, core_kernel_sizes=local_windows(5, range(2))),
    "k3 blocks 5-6": dict(LOCAL_DIT, core_kernel_sizes=local_windows(3, range(4, 6))),
    "k5 blocks 1-4": dict(LOCAL_DIT, core_kernel_sizes=local_windows(5, range(4))),
}
DEFAULT_ARMS = ["global", "k3 blocks 1-2", "k3 blocks 1-4", "k5 blocks 1-2"]
FULL = "full"
HELD_OUT_FRACTION = 0.2
NOISE_LEVELS = [50, 100, 200, 400, 600, 800]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["10", "100", "1000", FULL],
        help="Training-set sizes N: integers, or 'full' for the whole training split.",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--noise_levels", type=int, nargs="+", default=NOISE_LEVELS)
    parser.add_argument(
        "--eval_images",
        type=int,
        default=200,
        help="Training (the first the run saw) and held-out images scored per noise level.",
    )
    add_run_arguments(parser, "local_attention", samples_per_class=10)
    args = parser.parse_args(argv)
    if args.quick:
        args.arms, args.sizes, args.seeds, args.steps = DEFAULT_ARMS[:2], ["10", FULL], [0], 2
        args.noise_levels, args.eval_images = [100, 600], 8
        args.samples_per_class, args.num_inference_steps = 2, 2
    for size in args.sizes:
        if size != FULL and not (size.isdigit() and int(size) > 0):
            raise ValueError(f"--sizes takes positive integers or {FULL!r}, got {size!r}.")
    return args


def check_arm(config: dict) -> None:
    """A window that covers the core grid is global attention (the kernel is clamped to the
    grid), which would make a "local" arm a copy of the global one."""
    for kernel in config.get("core_kernel_sizes") or []:
        if kernel and kernel >= GRID:
            raise ValueError(
                f"Kernel {kernel} covers the {GRID}x{GRID} core grid (global attention); use "
                f"kernels below {GRID}."
            )


# -- the generalization metric --------------------------------------------------------------


def psnr(estimate: torch.Tensor, target: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``10 log10(range^2 / MSE)``, of ``(B, ...)`` tensors."""
    mse = (estimate.float() - target.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse)


def objective_timesteps(objective, level: int, batch: int) -> torch.Tensor:
    """Noise level ``level`` (of the 1000-step schedule) in the objective's units: integer
    DDPM timesteps, or the flow-matching time ``level / T``."""
    from diffusers_mdit.training.objectives import DiffusionObjective

    if isinstance(objective, DiffusionObjective):
        return torch.full((batch,), level, dtype=torch.long)
    total = objective.noise_scheduler.config.num_train_timesteps
    return torch.full((batch,), level / total)


def objective_of(model, recipe: Recipe):
    """The training objective of ``recipe`` (noise schedule, x0 from the model output)."""
    from diffusers_mdit.training.objectives import make_objective

    if recipe.prediction_type == "flow":
        return make_objective("flow")
    extra = {}
    if recipe.prediction_type == "epsilon":
        extra["learned_variance"] = model.config.out_channels == 2 * model.config.in_channels
    return make_objective(recipe.prediction_type, snr_gamma=recipe.snr_gamma, **extra)


@torch.no_grad()
def denoising_psnr(
    model, objective, images: torch.Tensor, labels: torch.Tensor, levels: list[int], seed: int
) -> dict[int, float]:
    """Mean PSNR of the one-step x0 estimate of ``images`` (in [-1, 1]) noised to each level
    with noise drawn from ``seed`` and the level: image ``i`` of any set gets the same noise."""
    scores = {}
    for level in levels:
        generator = torch.Generator().manual_seed(seed * 1000 + level)
        noise = torch.randn(images.shape, generator=generator)
        timesteps = objective_timesteps(objective, level, len(images))
        noisy = objective.add_noise(images, noise, timesteps)
        output = model(noisy, objective.model_timesteps(timesteps), class_labels=labels).sample
        estimate = objective.predict_x0(output, noisy, timesteps).clamp(-1, 1)
        scores[level] = psnr(estimate, images).mean().item()
    return scores


@lru_cache(maxsize=1)
def digits_split_indices() -> tuple[torch.Tensor, torch.Tensor]:
    """The (training, held-out) digit indices every run uses (the trainer's
    ``--held_out_fraction`` split)."""
    from diffusers_mdit.data import digits_split

    return digits_split(HELD_OUT_FRACTION)


def training_size(size: str) -> int:
    """The number of training images of size ``size`` (``"full"``: the whole split)."""
    available = len(digits_split_indices()[0])
    return available if size == FULL else min(int(size), available)


def split_images(size: str, eval_images: int, resolution: int):
    """(training images the run saw, held-out images), each at most ``eval_images``, with
    their labels: the first images of the training split (what ``--max_train_samples`` takes)
    and the first of the held-out split."""
    from diffusers_mdit.data import DigitsDataset

    train, held = digits_split_indices()
    chosen = (train[: min(training_size(size), eval_images)], held[:eval_images])
    sets = [DigitsDataset(resolution=resolution, channels=3, indices=i) for i in chosen]
    return [(data.images, data.labels) for data in sets]


def scorer(args: argparse.Namespace, recipe: Recipe, size: str):
    """``score(pipeline_dir)`` for :func:`train_in_stages`: the denoising PSNRs and the sample
    quality of one run, with the settings they were computed with."""
    from diffusers_mdit.explain import load_for_analysis

    (train_images, train_labels), (held_images, held_labels) = split_images(
        size, args.eval_images, recipe.resolution
    )

    def score(folder: str) -> dict:
        start = time.perf_counter()
        model = load_for_analysis(folder).model
        objective = objective_of(model, recipe)
        levels = args.noise_levels
        train_psnr = denoising_psnr(model, objective, train_images, train_labels, levels, 0)
        held_psnr = denoising_psnr(model, objective, held_images, held_labels, levels, 0)
        images, labels = sample_classes(
            folder, args.samples_per_class, args.num_inference_steps, args.guidance_scale, 0
        )
        return {
            "settings": score_settings(args),
            "eval_train_images": len(train_images),
            "eval_held_images": len(held_images),
            "psnr_train": {str(t): v for t, v in train_psnr.items()},
            "psnr_held": {str(t): v for t, v in held_psnr.items()},
            **digits_quality(images, labels),
            "score_seconds": time.perf_counter() - start,
        }

    return score


def score_settings(args: argparse.Namespace) -> dict:
    keys = ("noise_levels", "eval_images", "samples_per_class", "num_inference_steps",
            "guidance_scale")  # fmt: skip
    return {key: getattr(args, key) for key in keys}


def run(args, recipe: Recipe, arm: str, size: str, seed: int) -> dict:
    """Train (or reuse) one run and return its record; a record scored with other settings is
    scored again."""
    folder = os.path.join(args.output_dir, arm_folder(arm), f"n{size}", f"seed{seed}")
    extra = {"held_out_fraction": HELD_OUT_FRACTION}
    if size != FULL:
        extra["max_train_samples"] = int(size)
    score = scorer(args, recipe, size)
    (record,) = [
        r
        for r in train_in_stages(folder, ARMS[arm], [args.steps], seed, recipe, score, extra)
        if r["step"] == args.steps
    ]
    if record.get("settings") != score_settings(args):
        record.update(score(folder))
        path = os.path.join(folder, "stages.json")
        with open(path) as f:
            records = [r for r in json.load(f) if r["step"] != args.steps]
        write_rows(records + [record], path)
    return record


def run_rows(arm: str, size: str, seed: int, record: dict, recipe: Recipe) -> list[dict]:
    """One row per noise level of a run."""
    config = ARMS[arm]
    gaps = {t: record["psnr_train"][t] - record["psnr_held"][t] for t in record["psnr_train"]}
    kernels = config.get("core_kernel_sizes") or [None] * config["num_core_blocks"]
    common = {
        "arm": arm,
        "core_kernel_sizes": " ".join(str(k or "-") for k in kernels),
        "train_size": training_size(size),
        "seed": seed,
        "steps": record["step"],
        "parameters": parameter_count(config, recipe),
        "train_gflops_per_step": training_flops_per_step(config, recipe) / 1e9,
        "train_seconds": record["train_seconds"],
        "score_seconds": record["score_seconds"],
        "fd": record["fd"],
        "accuracy": record["accuracy"],
        "mean_gap": statistics.mean(gaps.values()),
    }
    return [
        {
            **common,
            "t": int(t),
            "psnr_train": record["psnr_train"][t],
            "psnr_held": record["psnr_held"][t],
            "gap": gaps[t],
        }
        for t in record["psnr_train"]
    ]


def summarise(rows: list[dict]) -> list[dict]:
    """Per arm and training size, means over seeds: PSNRs and gap averaged over noise levels,
    the gap per level, FD and accuracy."""
    summary = []
    groups = dict.fromkeys((r["arm"], r["train_size"]) for r in rows)
    for arm, size in groups:
        mine = [r for r in rows if r["arm"] == arm and r["train_size"] == size]
        levels = sorted({r["t"] for r in mine})
        seeds = sorted({r["seed"] for r in mine})
        runs = [next(r for r in mine if r["seed"] == s) for s in seeds]
        entry = {"arm": arm, "train_size": size, "seeds": len(seeds)}
        for key in ("psnr_train", "psnr_held", "gap"):
            entry[f"{key}_mean"] = statistics.mean(r[key] for r in mine)
        entry["gap_std_over_seeds"] = spread(r["mean_gap"] for r in runs)
        entry["gap_by_t"] = {
            t: statistics.mean(r["gap"] for r in mine if r["t"] == t) for t in levels
        }
        for key in ("fd", "accuracy"):
            entry[key] = statistics.mean(r[key] for r in runs)
            entry[f"{key}_std_over_seeds"] = spread(r[key] for r in runs)
        summary.append(entry)
    return summary


# -- plots -------------------------------------------------------------------------------------


def plot_gaps(summary: list[dict], path: str) -> None:
    """Gap vs noise level, one panel per training size, one line per arm."""
    from diffusers_mdit.explain.common import pyplot, save_figure

    plt = pyplot()
    sizes = sorted({s["train_size"] for s in summary})
    arms = list(dict.fromkeys(s["arm"] for s in summary))
    figure, axes = plt.subplots(
        1, len(sizes), figsize=(3.6 * len(sizes), 3.4), sharey=True, constrained_layout=True
    )
    axes = np.atleast_1d(axes)
    for axis, size in zip(axes, sizes, strict=True):
        for arm in arms:
            (entry,) = [s for s in summary if s["arm"] == arm and s["train_size"] == size]
            levels = sorted(entry["gap_by_t"])
            axis.plot(levels, [entry["gap_by_t"][t] for t in levels], marker="o", label=arm)
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set(title=f"N = {size}", xlabel="noise level t (of 1000)")
    axes[0].set_ylabel("PSNR gap train - held-out (dB)")
    axes[-1].legend(fontsize=8)
    save_figure(figure, path)


def plot_sizes(summary: list[dict], path: str) -> None:
    """Mean gap, held-out PSNR and FD against the training-set size, one line per arm."""
    from diffusers_mdit.explain.common import pyplot, save_figure

    plt = pyplot()
    arms = list(dict.fromkeys(s["arm"] for s in summary))
    panels = (("gap_mean", "mean PSNR gap (dB)"), ("psnr_held_mean", "held-out PSNR (dB)"),
              ("fd", "classifier FD of samples"))  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 3.4), constrained_layout=True)
    for axis, (key, label) in zip(axes, panels, strict=True):
        for arm in arms:
            mine = sorted((s for s in summary if s["arm"] == arm), key=lambda s: s["train_size"])
            axis.plot([s["train_size"] for s in mine], [s[key] for s in mine], marker="o",
                      label=arm)  # fmt: skip
        if key == "gap_mean":
            axis.axhline(0, color="grey", linewidth=0.8)
        axis.set(xscale="log", xlabel="training images N", title=label)
    axes[0].legend(fontsize=8)
    save_figure(figure, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    recipe = Recipe(batch_size=args.batch_size)
    for arm in args.arms:
        check_arm(ARMS[arm])
    print(
        f"local attention: arms {args.arms}, sizes {args.sizes}, seeds {args.seeds}, "
        f"{args.steps} steps, recipe {recipe_dict(recipe)}, {GRID}x{GRID} core grid"
    )
    rows = []
    for size in args.sizes:
        for arm in args.arms:
            for seed in args.seeds:
                record = run(args, recipe, arm, size, seed)
                rows += run_rows(arm, size, seed, record, recipe)
                print(
                    f"  {arm} N={training_size(size)} seed {seed}: train "
                    f"{record['train_seconds']:.0f}s, score {record['score_seconds']:.0f}s"
                )
    summary = summarise(rows)
    os.makedirs(args.results_dir, exist_ok=True)
    write_rows(rows, os.path.join(args.results_dir, "local_attention.csv"))
    result = {
        "recipe": recipe_dict(recipe),
        "arguments": vars(args),
        "model": LOCAL_DIT,
        "held_out_fraction": HELD_OUT_FRACTION,
        "rows": rows,
        "summary": summary,
    }
    write_rows(result, os.path.join(args.results_dir, "local_attention.json"))
    plot_gaps(summary, os.path.join(args.results_dir, "local_attention.png"))
    plot_sizes(summary, os.path.join(args.results_dir, "local_attention_sizes.png"))

    print(
        f"{'arm':>14} {'N':>5} {'PSNR train':>10} {'PSNR held':>9} {'gap dB':>13} {'FD':>14} "
        f"{'acc %':>12}  (PSNR: mean over t; mean +- std over seeds)"
    )
    for s in summary:
        print(
            f"{s['arm']:>14} {s['train_size']:>5} {s['psnr_train_mean']:>10.2f} "
            f"{s['psnr_held_mean']:>9.2f} {s['gap_mean']:>6.2f}+-{s['gap_std_over_seeds']:<5.2f}"
            f" {s['fd']:>7.2f}+-{s['fd_std_over_seeds']:<5.2f}"
            f" {100 * s['accuracy']:>5.1f}+-{100 * s['accuracy_std_over_seeds']:<5.1f}"
        )
    return result


if __name__ == "__main__":
    main()

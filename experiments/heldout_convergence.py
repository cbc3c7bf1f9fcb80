"""Experiment 6 (MDiT paper section 5.1, figure 6, and table 2 at small scale, issue 20): does
MDiT converge >= 3x faster than the original DiT, measured by held-out denoising loss?

Arms (:data:`ARMS`), all class-conditional on jittered font glyphs (``diffusers_mdit.data.
glyphs``, 10 characters x 16 fonts) at 16x16, grey:

- ``MDiT {1,2,2,2}``: the paper's proportions at small scale: core patch 2, outer width half
  the core (48 / 96), head dim 24 so 2 outer heads, 4 core heads and 6 aggregate heads (1.5x),
  ``N = 2M``.
- ``DiT@params d5``: the original DiT (``DiTBaselineTransformer2DModel``: adaLN-Zero, GELU MLP,
  sin-cos positions) at patch 2 and MDiT's core width and heads, depth 5: parameters +4%, forward
  FLOPs 0.63x.
- ``DiT@FLOPs d8``: the same DiT at depth 8: forward FLOPs +1%, parameters 1.66x.
- ``no outer level {0,0,2,3}``: MDiT without its outer level (the core patchifies the pixels),
  ``L`` matching the parameters (+2%).
- ``no aggregate blocks {1,2,0,5}``: MDiT without aggregate blocks, ``L`` matching the
  parameters (+2%).

Recipe (the paper's, section 5, at small batch): x0 prediction with Min-SNR-5 on the cosine
schedule, AdamW lr 4e-4 (constant; the paper's rate, so no gradient-flow reduction), betas
(0.9, 0.95), weight decay 0.01, grad clip 1.0, label dropout 0.1, batch 32, EMA with warm-up
(decay ``min(0.999, 1 - (1 + step)^(-2/3))``, diffusers' ``EMAModel``: the paper's 0.9999 would
average over far more steps than these runs have). Every arm of a seed sees the same batches,
timesteps, noise and label dropout (one generator from the seed), so arms are compared in
pairs.

Primary metric: the held-out denoising loss, x0-MSE of the EMA model at fixed timesteps
(:data:`EVAL_TIMESTEPS`) with fixed noise on held-out renderings never trained on (one per font
and character: 160 images), averaged over the timesteps, tracked along training. Speedup at
MDiT step ``S``: the steps (and training FLOPs) a baseline needs to reach MDiT's held-out loss
at ``S`` (first crossing, interpolated linearly in log-step between evaluations), divided by
``S`` (by MDiT's FLOPs to ``S``), per seed; a baseline that never gets there within the run
gives only a lower bound (``> steps / S``). At the end: classifier Frechet distance and
conditional accuracy of 1,000 samples (100 per class; DDIM, 10 steps, no guidance) in the
features of a small CNN trained on the glyph training split, and the same distance for 1,000
real held-out glyphs (the floor).

    python -m experiments.heldout_convergence --workers 2    # 5 arms x 3 seeds, 400 steps
    python -m experiments.heldout_convergence --report       # what has finished so far
    python -m experiments.heldout_convergence --quick        # CI smoke run (seconds)
    python -m experiments.heldout_convergence --data digits  # the fast path: digits at 16x16

Writes ``<results_dir>/heldout_convergence.json`` (every evaluation of every run, the final
scores, the speedups), ``.csv`` (one row per evaluation) and ``.png`` (held-out loss vs steps
and vs training FLOPs, mean and min/max over seeds). Each finished run is kept in
``--output_dir`` (``run.json``) and reused, so a stopped experiment resumes run by run.

The training loop is ours, not the library's ``train``: it evaluates the EMA weights in memory at
each evaluation step instead of saving and reloading a pipeline per stage, and it reuses the
library's objective, label dropout, EMA and final pipeline.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from multiprocessing import get_context

import numpy as np
import torch

from .common import arm_folder, spread, write_rows

_WIDTH, _HEAD = 96, 24
MDIT_GLYPHS = dict(
    num_outer_in_blocks=1,  # M
    num_outer_out_blocks=2,  # N = 2M
    num_alternating_blocks=2,  # K: one aggregate block
    num_core_blocks=2,  # L
    outer_dim=_WIDTH // 2,
    core_dim=_WIDTH,
    attention_head_dim=_HEAD,
    core_patch_size=2,
    timestep_embedding_dim=_WIDTH,
)


def dit_baseline(depth: int) -> dict:
    """The original DiT at patch 2 with MDiT's core width and heads."""
    return dict(
        _class_name="DiTBaselineTransformer2DModel",
        num_layers=depth,
        num_attention_heads=_WIDTH // _HEAD,
        attention_head_dim=_HEAD,
        patch_size=2,
    )


MDIT_ARM = "MDiT {1,2,2,2}"
ARMS = {
    MDIT_ARM: MDIT_GLYPHS,
    "DiT@params d5": dit_baseline(5),
    "DiT@FLOPs d8": dit_baseline(8),
    "no outer level {0,0,2,3}": dict(
        MDIT_GLYPHS, num_outer_in_blocks=0, num_outer_out_blocks=0, num_core_blocks=3
    ),
    "no aggregate blocks {1,2,0,5}": dict(MDIT_GLYPHS, num_alternating_blocks=0, num_core_blocks=5),
}
BASELINES = [arm for arm in ARMS if arm != MDIT_ARM]
EVAL_TIMESTEPS = (50, 200, 400, 600, 800)
EVAL_STEPS = (25, 50, 75, 100, 150, 200, 250, 300, 400)
RESOLUTION = 16  # the default; --resolution 32 reruns the protocol at 32x32


@dataclass(frozen=True)
class Protocol:
    """Everything a run depends on besides its arm and seed."""

    data: str = "glyphs"
    resolution: int = RESOLUTION
    steps: int = 400
    eval_steps: tuple[int, ...] = EVAL_STEPS
    eval_timesteps: tuple[int, ...] = EVAL_TIMESTEPS
    batch_size: int = 32
    learning_rate: float = 4e-4
    ema_max_decay: float = 0.999
    label_dropout: float = 0.1
    train_per_font: int = 32
    heldout_images: int = 160
    samples_per_class: int = 100
    num_inference_steps: int = 10
    classifier_epochs: int = 10


# -- data ---------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def load_data(protocol: Protocol) -> dict:
    """Training images and labels, held-out images for the loss (``heldout``) and for the
    real-data FD floor (``real``), the number of classes, all ``(N, 1, 16, 16)`` in [-1, 1]."""
    if protocol.data == "glyphs":
        from diffusers_mdit.data.glyphs import GLYPH_CHARACTERS, render_glyphs

        train, labels = render_glyphs("train", protocol.train_per_font, protocol.resolution)
        # Ordered font, character, rendering: rendering 0 of each (font, character) first.
        real, real_labels = render_glyphs("held_out", 8, protocol.resolution)
        first = torch.arange(len(real)) % 8 == 0
        heldout, heldout_labels = real[first], real_labels[first]
        num_classes = len(GLYPH_CHARACTERS)
    elif protocol.data == "digits":
        from diffusers_mdit.data import DigitsDataset, digits_split

        train_ids, held_ids = digits_split(0.2)
        train_set = DigitsDataset(protocol.resolution, 1, train_ids)
        held_set = DigitsDataset(protocol.resolution, 1, held_ids)
        train, labels = train_set.images, train_set.labels
        real, real_labels = held_set.images, held_set.labels
        heldout, heldout_labels = real, real_labels
        num_classes = 10
    else:
        raise ValueError(f"--data must be 'glyphs' or 'digits', got {protocol.data!r}.")
    n = protocol.heldout_images
    return dict(
        train=train, labels=labels, heldout=heldout[:n], heldout_labels=heldout_labels[:n],
        real=real[:1000], real_labels=real_labels[:1000], num_classes=num_classes,
    )  # fmt: skip


@lru_cache(maxsize=2)
def reference_classifier(protocol: Protocol):
    """The offline metrics' CNN, trained on the training split (the digits: all 1,797)."""
    from diffusers_mdit.evaluation import ReferenceClassifier

    if protocol.data == "digits":
        return ReferenceClassifier.from_digits(seed=0)
    data = load_data(protocol)
    return ReferenceClassifier.fit(
        data["train"], data["labels"].numpy(), channels=1, resolution=protocol.resolution, seed=0,
        epochs=protocol.classifier_epochs,
    )  # fmt: skip


# -- models and their cost ----------------------------------------------------------------------


def full_config(config: dict, num_classes: int, resolution: int = RESOLUTION) -> dict:
    return dict(
        config, sample_size=resolution, in_channels=1, out_channels=1, num_classes=num_classes
    )


def build(config: dict, num_classes: int, seed: int, resolution: int = RESOLUTION):
    from diffusers_mdit.families import FAMILIES

    name = config.get("_class_name", "MDiTTransformer2DModel")
    settings = {
        k: v for k, v in full_config(config, num_classes, resolution).items() if k[0] != "_"
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FAMILIES[name].model_class(**settings)


def cost(config: dict, num_classes: int = 10, resolution: int = RESOLUTION) -> tuple[int, float]:
    """Parameters and forward FLOPs per image (counted on the meta device)."""
    from diffusers_mdit.profiling import config_cost

    counted = config_cost(full_config(config, num_classes, resolution), resolution, resolution)
    return counted.parameters, counted.flops


def training_flops_per_step(
    config: dict, batch_size: int, num_classes: int = 10, resolution: int = RESOLUTION
) -> float:
    """Forward + backward FLOPs of one step: 3x the forward (backward = 2x forward)."""
    return 3.0 * cost(config, num_classes, resolution)[1] * batch_size


# -- one run ------------------------------------------------------------------------------------


@torch.no_grad()
def heldout_loss(model, objective, images, labels, timesteps, seed: int = 0) -> dict[int, float]:
    """x0-MSE per timestep on ``images`` with fixed noise (seeded by ``seed`` and the
    timestep, the same for every model and evaluation)."""
    losses = {}
    for t in timesteps:
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed + t))
        steps = torch.full((len(images),), t, dtype=torch.long)
        noisy = objective.add_noise(images, noise, steps)
        x0_hat = objective.predict_x0(model(noisy, steps, class_labels=labels).sample, noisy, steps)
        losses[t] = float((x0_hat - images).pow(2).mean())
    return losses


def train_run(arm: str, seed: int, protocol: Protocol) -> dict:
    """Train ``arm`` from ``seed``; return its held-out loss curve and final sample scores."""
    from diffusers.training_utils import EMAModel

    from diffusers_mdit.training.objectives import drop_labels, make_objective
    from diffusers_mdit.training.trainer import final_pipeline

    torch.set_num_threads(1)
    data = load_data(protocol)
    num_classes = data["num_classes"]
    config = ARMS[arm]
    model = build(config, num_classes, seed, protocol.resolution)
    evaluated = copy.deepcopy(model).eval().requires_grad_(False)
    objective = make_objective("x0", snr_gamma=5.0)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=protocol.learning_rate, betas=(0.9, 0.95), weight_decay=0.01
    )
    ema = EMAModel(
        model.parameters(), decay=protocol.ema_max_decay, use_ema_warmup=True, power=2 / 3
    )
    generator = torch.Generator().manual_seed(seed)
    flops = training_flops_per_step(config, protocol.batch_size, num_classes, protocol.resolution)
    order = torch.empty(0, dtype=torch.long)
    curve, running, seconds = [], [], 0.0
    for step in range(1, protocol.steps + 1):
        start = time.perf_counter()
        if len(order) < protocol.batch_size:
            order = torch.cat([order, torch.randperm(len(data["train"]), generator=generator)])
        ids, order = order[: protocol.batch_size], order[protocol.batch_size :]
        noisy = objective.prepare(data["train"][ids], generator)
        labels = drop_labels(data["labels"][ids], num_classes, protocol.label_dropout, generator)
        output = model(noisy.noisy, noisy.model_timesteps, class_labels=labels).sample
        loss = objective.loss(output, noisy).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{arm} seed {seed}: non-finite loss at step {step}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.step(model.parameters())
        seconds += time.perf_counter() - start
        running.append(loss.item())
        if step in protocol.eval_steps:
            ema.copy_to(evaluated.parameters())
            by_t = heldout_loss(
                evaluated, objective, data["heldout"], data["heldout_labels"],
                protocol.eval_timesteps,
            )  # fmt: skip
            curve.append(
                {
                    "step": step,
                    "train_flops": step * flops,
                    "train_seconds": seconds,
                    "train_loss": statistics.mean(running),
                    "heldout_loss": statistics.mean(by_t.values()),
                    "heldout_loss_by_t": {str(t): v for t, v in by_t.items()},
                }
            )
            running = []
    # Final samples with the EMA weights: FD and accuracy in the reference CNN's features.
    start = time.perf_counter()
    pipe = final_pipeline(model, ema, objective)
    pipe.set_progress_bar_config(disable=True)
    class_labels = np.repeat(np.arange(num_classes), protocol.samples_per_class)
    images = []
    sample_generator = torch.Generator().manual_seed(10_000 + seed)
    for chunk in np.array_split(class_labels, max(1, len(class_labels) // 250)):
        images.append(
            pipe(
                class_labels=chunk.tolist(), num_inference_steps=protocol.num_inference_steps,
                guidance_scale=1.0, generator=sample_generator, output_type="pt",
            ).images * 2 - 1
        )  # fmt: skip
    final = quality(torch.cat(images), class_labels, protocol)
    parameters, forward_flops = cost(config, num_classes, protocol.resolution)
    return {
        "arm": arm,
        "seed": seed,
        "parameters": parameters,
        "forward_flops": forward_flops,
        "train_flops_per_step": flops,
        "curve": curve,
        "sample_seconds": time.perf_counter() - start,
        **final,
    }


def quality(images: torch.Tensor, labels, protocol: Protocol) -> dict:
    """Classifier FD against the training split and conditional accuracy of ``images``."""
    from diffusers_mdit.evaluation.metrics import frechet_distance_from_features

    classifier = reference_classifier(protocol)
    reference = classifier.features(load_data(protocol)["train"])
    return {
        "fd": frechet_distance_from_features(classifier.features(images), reference),
        "accuracy": classifier.accuracy(images, labels),
        "samples": len(images),
    }


def run_path(arm: str, seed: int, output_dir: str) -> str:
    return os.path.join(output_dir, arm_folder(arm), f"seed{seed}", "run.json")


def saved_run(arm: str, seed: int, protocol: Protocol, output_dir: str) -> dict | None:
    """The saved result of ``arm`` / ``seed`` if it ran with this very protocol."""
    path = run_path(arm, seed, output_dir)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    saved_protocol = dict(saved.get("protocol") or {})
    saved_protocol.setdefault("resolution", RESOLUTION)  # runs saved before --resolution existed
    same = saved_protocol == json.loads(json.dumps(asdict(protocol)))
    return saved["run"] if same else None


def cached_run(arm: str, seed: int, protocol: Protocol, output_dir: str) -> dict:
    """:func:`train_run`, or its saved result when the same protocol already ran."""
    saved = saved_run(arm, seed, protocol, output_dir)
    if saved is not None:
        return saved
    result = train_run(arm, seed, protocol)
    path = run_path(arm, seed, output_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"protocol": asdict(protocol), "run": result}, f, indent=2)
    print(
        f"{arm} seed {seed}: held-out loss {result['curve'][-1]['heldout_loss']:.4f} at step "
        f"{result['curve'][-1]['step']}, FD {result['fd']:.2f}, accuracy "
        f"{100 * result['accuracy']:.1f}% ({result['curve'][-1]['train_seconds']:.0f} s)",
        flush=True,
    )
    return result


# -- speedups -----------------------------------------------------------------------------------


def steps_to_reach(curve: list[dict], target: float) -> float | None:
    """The first step at which ``curve``'s held-out loss is at or below ``target``, linearly
    interpolated in log-step between the two evaluations around the crossing; ``None`` if it
    never gets there."""
    previous = None
    for point in curve:
        if point["heldout_loss"] <= target:
            if previous is None or point["heldout_loss"] == target:
                return float(point["step"])
            fraction = (previous["heldout_loss"] - target) / (
                previous["heldout_loss"] - point["heldout_loss"]
            )
            log_step = math.log(previous["step"]) + fraction * (
                math.log(point["step"]) - math.log(previous["step"])
            )
            return math.exp(log_step)
        previous = point
    return None


def speedups(runs: dict[str, dict[int, dict]], at_steps: list[int]) -> list[dict]:
    """Per baseline, MDiT step ``S`` and seed: the steps the baseline needs to reach MDiT's
    held-out loss at ``S``, the step and FLOP ratios, or a lower bound when it never does."""
    rows = []
    for baseline in [arm for arm in runs if arm != MDIT_ARM]:
        for s in at_steps:
            for seed, mdit in runs[MDIT_ARM].items():
                if seed not in runs[baseline]:
                    continue
                other = runs[baseline][seed]
                target = next(p["heldout_loss"] for p in mdit["curve"] if p["step"] == s)
                needed = steps_to_reach(other["curve"], target)
                flop_ratio = other["train_flops_per_step"] / mdit["train_flops_per_step"]
                last = other["curve"][-1]["step"]
                rows.append(
                    {
                        "baseline": baseline,
                        "mdit_step": s,
                        "seed": seed,
                        "mdit_loss": target,
                        "baseline_steps": needed,
                        "step_speedup": needed / s if needed else None,
                        "flop_speedup": needed * flop_ratio / s if needed else None,
                        "step_speedup_lower_bound": None if needed else last / s,
                        "flop_speedup_lower_bound": None if needed else last * flop_ratio / s,
                    }
                )
    return rows


def final_loss_speedups(runs: dict[str, dict[int, dict]]) -> list[dict]:
    """The other reading of figure 6, per baseline and seed: the steps MDiT needs to reach the
    baseline's held-out loss at its last step, and the baseline's steps (FLOPs) over MDiT's;
    ``None`` where MDiT never gets there."""
    rows = []
    for baseline in [arm for arm in runs if arm != MDIT_ARM]:
        for seed, mdit in runs[MDIT_ARM].items():
            if seed not in runs[baseline]:
                continue
            other = runs[baseline][seed]
            last = other["curve"][-1]
            needed = steps_to_reach(mdit["curve"], last["heldout_loss"])
            flop_ratio = other["train_flops_per_step"] / mdit["train_flops_per_step"]
            rows.append(
                {
                    "baseline": baseline,
                    "seed": seed,
                    "baseline_final_loss": last["heldout_loss"],
                    "mdit_steps": needed,
                    "step_speedup": last["step"] / needed if needed else None,
                    "flop_speedup": last["step"] * flop_ratio / needed if needed else None,
                }
            )
    return rows


def summarise_speedups(rows: list[dict]) -> list[dict]:
    """Mean, std, min and max over seeds of each (baseline, S); censored seeds counted."""
    summary = []
    for key in dict.fromkeys((r["baseline"], r["mdit_step"]) for r in rows):
        mine = [r for r in rows if (r["baseline"], r["mdit_step"]) == key]
        entry = {"baseline": key[0], "mdit_step": key[1], "seeds": len(mine)}
        for kind in ("step", "flop"):
            values = [r[f"{kind}_speedup"] for r in mine if r[f"{kind}_speedup"] is not None]
            bounds = [r[f"{kind}_speedup_lower_bound"] for r in mine if r["baseline_steps"] is None]
            entry[f"{kind}_mean"] = statistics.mean(values) if values else None
            entry[f"{kind}_std"] = spread(values) if values else None
            entry[f"{kind}_min"] = min(values) if values else None
            entry[f"{kind}_max"] = max(values) if values else None
            entry[f"{kind}_not_reached_lower_bounds"] = bounds
        summary.append(entry)
    return summary


def summarise_finals(runs: dict[str, dict[int, dict]]) -> list[dict]:
    summary = []
    for arm, seeds in runs.items():
        entry = {"arm": arm, "seeds": len(seeds)}
        first = next(iter(seeds.values()))
        entry.update(
            parameters=first["parameters"],
            forward_mflops=first["forward_flops"] / 1e6,
            train_gflops_per_step=first["train_flops_per_step"] / 1e9,
        )
        values = {
            "heldout_loss": [r["curve"][-1]["heldout_loss"] for r in seeds.values()],
            "fd": [r["fd"] for r in seeds.values()],
            "accuracy": [r["accuracy"] for r in seeds.values()],
            "train_seconds": [r["curve"][-1]["train_seconds"] for r in seeds.values()],
        }
        for key, vals in values.items():
            entry[f"{key}_mean"], entry[f"{key}_std"] = statistics.mean(vals), spread(vals)
            entry[f"{key}_min"], entry[f"{key}_max"] = min(vals), max(vals)
        by_t = [r["curve"][-1]["heldout_loss_by_t"] for r in seeds.values()]
        entry["heldout_loss_by_t_mean"] = {t: statistics.mean(b[t] for b in by_t) for t in by_t[0]}
        summary.append(entry)
    return summary


# -- plot ---------------------------------------------------------------------------------------


def plot(runs: dict[str, dict[int, dict]], path: str, title: str) -> None:
    """Held-out loss vs steps and vs training FLOPs (log-log), mean over seeds with a min/max
    band; top row MDiT vs the original DiT, bottom row MDiT vs its ablations."""
    from matplotlib.ticker import NullFormatter

    from diffusers_mdit.explain.common import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    palette = ("tab:red", "tab:blue", "tab:cyan", "tab:green", "tab:olive")
    colors = dict(zip(ARMS, palette, strict=True))
    groups = ([MDIT_ARM, *BASELINES[:2]], [MDIT_ARM, *BASELINES[2:]])
    for row, group in zip(axes, groups, strict=True):
        for arm in group:
            if arm not in runs:
                continue
            curves = [r["curve"] for r in runs[arm].values()]
            losses = np.array([[p["heldout_loss"] for p in c] for c in curves])
            steps = np.array([p["step"] for p in curves[0]])
            flops = np.array([p["train_flops"] for p in curves[0]])
            for axis, x in zip(row, (steps, flops), strict=True):
                axis.loglog(x, losses.mean(0), "o-", ms=3, color=colors.get(arm), label=arm)
                axis.fill_between(x, losses.min(0), losses.max(0), color=colors.get(arm), alpha=0.2)
        row[0].set(xlabel="training steps", ylabel="held-out x0-MSE (EMA)")
        row[1].set(xlabel="training FLOPs", ylabel="held-out x0-MSE (EMA)")
        for axis in row:
            axis.grid(True, which="both", alpha=0.3)
            axis.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap
            axis.legend(fontsize=8)
    seeds = len(next(iter(runs.values())))
    figure.suptitle(f"{title}: mean over {seeds} seed(s), band = min..max")
    save_figure(figure, path)


# -- command line -------------------------------------------------------------------------------


def suffix(resolution: int) -> str:
    """File-name suffix of a resolution: none for the default 16x16, else e.g. ``_32x32``."""
    return "" if resolution == RESOLUTION else f"_{resolution}x{resolution}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", choices=["glyphs", "digits"], default="glyphs")
    parser.add_argument("--steps", type=int, default=Protocol.steps)
    parser.add_argument(
        "--resolution", type=int, default=RESOLUTION,
        help="image side; a multiple of 4 (MDiT's core patch 2 times the aggregate merge 2)",
    )  # fmt: skip
    parser.add_argument(
        "--speedup_at", type=int, nargs="+", default=[50, 100, 200],
        help="MDiT steps S whose held-out loss the baselines must reach (evaluation steps)",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="runs trained at the same time")
    parser.add_argument(
        "--output_dir", default=None,
        help="finished runs (default outputs/experiments/heldout_convergence, with a _32x32 "
        "suffix at other resolutions)",
    )  # fmt: skip
    parser.add_argument("--results_dir", default="experiments/results")
    parser.add_argument("--quick", action="store_true", help="tiny runs for a smoke test")
    parser.add_argument(
        "--report", action="store_true",
        help="train nothing: the results of the runs already finished (others may still run)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.resolution < 8 or args.resolution % 4:
        parser.error(f"--resolution must be a multiple of 4 and >= 8, got {args.resolution}")
    if args.output_dir is None:
        args.output_dir = "outputs/experiments/heldout_convergence" + suffix(args.resolution)
    if MDIT_ARM not in args.arms:
        parser.error(f"--arms must include {MDIT_ARM!r}: every comparison is against it")
    return args


def make_protocol(args: argparse.Namespace) -> Protocol:
    if args.quick:
        args.seeds, args.speedup_at = args.seeds[:1], [2]
        return Protocol(
            data=args.data, resolution=args.resolution, steps=4, eval_steps=(2, 4),
            eval_timesteps=(200, 600),
            train_per_font=1, heldout_images=20, samples_per_class=2, num_inference_steps=2,
            classifier_epochs=1,
        )  # fmt: skip
    eval_steps = tuple(s for s in EVAL_STEPS if s < args.steps) + (args.steps,)
    missing = set(args.speedup_at) - set(eval_steps)
    if missing:
        raise SystemExit(f"--speedup_at {sorted(missing)}: not evaluation steps {eval_steps}")
    return Protocol(
        data=args.data, resolution=args.resolution, steps=args.steps, eval_steps=eval_steps
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    protocol = make_protocol(args)
    print(f"protocol: {asdict(protocol)}")
    num_classes = load_data(protocol)["num_classes"]
    for arm in args.arms:
        parameters, flops = cost(ARMS[arm], num_classes, protocol.resolution)
        print(f"{arm:>30}: {parameters / 1e6:.3f}M parameters, {flops / 1e6:.1f} MFLOPs forward")
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    if args.report:
        saved = [saved_run(a, s, protocol, args.output_dir) for a, s in jobs]
        results = [r for r in saved if r is not None]
        print(f"--report: {len(results)} of {len(jobs)} runs finished")
    elif args.workers > 1:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(cached_run, a, s, protocol, args.output_dir) for a, s in jobs]
            results = [f.result() for f in futures]
    else:
        results = [cached_run(a, s, protocol, args.output_dir) for a, s in jobs]
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    for result in results:
        runs[result["arm"]][result["seed"]] = result
    runs = {arm: seeds for arm, seeds in runs.items() if seeds}  # --report: arms with a run

    real = load_data(protocol)
    floor = quality(real["real"], real["real_labels"].numpy(), protocol)
    ratios = speedups(runs, args.speedup_at)
    result = {
        "protocol": asdict(protocol),
        "arguments": vars(args),
        "classifier_heldout_accuracy": reference_classifier(protocol).heldout_accuracy,
        "real_heldout_quality": floor,
        "runs": results,
        "rows": [
            {
                "arm": r["arm"],
                "seed": r["seed"],
                "fd": r["fd"],
                "accuracy": r["accuracy"],
                **{k: v for k, v in p.items() if k != "heldout_loss_by_t"},
            }
            for r in results
            for p in r["curve"]
        ],  # fmt: skip
        "finals": summarise_finals(runs),
        "speedups": ratios,
        "speedup_summary": summarise_speedups(ratios),
        "final_loss_speedups": final_loss_speedups(runs),
    }
    os.makedirs(args.results_dir, exist_ok=True)
    stem = os.path.join(args.results_dir, "heldout_convergence" + suffix(protocol.resolution))
    write_rows(result["rows"], f"{stem}.csv")
    write_rows(result, f"{stem}.json")
    size = f"{protocol.resolution}x{protocol.resolution}"
    plot(runs, f"{stem}.png", f"{protocol.data} {size}, held-out denoising")

    print(
        f"\nreference CNN held-out accuracy {result['classifier_heldout_accuracy']:.3f}; real "
        f"held-out images: FD {floor['fd']:.2f}, accuracy {100 * floor['accuracy']:.1f}%"
    )
    print(f"{'arm':>30} {'params':>7} {'GFLOP/step':>10} {'held-out loss':>17} {'FD':>13} "
          f"{'accuracy %':>12}  (mean+-std over seeds)")  # fmt: skip
    for s in result["finals"]:
        print(
            f"{s['arm']:>30} {s['parameters'] / 1e6:6.3f}M {s['train_gflops_per_step']:10.2f} "
            f"{s['heldout_loss_mean']:.4f}+-{s['heldout_loss_std']:.4f} "
            f"{s['fd_mean']:6.2f}+-{s['fd_std']:<5.2f} "
            f"{100 * s['accuracy_mean']:5.1f}+-{100 * s['accuracy_std']:<4.1f}"
        )
    timesteps = list(result["finals"][0]["heldout_loss_by_t_mean"])
    print(f"\nfinal held-out x0-MSE by timestep (mean over seeds): t = {', '.join(timesteps)}")
    for s in result["finals"]:
        values = s["heldout_loss_by_t_mean"].values()
        print(f"{s['arm']:>30} " + " ".join(f"{v:.4f}" for v in values))
    for s in result["speedup_summary"]:
        cells = []
        for kind in ("step", "flop"):
            if s[f"{kind}_mean"] is not None:
                cells.append(
                    f"{kind}s {s[f'{kind}_mean']:.2f}+-{s[f'{kind}_std']:.2f} "
                    f"[{s[f'{kind}_min']:.2f}, {s[f'{kind}_max']:.2f}]"
                )
            bounds = s[f"{kind}_not_reached_lower_bounds"]
            if bounds:
                cells.append(f"{len(bounds)} seed(s) not reached: {kind}s > {min(bounds):.2f}")
        print(f"speedup vs {s['baseline']} at MDiT step {s['mdit_step']}: " + "; ".join(cells))
    for baseline in dict.fromkeys(r["baseline"] for r in result["final_loss_speedups"]):
        cells = [
            f"seed {r['seed']}: " + (f"{r['step_speedup']:.2f}x steps, {r['flop_speedup']:.2f}x "
                                     "FLOPs" if r["mdit_steps"] else "never reached")
            for r in result["final_loss_speedups"] if r["baseline"] == baseline
        ]  # fmt: skip
        print(f"MDiT to {baseline}'s final held-out loss: " + "; ".join(cells))
    return result


if __name__ == "__main__":
    main()

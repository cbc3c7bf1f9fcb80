"""Shared pieces of the reproduction experiments (issue 9): model configurations on the digits,
training in stages with exact resume, and scoring a saved pipeline.

Training in stages is the library's own loop (``diffusers_mdit.training.trainer.train``, the
loop of ``training/train_mdit.py``) run to step s1, scored, then resumed from its checkpoint to
s2, and so on: resuming is exact (batches, noise and EMA are functions of the seed and the
step), so the quality curve is that of one uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch

from diffusers_mdit.demo import DIGITS_MODEL_CONFIG

# The demo's MDiT {1, 1, 2, 4} (2.36M parameters with 10 classes, 3 channels) and its DiT
# analog {0, 0, 0, L}: the same core width, heads and core patch (so the same 4x4 core token
# grid), no outer level, no aggregate blocks. L = 7 is the depth whose parameter count is
# closest (2.25M, -5%; L = 8 has 2.56M, +8%).
MDIT_DIGITS = dict(DIGITS_MODEL_CONFIG)
DIT_DIGITS = dict(
    DIGITS_MODEL_CONFIG,
    num_outer_in_blocks=0,
    num_outer_out_blocks=0,
    num_alternating_blocks=0,
    num_core_blocks=7,
)


@dataclass
class Recipe:
    """The training recipe shared by every arm of an experiment (the demo's)."""

    resolution: int = 16
    batch_size: int = 64
    learning_rate: float = 2e-3
    ema_decay: float = 0.995
    prediction_type: str = "x0"
    snr_gamma: float = 5.0


def training_flags(
    output_dir: str, config_path: str, steps: int, seed: int, recipe: Recipe, extra=None
):
    """The training configuration of one stage: train to ``steps``, resuming the latest
    checkpoint, keeping one checkpoint; ``extra``: more ``TrainingConfig`` fields."""
    from diffusers_mdit.training import TrainingConfig

    return TrainingConfig(
        output_dir=output_dir,
        model_config=config_path,
        dataset_name="digits",
        resolution=recipe.resolution,
        train_batch_size=recipe.batch_size,
        max_train_steps=steps,
        learning_rate=recipe.learning_rate,
        prediction_type=recipe.prediction_type,
        snr_gamma=recipe.snr_gamma,
        use_ema=True,
        ema_decay=recipe.ema_decay,
        checkpointing_steps=steps,
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
        report_to="none",
        seed=seed,
        **(extra or {}),
    )


def train_in_stages(
    output_dir: str,
    model_config: dict,
    stages: list[int],
    seed: int,
    recipe: Recipe,
    score,
    extra_flags=None,
) -> list[dict]:
    """Train to each step count of ``stages`` in turn and call ``score(pipeline_dir)`` after
    each; returns one record per stage (step, training seconds of the stage, scores). Stages
    already scored (``stages.json`` in ``output_dir``) are skipped, so a stopped experiment
    resumes where it was."""
    from diffusers_mdit.training.trainer import train

    os.makedirs(output_dir, exist_ok=True)
    config_path = os.path.join(output_dir, "model_config.json")
    with open(config_path, "w") as f:
        json.dump(model_config, f, indent=2)
    record_path = os.path.join(output_dir, "stages.json")
    records = []
    if os.path.isfile(record_path):
        with open(record_path) as f:
            records = json.load(f)
    done = {r["step"] for r in records}
    for steps in stages:
        if steps in done:
            continue
        start = time.perf_counter()
        result = train(training_flags(output_dir, config_path, steps, seed, recipe, extra_flags))
        seconds = time.perf_counter() - start
        records.append({"step": result.steps, "train_seconds": seconds, **score(output_dir)})
        with open(record_path, "w") as f:
            json.dump(records, f, indent=2)
    return sorted(records, key=lambda r: r["step"])


def training_flops_per_step(model_config: dict, recipe: Recipe, num_classes: int = 10) -> float:
    """Forward+backward FLOPs of one training step: 3x the forward count (backward = 2x
    forward for matmuls) times the batch, counted on the meta device."""
    from diffusers_mdit.profiling import config_cost

    config = dict(
        model_config,
        sample_size=recipe.resolution,
        in_channels=3,
        out_channels=3,
        num_classes=num_classes,
    )
    cost = config_cost(config, recipe.resolution, recipe.resolution)
    return 3.0 * cost.flops * recipe.batch_size


@torch.no_grad()
def sample_classes(
    pipeline_dir: str,
    samples_per_class: int,
    num_inference_steps: int,
    guidance: float,
    seed: int,
    num_classes: int = 10,
) -> tuple[torch.Tensor, np.ndarray]:
    """``samples_per_class`` samples of each class (the digits' 10 by default) in [-1, 1], and
    their labels."""
    from diffusers_mdit.explain import load_for_analysis

    pipe = load_for_analysis(pipeline_dir).pipeline  # MDiT or DiffiT, by the saved folder
    labels = np.repeat(np.arange(num_classes), samples_per_class)
    images = pipe(
        class_labels=labels.tolist(),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    return images * 2 - 1, labels


def training_state_step(output_dir: str) -> int:
    """The step of the latest checkpoint in ``output_dir``."""
    from diffusers_mdit.training.checkpointing import list_checkpoints

    return list_checkpoints(output_dir)[-1][0]


@lru_cache(maxsize=1)
def _digits_classifier():
    from diffusers_mdit.evaluation import ReferenceClassifier

    return ReferenceClassifier.from_digits(seed=0)


@lru_cache(maxsize=4)
def _digits_reference(resolution: int):
    from diffusers_mdit.evaluation import ImageSet

    return ImageSet.digits(resolution)


def offline_quality(images: torch.Tensor, labels, reference, classifier) -> dict:
    """``fd`` (Frechet distance in ``classifier``'s features against ``reference``) and
    ``accuracy`` (samples classified as the class asked for) of samples in [-1, 1]."""
    from diffusers_mdit.evaluation import ImageSet, evaluate

    scores = evaluate(
        ImageSet.from_tensor(images, labels),
        ["fd_classifier", "accuracy"],
        reference=reference,
        classifier=classifier,
    )
    return {"fd": scores["fd_classifier"], "accuracy": scores["accuracy"]}


def digits_quality(images: torch.Tensor, labels) -> dict:
    """The offline digits metrics (:func:`offline_quality`) against the real digits at the
    samples' size."""
    return offline_quality(
        images, labels, _digits_reference(images.shape[-1]), _digits_classifier()
    )


class FolderQuality:
    """The offline metrics of :func:`digits_quality` against a labelled ``imagefolder`` (class
    sub-folders or ``metadata.jsonl`` labels) at ``resolution``: the reference classifier is
    trained once on its images (``diffusers_mdit.evaluation.train_classifier``, seed 0)."""

    def __init__(self, path: str, resolution: int):
        from diffusers_mdit.evaluation import ImageSet
        from diffusers_mdit.evaluation.score import train_classifier

        self.reference = ImageSet.from_folder(path, resolution)
        if self.reference.labels is None or (self.reference.labels < 0).any():
            raise ValueError(
                f"{path!r} has no class labels: the offline metrics and class-conditional "
                "training need class sub-folders or a metadata.jsonl with a 'label' column."
            )
        self.num_classes = int(self.reference.labels.max()) + 1
        self.classifier = train_classifier(self.reference, seed=0)

    def __call__(self, images: torch.Tensor, labels) -> dict:
        return offline_quality(images, labels, self.reference, self.classifier)


def write_rows(rows: list[dict], path: str) -> None:
    """``rows`` as JSON (``.json``) or CSV (``.csv``, the union of the keys as columns)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".json"):
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w") as f:
        f.write(",".join(columns) + "\n")
        for row in rows:
            f.write(",".join(str(row.get(c, "")) for c in columns) + "\n")


def recipe_dict(recipe: Recipe) -> dict:
    return asdict(recipe)


def add_run_arguments(parser: argparse.ArgumentParser, name: str, samples_per_class: int = 20):
    """The arguments every experiment shares: how each run is sampled for scoring, where the
    runs (``outputs/experiments/<name>``) and the results go, and ``--quick``."""
    parser.add_argument("--samples_per_class", type=int, default=samples_per_class)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--output_dir", default=f"outputs/experiments/{name}")
    parser.add_argument("--results_dir", default="experiments/results")
    parser.add_argument("--quick", action="store_true", help="tiny runs for a smoke test")


# -- comparing architectures under one recipe (experiments 2 and 5) ---------------------------


def arm_arguments(description: str, arms: list[str], name: str, argv=None) -> argparse.Namespace:
    """Command-line arguments of an arm comparison (``name``: its results file stem)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--arms", nargs="+", default=arms, choices=arms)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=800)
    add_run_arguments(parser, name)
    parser.add_argument(
        "--update",
        action="store_true",
        help=f"keep the rows of the arms not in --arms from the existing {name}.json (to add an "
        "arm without retraining the others; they must have used the same recipe and --steps)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = [0], 2
        args.samples_per_class, args.num_inference_steps = 2, 2
    return args


def parameter_count(config: dict, recipe: Recipe) -> int:
    """Parameters of a model config (MDiT, or DiffiT by ``_class_name``) on the digits."""
    from diffusers_mdit.profiling import config_cost

    extra = dict(sample_size=recipe.resolution, in_channels=3, out_channels=3, num_classes=10)
    return config_cost(dict(config, **extra), recipe.resolution, recipe.resolution).parameters


def spread(values) -> float:
    """Sample standard deviation, 0 for a single value (one seed)."""
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise_arms(rows: list[dict], arms: list[str]) -> list[dict]:
    """Mean and (sample) standard deviation over seeds of FD and accuracy per arm."""
    summary = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        entry = {"arm": arm, "parameters": mine[0]["parameters"], "seeds": len(mine)}
        for key in ("fd", "accuracy"):
            values = [r[key] for r in mine]
            entry[f"{key}_mean"] = statistics.mean(values)
            entry[f"{key}_std"] = spread(values)
        summary.append(entry)
    return summary


def plot_arms(summary: list[dict], rows: list[dict], path: str) -> None:
    """Bars of mean FD and accuracy per arm with their spread, each seed a dot."""
    from diffusers_mdit.explain.common import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    names = [s["arm"] for s in summary]
    for axis, key, label in ((axes[0], "fd", "classifier FD (lower is better)"),
                             (axes[1], "accuracy", "conditional accuracy")):  # fmt: skip
        means = [s[f"{key}_mean"] for s in summary]
        stds = [s[f"{key}_std"] for s in summary]
        axis.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
        for i, name in enumerate(names):
            seeds = [r[key] for r in rows if r["arm"] == name]
            axis.scatter([i] * len(seeds), seeds, color="black", s=12, zorder=3)
        axis.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        axis.set_title(label)
    save_figure(figure, path)


def arm_folder(arm: str) -> str:
    """``"no outer level {0,0,2,5}"`` -> ``"no_outer_level"``."""
    return re.sub(r"[^a-z0-9.]+", "_", arm.split(" {")[0].lower()).strip("_")


def kept_rows(path: str, args: argparse.Namespace, recipe: Recipe) -> list[dict]:
    """The rows of ``path`` (an earlier :func:`compare_arms` result) whose arm is not in
    ``args.arms``, after checking that they were made with the same recipe and step count."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--update needs an earlier result at {path}; run without it")
    with open(path) as f:
        earlier = json.load(f)
    same = earlier.get("recipe") == recipe_dict(recipe) and all(
        earlier.get("arguments", {}).get(key) == getattr(args, key)
        for key in ("steps", "samples_per_class", "num_inference_steps", "guidance_scale")
    )
    if not same:
        raise ValueError(
            f"--update: {path} was made with another recipe, --steps or sampling settings; "
            "rerun every arm without --update"
        )
    return [row for row in earlier["rows"] if row["arm"] not in args.arms]


def compare_arms(arms: dict[str, dict], args: argparse.Namespace, name: str) -> dict:
    """Train every arm (model config) with the same recipe for each seed, sample each, score
    it with the offline digits metrics; write ``<results_dir>/<name>.json`` / ``.csv`` /
    ``.png`` and print the table. Finished runs are reused (see :func:`train_in_stages`)."""
    recipe = Recipe()
    rows = []
    if args.update:
        rows = kept_rows(os.path.join(args.results_dir, f"{name}.json"), args, recipe)
    for arm in args.arms:
        config = arms[arm]
        for seed in args.seeds:
            folder = os.path.join(args.output_dir, arm_folder(arm), f"seed{seed}")
            train_in_stages(folder, config, [args.steps], seed, recipe, lambda _: {})
            images, labels = sample_classes(
                folder, args.samples_per_class, args.num_inference_steps, args.guidance_scale, 0
            )
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "parameters": parameter_count(config, recipe),
                    "train_gflops_per_step": training_flops_per_step(config, recipe) / 1e9,
                    **digits_quality(images, labels),
                }
            )
    order = {arm: i for i, arm in enumerate(arms)}
    rows.sort(key=lambda r: (order.get(r["arm"], len(order)), r["seed"]))
    run_arms = list(dict.fromkeys(r["arm"] for r in rows))
    summary = summarise_arms(rows, run_arms)
    os.makedirs(args.results_dir, exist_ok=True)
    write_rows(rows, os.path.join(args.results_dir, f"{name}.csv"))
    arguments = dict(vars(args), arms=run_arms)  # with --update: every arm in the result
    result = {"recipe": recipe_dict(recipe), "arguments": arguments, "rows": rows,
              "summary": summary}  # fmt: skip
    write_rows(result, os.path.join(args.results_dir, f"{name}.json"))
    plot_arms(summary, rows, os.path.join(args.results_dir, f"{name}.png"))

    print(f"{'arm':>34} {'params':>7} {'FD':>14} {'accuracy %':>14}  (mean+-std over seeds)")
    for s in summary:
        print(
            f"{s['arm']:>34} {s['parameters'] / 1e6:6.2f}M {s['fd_mean']:7.2f}+-{s['fd_std']:<5.2f}"
            f" {100 * s['accuracy_mean']:7.1f}+-{100 * s['accuracy_std']:<5.1f}"
        )
    return result

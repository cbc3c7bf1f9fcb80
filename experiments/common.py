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
    output_dir: str, config_path: str, steps: int, seed: int, recipe: Recipe, extra=()
) -> argparse.Namespace:
    """``train_mdit.py`` flags for one stage: train to ``steps``, resuming the latest
    checkpoint, keeping one checkpoint."""
    from diffusers_mdit.training.trainer import add_arguments

    flags = [
        "--output_dir", output_dir,
        "--model_config", config_path,
        "--dataset_name", "digits",
        "--resolution", str(recipe.resolution),
        "--train_batch_size", str(recipe.batch_size),
        "--max_train_steps", str(steps),
        "--learning_rate", str(recipe.learning_rate),
        "--prediction_type", recipe.prediction_type,
        "--snr_gamma", str(recipe.snr_gamma),
        "--use_ema", "--ema_decay", str(recipe.ema_decay),
        "--checkpointing_steps", str(steps),
        "--checkpoints_total_limit", "1",
        "--resume_from_checkpoint", "latest",
        "--report_to", "none",
        "--seed", str(seed),
        *extra,
    ]  # fmt: skip
    return add_arguments(argparse.ArgumentParser()).parse_args(flags)


def train_in_stages(
    output_dir: str,
    model_config: dict,
    stages: list[int],
    seed: int,
    recipe: Recipe,
    score,
    extra_flags=(),
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
    pipeline_dir: str, samples_per_class: int, num_inference_steps: int, guidance: float, seed: int
) -> tuple[torch.Tensor, np.ndarray]:
    """``samples_per_class`` samples of each digit in [-1, 1], and their labels."""
    from diffusers_mdit import MDiTPipeline

    pipe = MDiTPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    labels = np.repeat(np.arange(10), samples_per_class)
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


def digits_quality(images: torch.Tensor, labels) -> dict:
    """The offline digits metrics of samples in [-1, 1] against the real digits at their
    size: ``fd`` (Frechet distance in the reference classifier's features) and ``accuracy``
    (samples classified as the digit asked for)."""
    from diffusers_mdit.evaluation import ImageSet, evaluate

    scores = evaluate(
        ImageSet.from_tensor(images, labels),
        ["fd_classifier", "accuracy"],
        reference=_digits_reference(images.shape[-1]),
        classifier=_digits_classifier(),
    )
    return {"fd": scores["fd_classifier"], "accuracy": scores["accuracy"]}


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

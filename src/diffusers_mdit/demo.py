"""The main job: train a small class-conditional MDiT on the built-in digits and look at it.

``./run.sh demo`` (console script ``mdit-demo``) trains with the same loop users launch through
``accelerate launch training/train_mdit.py``, saves the pipeline, reloads it with
``DiffusionPipeline.from_pretrained``, writes a PNG grid with one row per digit and prints how
often an SVC trained on the real digits recognises the intended digit in the samples.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .training.config import TrainingConfig

# A two-level MDiT {M, N, K, L} = {1, 1, 2, 4} for 16x16 digits: the outer blocks work on all
# 256 pixels (width 32, neighborhood 7); a 4x4 core patch gives a 4x4 core grid (width 128),
# merged to 2x2 by the aggregate blocks. About 2.4M parameters.
DIGITS_MODEL_CONFIG = dict(
    num_outer_in_blocks=1,
    num_outer_out_blocks=1,
    num_alternating_blocks=2,
    num_core_blocks=4,
    outer_dim=32,
    core_dim=128,
    attention_head_dim=32,
    core_patch_size=4,
    timestep_embedding_dim=128,
)


@dataclass
class DemoResult:
    """What :func:`run_demo` measured."""

    pipeline_dir: str
    grid_path: str
    train_seconds: float
    steps: int
    final_loss: float
    accuracy: float
    per_class_accuracy: list[float]
    classifier_heldout_accuracy: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mdit-demo",
        description="Train a small class-conditional MDiT on scikit-learn's digits (CPU, a few "
        "minutes), reload it with DiffusionPipeline.from_pretrained, write a sample grid with one "
        "row per digit and print how often a classifier of real digits recognises them. An "
        "interrupted run resumes from its last checkpoint when started again.",
    )
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--resolution", type=int, default=16, choices=[16, 32])
    parser.add_argument("--max_train_steps", type=int, default=800)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--samples_per_class", type=int, default=10)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def training_arguments(args: argparse.Namespace, config_path: str) -> TrainingConfig:
    """The training configuration the demo runs with."""
    return TrainingConfig(
        output_dir=args.output_dir,
        model_config=config_path,
        dataset_name="digits",
        resolution=args.resolution,
        train_batch_size=args.train_batch_size,
        max_train_steps=args.max_train_steps,
        learning_rate=args.learning_rate,
        use_ema=True,
        ema_decay=0.995,
        checkpointing_steps=max(args.max_train_steps // 4, 1),
        checkpoints_total_limit=1,
        resume_from_checkpoint="latest",
        report_to="none",
        seed=args.seed,
    )


def run_demo(args: argparse.Namespace) -> DemoResult:
    """Train, reload, sample, score; see the module docstring."""
    from diffusers import DiffusionPipeline

    from .evaluation import DigitsClassifier
    from .training.trainer import save_grid, train

    os.makedirs(args.output_dir, exist_ok=True)
    config_path = os.path.join(args.output_dir, "model_config.json")
    with open(config_path, "w") as f:
        json.dump(DIGITS_MODEL_CONFIG, f, indent=2)

    start = time.perf_counter()
    result = train(training_arguments(args, config_path))
    train_seconds = time.perf_counter() - start

    # The generic loader, as a user would load a folder from the Hub.
    pipe = DiffusionPipeline.from_pretrained(args.output_dir, trust_remote_code=True)
    labels = [digit for digit in range(10) for _ in range(args.samples_per_class)]
    images = pipe(
        class_labels=labels,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
    ).images
    grid_path = os.path.join(args.output_dir, "samples.png")
    save_grid(images, 10, grid_path)

    classifier = DigitsClassifier()
    predicted = classifier.predict(images * 2 - 1)
    hits = predicted == np.asarray(labels)
    per_class = [float(hits[np.asarray(labels) == d].mean()) for d in range(10)]
    return DemoResult(
        pipeline_dir=result.pipeline_dir,
        grid_path=grid_path,
        train_seconds=train_seconds,
        steps=result.steps,
        final_loss=result.final_loss,
        accuracy=float(hits.mean()),
        per_class_accuracy=per_class,
        classifier_heldout_accuracy=classifier.heldout_accuracy,
    )


def main(argv: list[str] | None = None) -> DemoResult:
    args = parse_args(argv)
    total = time.perf_counter()
    result = run_demo(args)
    if math.isnan(result.final_loss):  # resumed at the last step: nothing left to train
        trained = f"The run in {result.pipeline_dir} had already finished {result.steps} steps"
    else:
        trained = (
            f"Trained {result.steps} steps in {result.train_seconds:.0f} s (last loss "
            f"{result.final_loss:.4f})"
        )
    print(
        f"\n{trained}; the pipeline in {result.pipeline_dir} was reloaded with "
        "DiffusionPipeline.from_pretrained."
    )
    print(f"Samples, one row per digit 0-9: {result.grid_path}")
    per_class = " ".join(f"{d}:{100 * a:.0f}%" for d, a in enumerate(result.per_class_accuracy))
    print(
        f"A classifier of real digits (SVC, {100 * result.classifier_heldout_accuracy:.1f}% on "
        f"held-out real digits) recognises the intended digit in {100 * result.accuracy:.1f}% "
        f"of the {10 * args.samples_per_class} samples ({per_class})."
    )
    print(f"Total wall time: {time.perf_counter() - total:.0f} s.")
    return result

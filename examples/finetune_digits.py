"""Worked example of fine-tuning to a larger size (MDiT appendix J) on the digits.

The demo's model, trained on 16x16 digits (``./run.sh demo``), is sampled at 32x32 as it is
(global core attention, neighborhood core attention, HiDiffusion schedule), then fine-tuned at
32x32 with each ``train_mdit.py --finetune`` mode; every variant draws 10 samples per digit,
scored by the SVC of real digits. Writes ``<output_dir>/<variant>/samples.png`` and
``<output_dir>/results.json`` and prints a table.

    python examples/finetune_digits.py                      # ~25 min on a 2-core CPU
    python examples/finetune_digits.py --max_train_steps 20 --samples_per_class 2  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.demo import main as demo
from diffusers_mdit.evaluation import DigitsClassifier
from diffusers_mdit.training import TrainingConfig
from diffusers_mdit.training.trainer import save_grid, train

MODES = ("full", "aggregate", "patch", "lora")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="outputs/demo", help="The 16x16 demo pipeline.")
    parser.add_argument("--output_dir", default="outputs/finetune_digits")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--core_kernel_size", type=int, default=5)
    parser.add_argument("--lora_rank", type=int, default=8)
    parser.add_argument("--samples_per_class", type=int, default=10)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def score(pipe, args, classifier, folder, size, **call) -> float:
    labels = [digit for digit in range(10) for _ in range(args.samples_per_class)]
    images = pipe(
        class_labels=labels,
        height=size,
        width=size,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="pt",
        **call,
    ).images
    os.makedirs(folder, exist_ok=True)
    save_grid(images, 10, os.path.join(folder, "samples.png"))
    return classifier.accuracy(images * 2 - 1, np.asarray(labels))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.base, "model_index.json")):
        demo(["--output_dir", args.base, "--seed", str(args.seed)])
    classifier = DigitsClassifier()
    results = {}

    def report(name, accuracy, seconds=None, trainable=None):
        results[name] = dict(accuracy=accuracy, train_seconds=seconds, trainable=trainable)
        print(f"{name:<28} accuracy {100 * accuracy:5.1f}%", flush=True)

    base = MDiTPipeline.from_pretrained(args.base)
    out = lambda name: os.path.join(args.output_dir, name)  # noqa: E731
    report("base@16", score(base, args, classifier, out("base@16"), 16))
    report("base@32 global core", score(base, args, classifier, out("base@32"), 32))
    report(
        f"base@32 NA core k={args.core_kernel_size}",
        score(base, args, classifier, out("base@32-na"), 32, core_attention="neighborhood",
              core_kernel_size=args.core_kernel_size),
    )  # fmt: skip
    report(
        "base@32 HiDiffusion p=0.3",
        score(base, args, classifier, out("base@32-hidiffusion"), 32, core_patch_schedule=0.3),
    )

    for mode in args.modes:
        folder = out(f"finetune-{mode}")
        config = TrainingConfig(
            pretrained_model_name_or_path=args.base, finetune=mode, output_dir=folder,
            dataset_name="digits", resolution=32, train_batch_size=args.train_batch_size,
            max_train_steps=args.max_train_steps, learning_rate=args.learning_rate,
            core_kernel_size=args.core_kernel_size, lora_rank=args.lora_rank,
            checkpointing_steps=args.max_train_steps, checkpoints_total_limit=1,
            resume_from_checkpoint="latest", report_to="none", seed=args.seed,
        )  # fmt: skip
        start = time.perf_counter()
        result = train(config)
        seconds = time.perf_counter() - start
        if mode == "lora":
            pipe = MDiTPipeline.from_pretrained(args.base)
            pipe.load_lora_weights(folder)
        else:
            pipe = MDiTPipeline.from_pretrained(folder)
        accuracy = score(pipe, args, classifier, folder, 32)
        report(f"fine-tuned@32 {mode}", accuracy, seconds, result.trainable_parameters)

    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print("\n| variant | trainable params | fine-tuning s | accuracy |\n|---|---|---|---|")
    for name, r in results.items():
        trained = f"{r['trainable']:,}" if r["trainable"] is not None else "-"
        seconds = f"{r['train_seconds']:.0f}" if r["train_seconds"] is not None else "-"
        print(f"| {name} | {trained} | {seconds} | {100 * r['accuracy']:.1f}% |")
    return results


if __name__ == "__main__":
    main()

"""``mdit-eval``: sample a pipeline into an image folder, score an image folder.

::

    mdit-eval generate PIPELINE_DIR --output_dir samples --num_samples 1000 [--batch_size 16]
        [--seed 0] [--num_inference_steps 50] [--guidance_scale 1.0] [--eta E]
        [--height H --width W] [--prompts prompts.txt] [--device cuda] [--dtype bfloat16]
    mdit-eval score samples --metrics fd_classifier,accuracy[,fid,sfid,is,precision,recall,
        fd_dinov2,clip_score] [--reference digits|REAL_DIR] [--output scores.json]
        [--inception_weights PATH] [--dinov2_model NAME_OR_DIR] [--clip_model NAME_OR_DIR]

``generate`` resumes an interrupted run (same arguments, see :mod:`.generate`). ``score``
prints the results as JSON and writes them to ``--output``; a metric whose library or weights
are missing stops it with a message saying how to get them (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..cli import USER_ERRORS, run_command
from .features import CLIP_MODEL, DINOV2_MODEL, MetricUnavailableError
from .score import METRICS, ImageSet, evaluate, parse_metrics

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdit-eval", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="Sample a pipeline folder into PNGs.")
    generate.add_argument("pipeline", help="Pipeline folder saved with save_pretrained.")
    generate.add_argument("--output_dir", required=True)
    generate.add_argument("--num_samples", type=int, required=True)
    generate.add_argument("--batch_size", type=int, default=16)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--num_inference_steps", type=int, default=50)
    generate.add_argument("--guidance_scale", type=float, default=1.0)
    generate.add_argument("--eta", type=float, default=None, help="DDIM eta (pipeline default).")
    generate.add_argument("--height", type=int, default=None)
    generate.add_argument("--width", type=int, default=None)
    generate.add_argument(
        "--prompts", default=None, help="Text file, one prompt a line (text-to-image)."
    )
    generate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    generate.add_argument("--dtype", choices=sorted(DTYPES), default="float32")

    score = commands.add_parser("score", help="Score an image folder against a reference.")
    score.add_argument("samples", help="Image folder (e.g. written by `mdit-eval generate`).")
    score.add_argument(
        "--metrics",
        default="fd_classifier,accuracy",
        help=f"Comma-separated, from: {', '.join(METRICS)}.",
    )
    score.add_argument(
        "--reference",
        default="digits",
        help="'digits' (scikit-learn's real digits) or a folder of real images.",
    )
    score.add_argument("--output", default=None, help="JSON file for the results.")
    score.add_argument("--batch_size", type=int, default=64)
    score.add_argument("--seed", type=int, default=0, help="Seed of the offline classifier.")
    score.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    score.add_argument("--inception_weights", default=None, help="Local InceptionV3 .pth.")
    score.add_argument("--dinov2_model", default=DINOV2_MODEL)
    score.add_argument("--clip_model", default=CLIP_MODEL)
    return parser


def run_generate(args) -> dict:
    from ..explain.common import load_for_analysis
    from .generate import generate_samples

    pipeline = load_for_analysis(args.pipeline, args.device, DTYPES[args.dtype]).require_pipeline(
        "mdit-eval generate"
    )
    prompts = None
    if args.prompts is not None:
        with open(args.prompts) as f:
            prompts = [line.strip() for line in f if line.strip()]
    elif type(pipeline).__name__ == "MDiTTextToImagePipeline":
        raise ValueError("A text-to-image pipeline needs --prompts FILE (one prompt a line).")
    extra = {
        k: getattr(args, k) for k in ("eta", "height", "width") if getattr(args, k) is not None
    }
    result = generate_samples(
        pipeline,
        args.output_dir,
        args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        prompts=prompts,
        **extra,
    )
    return vars(result)


def run_score(args) -> dict:
    names = parse_metrics(args.metrics)
    samples = ImageSet.from_folder(args.samples)
    if args.reference == "digits":
        reference = ImageSet.digits(samples.size[0])
    else:
        reference = ImageSet.from_folder(args.reference, resolution=samples.size)
    results = evaluate(
        samples,
        names,
        reference,
        inception_weights=args.inception_weights,
        dinov2_model=args.dinov2_model,
        clip_model=args.clip_model,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        progress=True,
    )
    report = {
        "samples": args.samples,
        "reference": args.reference,
        "num_samples": len(samples),
        "num_reference": len(reference),
        "metrics": results,
    }
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> int:
    """The ``mdit-eval`` console script: exit status 0, or 2 with ``mdit-eval COMMAND: error:
    message`` for a bad argument or file or an unavailable metric."""
    args = build_parser().parse_args(argv)

    def command() -> None:
        report = run_generate(args) if args.command == "generate" else run_score(args)
        print(json.dumps(report, indent=2))

    return run_command(f"mdit-eval {args.command}", command, (*USER_ERRORS, MetricUnavailableError))


if __name__ == "__main__":
    sys.exit(main())

"""``mdit-explain ANALYSIS MODEL_OR_PIPELINE_DIR --output_dir DIR``.

Each analysis lives in its own module of this package, which provides ``HELP`` (one line),
``add_arguments(parser)`` for its own options, and ``run_cli(loaded, args) -> dict``: it runs
the analysis on the loaded model, writes its PNGs into ``args.output_dir`` and returns the
numbers, which this command writes to ``DIR/<analysis>.json``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

import torch

from ..cli import run_command
from .common import load_for_analysis, write_json

# Subcommand -> module of this package.
ANALYSES = {
    "rope-probe": "rope_probe",
    "mlp-probe": "mlp_probe",
    "core-contribution": "core_contribution",
    "spectrum": "spectrum",
    "focal": "focal",
    "destructive": "destructive",
}


def available_analyses() -> dict[str, str]:
    """The analyses whose modules exist (they land one by one; see docs/explain.md)."""
    return {
        name: module
        for name, module in ANALYSES.items()
        if importlib.util.find_spec(f".{module}", __package__) is not None
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdit-explain",
        description="Explainability analyses of a saved MDiT model or pipeline (MDiT paper "
        "section 4, appendices D, F.2, I.5, M). Writes OUTPUT_DIR/<analysis>.json and PNGs.",
    )
    commands = parser.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name, module_name in available_analyses().items():
        module = importlib.import_module(f".{module_name}", __package__)
        sub = commands.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sub.add_argument("model", metavar="MODEL_OR_PIPELINE_DIR", help="pipeline or model folder")
        sub.add_argument("--output_dir", required=True, help="where the JSON and PNGs go")
        sub.add_argument(
            "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
        )
        sub.add_argument("--seed", type=int, default=0, help="seed of every random draw")
        module.add_arguments(sub)
    return parser


def run(argv: list[str] | None = None) -> dict:
    """Run one analysis from command-line arguments; returns its numbers (as written to JSON)."""
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f".{ANALYSES[args.analysis]}", __package__)
    loaded = load_for_analysis(args.model, device=args.device)
    os.makedirs(args.output_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    result = module.run_cli(loaded, args)
    path = write_json(result, os.path.join(args.output_dir, f"{args.analysis}.json"))
    print(f"{args.analysis}: wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    """The ``mdit-explain`` console script (see :func:`run` for the numbers): exit status 0,
    or 2 with ``mdit-explain: error: message`` for a bad argument or file."""
    return run_command("mdit-explain", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())

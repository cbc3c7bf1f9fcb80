"""Command-line entry points."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from .models import (
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    DiTBaselineTransformer2DModel,
    MDiTTransformer2DModel,
    paper_parameter_count,
)
from .profiling import config_cost, count_parameters, preset_cost

# Figures quoted by the MDiT paper (section 5.5 tables 3-4, F.1, G.5), the DiffiT paper and
# the DiT paper (table 1, Gflops that are MACs), for comparison only.
PAPER_FIGURES = {
    "MDiT-B": "111M uncond. (FFHQ) / 133M class-cond. (ImageNet); 30 G per forward",
    "DiffiT-XL": "561M; 114 G per forward (table 9)",
    "DiT-S/2": "33M; 6.06 G per forward",
    "DiT-B/2": "130M; 23.01 G per forward",
    "DiT-L/2": "458M; 80.71 G per forward",
    "DiT-XL/2": "675M; 118.64 G per forward",
}


# Errors a user causes (a bad value, a missing or unreadable file): the console scripts print
# their message, as argparse reports a bad flag, instead of a traceback. Anything else is a bug
# and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def run_command(
    prog: str,
    command: Callable[[], Any],
    user_errors: tuple[type[BaseException], ...] = USER_ERRORS,
) -> int:
    """Run ``command``; return 0, or 2 after printing ``prog: error: message`` on stderr when
    it raises one of ``user_errors`` (argparse's format and exit status for bad arguments)."""
    try:
        command()
    except user_errors as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def preset_table(height: int = 32, width: int = 32) -> str:
    """Parameters (class-conditional and unconditional) and forward cost of every preset."""
    rows = [
        f"{'preset':<14} {'params (1000 classes)':>22} {'params (uncond.)':>17} "
        f"{'GMACs':>8} {'GFLOPs':>8}  paper"
    ]
    for name in MDiTTransformer2DModel.list_presets():
        conditional = preset_cost(name, height, width)
        unconditional = preset_cost(name, height, width, num_classes=0)
        rows.append(
            f"{name:<14} {conditional.parameters / 1e6:>21.1f}M "
            f"{unconditional.parameters / 1e6:>16.1f}M "
            f"{conditional.gmacs:>8.2f} {conditional.gflops:>8.2f}  {PAPER_FIGURES.get(name, '')}"
        )
    return "\n".join(rows)


def diffit_table() -> str:
    """Parameters and forward cost of every DiffiT preset at its training size."""
    rows = [f"{'preset':<15} {'model':<25} {'input':>9} {'params':>9} {'GMACs':>8}  paper"]
    for cls in (DiffiTTransformer2DModel, DiffiTUNet2DModel):
        for name in cls.list_presets():
            cost = preset_cost(name)
            config = cls.preset_config(name)
            channels = config.get("in_channels", 4 if cls is DiffiTTransformer2DModel else 3)
            size = config.get("sample_size", 32)
            shape = f"{channels}x{size}x{size}"
            rows.append(
                f"{name:<15} {cls.__name__:<25} {shape:>9} {cost.parameters / 1e6:>8.1f}M "
                f"{cost.gmacs:>8.2f}  {PAPER_FIGURES.get(name, '')}"
            )
    return "\n".join(rows)


def dit_table(height: int = 32, width: int = 32) -> str:
    """Parameters (diffusers' model, and as the DiT paper counts them: one shared timestep and
    label embedding instead of one per block) and forward cost of every original-DiT preset."""
    rows = [f"{'preset':<9} {'params':>9} {'paper count':>12} {'GMACs':>8}  paper"]
    for name in DiTBaselineTransformer2DModel.list_presets():
        cost = preset_cost(name, height, width)
        with torch.device("meta"):
            shared = paper_parameter_count(DiTBaselineTransformer2DModel.from_preset(name))
        rows.append(
            f"{name:<9} {cost.parameters / 1e6:>8.1f}M {shared / 1e6:>11.1f}M "
            f"{cost.gmacs:>8.2f}  {PAPER_FIGURES.get(name, '')}"
        )
    return "\n".join(rows)


def sizes(argv: list[str] | None = None) -> int:
    """Build a model, run a forward pass on a random latent, print its size and cost, and the
    table of every preset (exit status 2 with the message for a bad argument)."""
    return run_command("mdit-sizes", lambda: _sizes(argv))


def _sizes(argv: list[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="mdit-sizes", description=sizes.__doc__)
    presets = [*MDiTTransformer2DModel.list_presets(), *MDiTTransformer2DModel.preset_aliases]
    parser.add_argument("--preset", default="MDiT-B", choices=presets)
    parser.add_argument("--resolution", type=int, default=32, help="latent height and width")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_table", action="store_true", help="skip the table of all presets")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = MDiTTransformer2DModel.from_preset(args.preset).eval()
    config = model.config
    latents = torch.randn(args.batch_size, config.in_channels, args.resolution, args.resolution)
    timestep = torch.full((args.batch_size,), 500)
    labels = (
        torch.randint(0, config.num_classes, (args.batch_size,)) if config.num_classes else None
    )
    with torch.no_grad():
        start = time.perf_counter()
        out = model(latents, timestep, class_labels=labels).sample
        seconds = time.perf_counter() - start
    # Counted on a meta-device copy: there neighborhood attention has its ideal shapes, while
    # the fused CPU kernels are invisible to torch's FLOP counter.
    cost = config_cost(model.config, args.resolution, args.resolution)
    print(
        f"{args.preset} {{M,N,K,L}} = {{{config.num_outer_in_blocks},{config.num_outer_out_blocks},"
        f"{config.num_alternating_blocks},{config.num_core_blocks}}}, widths "
        f"{config.outer_dim}/{config.core_dim}, {config.num_classes} classes"
    )
    print(f"parameters: {count_parameters(model) / 1e6:.1f}M")
    print(
        f"forward on {tuple(latents.shape)}: {cost.gmacs:.2f} GMACs "
        f"({cost.gflops:.2f} GFLOPs) per image, {seconds / args.batch_size:.2f} s per image on "
        f"{torch.get_num_threads()} CPU threads"
    )
    print(
        f"output {tuple(out.shape)}, max |output| = {out.abs().max().item():.3g} "
        "(exactly 0 at initialisation, appendix G.3)"
    )
    if not args.no_table:
        print(
            f"\nAll presets at {config.in_channels}x{args.resolution}x{args.resolution} "
            "(built on the meta device):"
        )
        print(preset_table(args.resolution, args.resolution))
        print(
            "\nOriginal DiT presets (Peebles & Xie; diffusers' DiTTransformer2DModel, which gives "
            "every block its own timestep and label embedding) at the same size:"
        )
        print(dit_table(args.resolution, args.resolution))
        print("\nDiffiT presets at their training size (class-conditional where the preset is):")
        print(diffit_table())


def demo(argv: list[str] | None = None) -> int:
    """The main job (``./run.sh demo``): train an MDiT on the digits; see :mod:`.demo`."""
    from .demo import main

    return run_command("mdit-demo", lambda: main(argv))


if __name__ == "__main__":
    sys.exit(demo())

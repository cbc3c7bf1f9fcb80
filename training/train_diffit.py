"""Train a DiffiT: ``accelerate launch training/train_diffit.py --preset DiffiT-S [flags]``.

The same loop and flags as ``train_mdit.py`` (see ``--help``), with DiffiT presets: "DiffiT-S"
(latent, small), "DiffiT-XL" (latent, the paper's), "DiffiT-CIFAR10" and "DiffiT-FFHQ64" (image
space). Patch regularisation is MDiT-only; the final folder holds a ``DiffiTPipeline``.
"""

from __future__ import annotations

import argparse

from diffusers_mdit.training.trainer import add_arguments, train


def main() -> None:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.set_defaults(preset="DiffiT-S", output_dir="outputs/diffit")
    result = train(parser.parse_args())
    print(f"Finished at step {result.steps}, loss {result.final_loss:.6f}; pipeline in "
          f"{result.pipeline_dir}")  # fmt: skip


if __name__ == "__main__":
    main()

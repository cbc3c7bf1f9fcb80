"""Train an MDiT: ``accelerate launch training/train_mdit.py [flags]``.

Thin wiring of :mod:`diffusers_mdit.training.trainer`; ``--help`` lists the flags. On the
built-in digits (the default dataset) a CPU run of a few hundred steps gives recognisable
digits.
"""

from __future__ import annotations

import argparse

from diffusers_mdit.training.trainer import add_arguments, train


def main() -> None:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    result = train(parser.parse_args())
    print(f"Finished at step {result.steps}, loss {result.final_loss:.6f}; pipeline in "
          f"{result.pipeline_dir}")  # fmt: skip


if __name__ == "__main__":
    main()

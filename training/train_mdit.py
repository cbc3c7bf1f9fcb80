"""Train an MDiT: ``accelerate launch training/train_mdit.py [flags]``.

Thin wiring of :mod:`diffusers_mdit.training.trainer`; ``--help`` lists the flags. On the
built-in digits (the default dataset) a CPU run of a few hundred steps gives recognisable
digits.
"""

from __future__ import annotations

from diffusers_mdit.training.trainer import main

if __name__ == "__main__":
    main(__doc__.split("\n")[0])

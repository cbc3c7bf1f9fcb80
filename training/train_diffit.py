"""Train a DiffiT: ``accelerate launch training/train_diffit.py --preset DiffiT-S [flags]``.

The same loop and flags as ``train_mdit.py`` (see ``--help``), with DiffiT presets: "DiffiT-S"
(latent, small), "DiffiT-XL" (latent, the paper's), "DiffiT-CIFAR10" and "DiffiT-FFHQ64" (image
space). Patch regularisation is MDiT-only; the final folder holds a ``DiffiTPipeline``.
"""

from __future__ import annotations

from diffusers_mdit.training.trainer import main

if __name__ == "__main__":
    main(__doc__.split("\n")[0], preset="DiffiT-S", output_dir="outputs/diffit")

"""Experiment 5 (DiffiT paper figure 7b, at small scale): TMSA vs adaLN time conditioning.

A small latent-style DiffiT (ViT of DiffiT blocks, patch 2, so an 8x8 token grid on the 16x16
digits; width 128, 4 blocks, 4 heads, class-conditional) trained on the digits twice with the
identical recipe (the other experiments'): once with TMSA, the time token projected into every
query, key and value (the paper), once with DiT's adaLN-Zero modulation instead
(``time_conditioning="adaln"``). adaLN has 3 d^2 more weights per block than TMSA's time
projections, so that arm uses MLP ratio 2.5 instead of 4, which removes as many: the two
parameter counts differ by 0.2%. Scored with the offline digits metrics.

    python -m experiments.time_conditioning            # 2 arms x 2 seeds, 800 steps (CPU)
    python -m experiments.time_conditioning --quick    # CI smoke run

Writes ``<results_dir>/time_conditioning.json`` / ``.csv`` and ``time_conditioning.png``.
"""

from __future__ import annotations

from .common import arm_arguments, compare_arms

DIFFIT_DIGITS = dict(
    _class_name="DiffiTTransformer2DModel",
    patch_size=2,
    hidden_size=128,
    num_layers=4,
    num_attention_heads=4,
)
ARMS = {
    "tmsa": dict(DIFFIT_DIGITS, time_conditioning="tmsa"),
    "adaln-zero (mlp ratio 2.5)": dict(DIFFIT_DIGITS, time_conditioning="adaln", mlp_ratio=2.5),
}


def main(argv=None) -> dict:
    args = arm_arguments(__doc__.split("\n\n")[0], list(ARMS), "time_conditioning", argv)
    return compare_arms(ARMS, args, "time_conditioning")


if __name__ == "__main__":
    main()

"""Experiment 3 (MDiT paper section 3.4 and 5.4, appendix H): variance matching.

The demo's MDiT {1, 1, 2, 4} trains on the digits with the variance-matching regulariser of
eq. 2 at lambda_VAR in {0, 0.02, 0.05, 0.1} (``--variance_matching_weight``), everything else
identical. For each lambda: the per-sample per-channel variance (over pixels) of generated
samples against that of the real digits (histograms, and the Wasserstein-1 distance between the
two distributions), and the change of sample quality (the offline digits metrics).

    python -m experiments.variance_matching            # 4 lambdas x 2 seeds, 800 steps (CPU)
    python -m experiments.variance_matching --quick    # CI smoke run

Writes ``<results_dir>/variance_matching.json`` / ``.csv`` and ``variance_matching.png``.
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import torch

from .common import (
    MDIT_DIGITS,
    Recipe,
    add_run_arguments,
    recipe_dict,
    sample_classes,
    train_in_stages,
    write_rows,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=800)
    add_run_arguments(parser, "variance_matching")
    args = parser.parse_args(argv)
    if args.quick:
        args.weights, args.seeds, args.steps = [0.0, 0.1], [0], 2
        args.samples_per_class, args.num_inference_steps = 2, 2
    return args


def sample_variances(images: torch.Tensor) -> np.ndarray:
    """Per-sample per-channel variance over pixels (eq. 2's ``var_c``), flattened."""
    return images.float().var(dim=(-2, -1)).flatten().numpy()


def wasserstein_1(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(a, b))


def real_variances(resolution: int) -> np.ndarray:
    from diffusers_mdit.data import DigitsDataset

    # The digits are grey, repeated to 3 channels: one channel carries all the information.
    return sample_variances(DigitsDataset(resolution=resolution, channels=1).images)


def plot(real: np.ndarray, generated: dict[float, np.ndarray], path: str) -> None:
    from diffusers_mdit.explain.common import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(1, len(generated), figsize=(4 * len(generated), 3.2), sharey=True)
    axes = np.atleast_1d(axes)
    bins = np.linspace(0, max(real.max(), max(g.max() for g in generated.values())), 40)
    for axis, (weight, values) in zip(axes, generated.items(), strict=True):
        axis.hist(real, bins=bins, density=True, alpha=0.5, label="real digits")
        axis.hist(values, bins=bins, density=True, alpha=0.5, label="generated")
        axis.set(title=f"lambda_VAR = {weight}", xlabel="per-sample channel variance")
        axis.legend()
    axes[0].set_ylabel("density")
    save_figure(figure, path)


def main(argv=None) -> dict:
    from .common import digits_quality

    args = parse_args(argv)
    recipe = Recipe()
    real = real_variances(recipe.resolution)
    rows, pooled = [], {}
    for weight in args.weights:
        pooled[weight] = []
        for seed in args.seeds:
            folder = os.path.join(args.output_dir, f"lambda{weight}", f"seed{seed}")
            extra = {"variance_matching_weight": weight}
            train_in_stages(folder, MDIT_DIGITS, [args.steps], seed, recipe, lambda _: {}, extra)
            images, labels = sample_classes(
                folder, args.samples_per_class, args.num_inference_steps, args.guidance_scale, 0
            )
            # Channel 0: the model generates grey digits on 3 identical channels.
            variances = sample_variances(images[:, :1])
            pooled[weight].append(variances)
            rows.append(
                {
                    "lambda_var": weight,
                    "seed": seed,
                    "mean_variance": float(variances.mean()),
                    "w1_to_real": wasserstein_1(variances, real),
                    **digits_quality(images, labels),
                }
            )
    pooled = {w: np.concatenate(v) for w, v in pooled.items()}
    os.makedirs(args.results_dir, exist_ok=True)
    write_rows(rows, os.path.join(args.results_dir, "variance_matching.csv"))
    result = {
        "recipe": recipe_dict(recipe),
        "arguments": vars(args),
        "real_mean_variance": float(real.mean()),
        "rows": rows,
    }
    write_rows(result, os.path.join(args.results_dir, "variance_matching.json"))
    plot(real, pooled, os.path.join(args.results_dir, "variance_matching.png"))

    print(f"real digits: mean per-sample variance {real.mean():.4f}")
    header = f"{'lambda':>7} {'mean var':>9} {'W1 to real':>11} {'FD':>8} {'accuracy':>9}"
    print(header + "  (mean+-std over seeds)")
    for weight in args.weights:
        mine = [r for r in rows if r["lambda_var"] == weight]

        def spread(key, scale=1.0, mine=mine):
            values = [scale * r[key] for r in mine]
            if len(values) == 1:
                return f"{values[0]:.3f}"
            return f"{statistics.mean(values):.3f}+-{statistics.stdev(values):.3f}"

        print(
            f"{weight:>7} {spread('mean_variance'):>9} {spread('w1_to_real'):>11} "
            f"{spread('fd'):>8} {spread('accuracy', 100):>9}"
        )
    return result


if __name__ == "__main__":
    main()

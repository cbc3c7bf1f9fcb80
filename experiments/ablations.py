"""Experiment 2 (MDiT paper section 5.2, table 2, at small scale): architecture ablations.

The demo's MDiT {1, 1, 2, 4} against the same model without its outer level ({0, 0, 2, L}) and
without its aggregate blocks ({1, 1, 0, L}), each with the core depth ``L`` whose parameter
count is closest to the full model's, trained with the identical recipe on the digits and
scored with the offline digits metrics (classifier FD, conditional accuracy).

Table 2's other rows need switches the model does not offer: MDiT's position encoding is
partial-head RoPE only (no sinusoidal option), and the class always enters the core blocks by
cross-attention (no modulation-only variant); those rows are not run.

    python experiments/ablations.py            # 3 arms x 2 seeds, 800 steps (CPU)
    python experiments/ablations.py --quick    # CI smoke run

Writes ``<results_dir>/ablations.json`` / ``.csv`` and ``ablations.png``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    MDIT_DIGITS,
    Recipe,
    recipe_dict,
    sample_classes,
    train_in_stages,
    training_flops_per_step,
    write_rows,
)

# Parameters with 10 classes and 3 channels (measured with diffusers_mdit.profiling):
# full 2.36M; no outer, L = 5: 2.51M (+6%; L = 4 is 2.20M, -7%); no aggregate, L = 7: 2.41M
# (+2%).
ARMS = {
    "mdit {1,1,2,4}": MDIT_DIGITS,
    "no outer level {0,0,2,5}": dict(
        MDIT_DIGITS, num_outer_in_blocks=0, num_outer_out_blocks=0, num_core_blocks=5
    ),
    "no aggregate blocks {1,1,0,7}": dict(MDIT_DIGITS, num_alternating_blocks=0, num_core_blocks=7),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--samples_per_class", type=int, default=20)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument("--output_dir", default="outputs/experiments/ablations")
    parser.add_argument("--results_dir", default="experiments/results")
    parser.add_argument("--quick", action="store_true", help="tiny runs for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps = [0], 2
        args.samples_per_class, args.num_inference_steps = 2, 2
    return args


def parameter_count(config: dict, recipe: Recipe) -> int:
    from diffusers_mdit.profiling import config_cost

    extra = dict(sample_size=recipe.resolution, in_channels=3, out_channels=3, num_classes=10)
    return config_cost(dict(config, **extra), recipe.resolution, recipe.resolution).parameters


def folder_name(arm: str) -> str:
    return arm.split(" {")[0].replace(" ", "_")


def summarise(rows: list[dict], arms: list[str]) -> list[dict]:
    """Mean and (sample) standard deviation over seeds of FD and accuracy per arm."""
    summary = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        entry = {"arm": arm, "parameters": mine[0]["parameters"], "seeds": len(mine)}
        for key in ("fd", "accuracy"):
            values = [r[key] for r in mine]
            entry[f"{key}_mean"] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def plot(summary: list[dict], rows: list[dict], path: str) -> None:
    from diffusers_mdit.explain.common import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    names = [s["arm"] for s in summary]
    for axis, key, label in ((axes[0], "fd", "classifier FD (lower is better)"),
                             (axes[1], "accuracy", "conditional accuracy")):  # fmt: skip
        means = [s[f"{key}_mean"] for s in summary]
        stds = [s[f"{key}_std"] for s in summary]
        axis.bar(range(len(names)), means, yerr=stds, capsize=4, color="tab:blue", alpha=0.7)
        for i, name in enumerate(names):
            seeds = [r[key] for r in rows if r["arm"] == name]
            axis.scatter([i] * len(seeds), seeds, color="black", s=12, zorder=3)
        axis.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
        axis.set_title(label)
    save_figure(figure, path)


def main(argv=None) -> dict:
    from common import digits_quality

    args = parse_args(argv)
    recipe = Recipe()
    rows = []
    for arm in args.arms:
        config = ARMS[arm]
        for seed in args.seeds:
            folder = os.path.join(args.output_dir, folder_name(arm), f"seed{seed}")
            train_in_stages(folder, config, [args.steps], seed, recipe, lambda _: {})
            images, labels = sample_classes(
                folder, args.samples_per_class, args.num_inference_steps, args.guidance_scale, 0
            )
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "parameters": parameter_count(config, recipe),
                    "train_gflops_per_step": training_flops_per_step(config, recipe) / 1e9,
                    **digits_quality(images, labels),
                }
            )
    summary = summarise(rows, args.arms)
    os.makedirs(args.results_dir, exist_ok=True)
    write_rows(rows, os.path.join(args.results_dir, "ablations.csv"))
    result = {"recipe": recipe_dict(recipe), "arguments": vars(args), "rows": rows,
              "summary": summary}  # fmt: skip
    write_rows(result, os.path.join(args.results_dir, "ablations.json"))
    plot(summary, rows, os.path.join(args.results_dir, "ablations.png"))

    print(f"{'arm':>32} {'params':>7} {'FD':>14} {'accuracy %':>14}  (mean+-std over seeds)")
    for s in summary:
        print(
            f"{s['arm']:>32} {s['parameters'] / 1e6:6.2f}M {s['fd_mean']:7.2f}+-{s['fd_std']:<5.2f}"
            f" {100 * s['accuracy_mean']:7.1f}+-{100 * s['accuracy_std']:<5.1f}"
        )
    return result


if __name__ == "__main__":
    main()

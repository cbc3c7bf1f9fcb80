"""Experiment 1 (MDiT paper section 5.1, figure 6): does MDiT converge faster than the DiT
analog {0, 0, 0, L} at matched parameters and an identical recipe?

Both arms train on the built-in digits at 16x16 with the demo's recipe (x0 objective with
Min-SNR-5, AdamW lr 2e-3, batch 64, EMA 0.995) and are scored after each stage: samples per
digit (DDIM, guidance 2) -> the offline digits metrics (Frechet distance in the digits
classifier's feature space, conditional accuracy). Speedup = the steps (or training FLOPs) the
DiT analog needs to first reach its final Frechet distance, divided by those MDiT needs to
reach the same value (no interpolation: the first scored stage at or below it). Several seeds;
the spread is over seeds.

    python -m experiments.convergence                 # 3 seeds, stages up to 1200 steps (CPU)
    python -m experiments.convergence --quick         # CI smoke run (tiny stages)
    python -m experiments.convergence --seeds 0 1 2 3 4 --stages 250 500 1000 2000 4000
    # any labelled imagefolder (class sub-folders or metadata.jsonl labels) instead of the digits:
    python -m experiments.convergence --train_data_dir path/to/images --resolution 32

With ``--train_data_dir`` both arms train on that folder at ``--resolution`` (the same model
configs: a larger resolution gives a larger core token grid) and are scored with the same
offline metrics against it, the classifier trained on its images
(``diffusers_mdit.evaluation``; its held-out accuracy is printed and saved). Its runs and
results go to ``outputs/experiments/convergence_<folder name>_<resolution>`` (and ``results/``
in it) unless ``--output_dir`` / ``--results_dir`` say otherwise.

Writes ``<results_dir>/convergence.json`` (every stage of every run), ``convergence.csv`` and
``convergence.png`` (quality vs steps and vs training FLOPs, log-log); training runs live in
``--output_dir`` and a stopped experiment resumes where it was.
"""

from __future__ import annotations

import argparse
import os

import torch

from .common import (
    DIT_DIGITS,
    MDIT_DIGITS,
    Recipe,
    add_run_arguments,
    recipe_dict,
    sample_classes,
    train_in_stages,
    training_flops_per_step,
    training_state_step,
    write_rows,
)

ARMS = {"MDiT {1,1,2,4}": MDIT_DIGITS, "DiT analog {0,0,0,7}": DIT_DIGITS}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stages", type=int, nargs="+", default=[100, 200, 400, 800, 1200])
    parser.add_argument(
        "--train_data_dir",
        default=None,
        help="a labelled imagefolder to train and score on instead of the built-in digits",
    )
    parser.add_argument(
        "--resolution", type=int, default=16, help="training and sampling size (pixels)"
    )
    parser.add_argument("--batch_size", type=int, default=Recipe.batch_size)
    add_run_arguments(parser, "convergence")
    args = parser.parse_args(argv)
    if args.resolution % 4:
        parser.error(f"--resolution {args.resolution} must be a multiple of 4 (the core patch)")
    if args.train_data_dir:  # never reuse the digits runs or overwrite the digits results
        name = os.path.basename(os.path.normpath(args.train_data_dir))
        for key in ("output_dir", "results_dir"):
            if getattr(args, key) == parser.get_default(key):
                folder = f"outputs/experiments/convergence_{name}_{args.resolution}"
                setattr(args, key, folder if key == "output_dir" else f"{folder}/results")
    if args.quick:
        args.seeds, args.stages = [0], [2, 4]
        args.samples_per_class, args.num_inference_steps = 2, 2
    return args


def make_scorer(args, num_classes: int = 10):
    """Score a stage by sampling it: the samples are kept (``samples-<step>.pt`` beside the
    run) so every metric can be recomputed later without sampling again."""

    def score(pipeline_dir: str) -> dict:
        images, labels = sample_classes(
            pipeline_dir,
            args.samples_per_class,
            args.num_inference_steps,
            args.guidance_scale,
            0,
            num_classes,
        )
        step = training_state_step(pipeline_dir)
        path = os.path.join(pipeline_dir, f"samples-{step:06d}.pt")
        torch.save({"images": images, "labels": torch.as_tensor(labels)}, path)
        return {"samples": os.path.basename(path)}

    return score


def add_metrics(folder: str, records: list[dict], metric) -> None:
    for record in records:
        saved = torch.load(os.path.join(folder, record["samples"]))
        record.update(metric(saved["images"], saved["labels"].numpy()))


def first_reaching(records: list[dict], target: float, key: str = "fd") -> dict | None:
    """The first stage whose ``key`` is at or below ``target``."""
    return next((r for r in records if r[key] <= target), None)


def speedups(runs: dict[str, dict[int, list[dict]]]) -> list[dict]:
    """Per seed: the DiT analog's final FD, the stage where it first reached it, the stage
    where MDiT first reached it, and the step / FLOP ratios (None if MDiT never did)."""
    mdit, dit = list(runs)
    rows = []
    for seed in runs[dit]:
        target = runs[dit][seed][-1]["fd"]
        dit_at = first_reaching(runs[dit][seed], target)
        mdit_at = first_reaching(runs[mdit][seed], target)
        rows.append(
            {
                "seed": seed,
                "dit_final_fd": target,
                "dit_step": dit_at["step"],
                "mdit_step": mdit_at["step"] if mdit_at else None,
                "step_speedup": dit_at["step"] / mdit_at["step"] if mdit_at else None,
                "flop_speedup": dit_at["train_flops"] / mdit_at["train_flops"] if mdit_at else None,
            }
        )
    return rows


def plot(runs, path: str, data: str = "the digits", resolution: int = 16) -> None:
    from diffusers_mdit.explain.common import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (name, seeds), color in zip(runs.items(), ("tab:red", "tab:blue"), strict=False):
        for index, records in enumerate(seeds.values()):
            label = name if index == 0 else None
            steps = [r["step"] for r in records]
            flops = [r["train_flops"] for r in records]
            fd = [r["fd"] for r in records]
            accuracy = [r["accuracy"] for r in records]
            axes[0].loglog(steps, fd, "o-", color=color, alpha=0.7, label=label)
            axes[1].loglog(flops, fd, "o-", color=color, alpha=0.7, label=label)
            axes[2].semilogx(steps, accuracy, "o-", color=color, alpha=0.7, label=label)
    axes[0].set(xlabel="training steps", ylabel="Frechet distance (classifier features)")
    axes[1].set(xlabel="training FLOPs", ylabel="Frechet distance (classifier features)")
    axes[2].set(xlabel="training steps", ylabel="conditional accuracy")
    for axis in axes:
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    figure.suptitle(f"Convergence on {data} ({resolution}x{resolution}), one line per seed")
    figure.subplots_adjust(wspace=0.3)
    save_figure(figure, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    recipe = Recipe(resolution=args.resolution, batch_size=args.batch_size)
    data = "the digits"
    if args.train_data_dir:
        from .common import FolderQuality

        data = args.train_data_dir
        quality = FolderQuality(data, args.resolution)
        extra_flags = {"train_data_dir": data}
        num_classes = quality.num_classes
        print(
            f"{data}: {len(quality.reference.labels)} images, {num_classes} classes; reference "
            f"classifier held-out accuracy {quality.classifier.heldout_accuracy:.3f}"
        )
    else:
        from .common import digits_quality as quality

        extra_flags, num_classes = {}, 10
    score = make_scorer(args, num_classes)
    runs: dict[str, dict[int, list[dict]]] = {}
    for name, config in ARMS.items():
        flops = training_flops_per_step(config, recipe, num_classes)
        print(f"{name}: {flops / 1e9:.2f} GFLOPs per training step (batch {recipe.batch_size})")
        runs[name] = {}
        for seed in args.seeds:
            folder = os.path.join(args.output_dir, name.split()[0].lower(), f"seed{seed}")
            records = train_in_stages(folder, config, args.stages, seed, recipe, score, extra_flags)
            for record in records:
                record["train_flops"] = record["step"] * flops
            runs[name][seed] = (folder, records)

    # Scored after all training, from the kept samples.
    for seeds in runs.values():
        for seed, (folder, records) in seeds.items():
            add_metrics(folder, records, quality)
            seeds[seed] = records

    rows = [
        {"arm": name, "seed": seed, **record}
        for name, seeds in runs.items()
        for seed, records in seeds.items()
        for record in records
    ]
    ratios = speedups(runs)
    os.makedirs(args.results_dir, exist_ok=True)
    write_rows(rows, os.path.join(args.results_dir, "convergence.csv"))
    result = {"recipe": recipe_dict(recipe), "arguments": vars(args), "rows": rows}
    result["speedups"] = ratios
    if args.train_data_dir:
        result["classifier_heldout_accuracy"] = quality.classifier.heldout_accuracy
    write_rows(result, os.path.join(args.results_dir, "convergence.json"))
    plot(runs, os.path.join(args.results_dir, "convergence.png"), data, args.resolution)

    print(f"\n{'arm':<22} {'step':>6} " + " ".join(f"{'seed ' + str(s):>16}" for s in args.seeds))
    for name, seeds in runs.items():
        for index, step in enumerate(args.stages):
            cells = [
                f"{seeds[s][index]['fd']:>7.2f} {100 * seeds[s][index]['accuracy']:>6.1f}%"
                for s in args.seeds
            ]
            print(f"{name:<22} {step:>6} " + " ".join(f"{c:>16}" for c in cells))
    print("(cells: Frechet distance in the reference classifier's features, conditional accuracy)")
    for row in ratios:
        if row["mdit_step"] is None:
            reached = "MDiT never reached it (no speedup: below 1)"
        else:
            reached = (
                f"MDiT reached it at step {row['mdit_step']}: speedup "
                f"{row['step_speedup']:.2f}x in steps, {row['flop_speedup']:.2f}x in FLOPs"
            )
        print(
            f"seed {row['seed']}: DiT final FD {row['dit_final_fd']:.2f}, first reached at "
            f"step {row['dit_step']}; {reached}"
        )
    reached = sorted(r["step_speedup"] for r in ratios if r["step_speedup"] is not None)
    print(
        f"step speedup over {len(ratios)} seeds: {', '.join(f'{v:.2f}' for v in reached)}"
        f"{' and ' if reached else ''}{len(ratios) - len(reached)} not reached"
    )
    return result


if __name__ == "__main__":
    main()

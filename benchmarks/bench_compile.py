"""What ``--torch_compile`` gives the training step on this machine.

Builds one training run (``diffusers_mdit.training.trainer.setup``: the demo's digits MDiT by
default, or a preset) twice, eager and with ``torch.compile``, and times the trainer's own
``train_step`` on the same batches, interleaved, after the compiled run has compiled. Prints
the compile time and the eager / compiled step-time ratio.

    python benchmarks/bench_compile.py                      # demo model, batch 64, 16x16
    python benchmarks/bench_compile.py --preset MDiT-S --resolution 32 --batch_size 8
    python benchmarks/bench_compile.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from diffusers_mdit.profiling import cpu_name


def main() -> None:
    from diffusers_mdit.demo import DIGITS_MODEL_CONFIG
    from diffusers_mdit.testing import TINY_MDIT
    from diffusers_mdit.training import TrainingConfig
    from diffusers_mdit.training.loader import training_loader
    from diffusers_mdit.training.trainer import setup, train_step

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=None, help="default: the demo's digits model")
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    model = TINY_MDIT if args.quick else DIGITS_MODEL_CONFIG
    if args.quick:
        args.resolution, args.batch_size, args.repeats = 8, 4, 2
    print("torch.compile benchmark (the trainer's train_step)")
    print(f"  {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32")
    with tempfile.TemporaryDirectory() as tmp:
        config_path = os.path.join(tmp, "model.json")
        with open(config_path, "w") as f:
            json.dump(model, f)
        base = TrainingConfig(
            output_dir=tmp, resolution=args.resolution, train_batch_size=args.batch_size,
            report_to="none", **({"preset": args.preset} if args.preset else
                                 {"model_config": config_path}),
        )  # fmt: skip
        runs = {name: setup(base.replace(torch_compile=name == "compiled"))
                for name in ("eager", "compiled")}  # fmt: skip
        size = f"{args.resolution}x{args.resolution}"
        print(f"  model {args.preset or 'demo digits MDiT'}, batch {args.batch_size}, {size}, "
              f"{args.repeats} interleaved repeats")  # fmt: skip
        steps = args.repeats + 3
        batches = {
            name: iter(training_loader(run.dataset, run.global_batch, 0, 0, steps, run.share))
            for name, run in runs.items()
        }
        start = time.perf_counter()
        train_step(runs["compiled"], 0, batches["compiled"], None)
        compile_seconds = time.perf_counter() - start
        train_step(runs["eager"], 0, batches["eager"], None)
        for name in runs:  # one more warm step each (the compiled graph's second call)
            train_step(runs[name], 1, batches[name], None)
        times = {name: [] for name in runs}
        for step in range(2, steps - 1):
            for name, run in runs.items():
                begin = time.perf_counter()
                train_step(run, step, batches[name], None)
                times[name].append(time.perf_counter() - begin)
    eager, compiled = (statistics.median(times[n]) for n in ("eager", "compiled"))
    print(f"\nfirst compiled step (compiling): {compile_seconds:.1f} s")
    print(f"median step: eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms")
    print(f"eager / compiled step time: {eager / compiled:.2f}x")


if __name__ == "__main__":
    main()

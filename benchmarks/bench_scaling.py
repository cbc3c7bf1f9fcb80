"""Forward cost vs resolution: MDiT-B with global core attention, MDiT-B with neighborhood core
attention, and the DiT analog, measured side by side in one run.

For latents of 32, 64, 96 and 128 per side (batch 1), prints the forward seconds (median of
interleaved repeats) and the FLOPs counted on the meta device, and fits the exponent ``a`` of
``cost ~ N^a`` (least squares in log-log) with ``N`` the number of latent pixels. The MDiT paper
(appendix B, figure 13) reports O(N) for MDiT with neighborhood attention; global attention
tends to O(N^2) once attention dominates.

    python benchmarks/bench_scaling.py                   # CPU: ~6 min
    python benchmarks/bench_scaling.py --quick           # CI smoke run (tiny models, 8 and 16)
    python benchmarks/bench_scaling.py --device cuda --sizes 32 64 128 256

Neighborhood attention here is MDiT's core and aggregate blocks switched to a k x k window
(``set_core_attention("neighborhood", kernel_size)``, k=15 as in the paper's fine-tuning
experiments); the outer blocks always use k=7.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from diffusers_mdit import MDiTTransformer2DModel
from diffusers_mdit.profiling import forward_flops


def builders(preset_mdit: str, preset_dit: str, kernel_size: int, **extra):
    def neighborhood():
        model = MDiTTransformer2DModel.from_preset(preset_mdit, **extra)
        model.set_core_attention("neighborhood", kernel_size)
        return model

    return {
        f"{preset_mdit} global core": lambda: MDiTTransformer2DModel.from_preset(
            preset_mdit, **extra
        ),
        f"{preset_mdit} NA core k={kernel_size}": neighborhood,
        f"{preset_dit} analog": lambda: MDiTTransformer2DModel.from_preset(preset_dit, **extra),
    }


def inputs(size: int, device) -> tuple:
    latents = torch.randn(1, 4, size, size, device=device)
    return latents, torch.tensor([500], device=device), torch.tensor([1], device=device)


def count(build, size: int) -> int:
    with torch.device("meta"):
        model = build()
        latents, timestep, labels = inputs(size, "meta")
        return forward_flops(model, latents, timestep, class_labels=labels)


def exponent(tokens: list[int], costs: list[float]) -> float:
    """Least-squares slope of log(cost) against log(tokens)."""
    return float(np.polyfit(np.log(tokens), np.log(costs), 1)[0])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kernel_size", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="MDiT-S / DiT-S at 8 and 16")
    args = parser.parse_args(argv)
    presets = ("MDiT-B", "DiT-B")
    if args.quick:
        presets, args.sizes, args.repeats, args.kernel_size = ("MDiT-S", "DiT-S"), [8, 16], 1, 3
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"config: batch 1, latents 4xSxS for S in {args.sizes}, {args.repeats} interleaved "
        f"repeats (median), device {device}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    torch.manual_seed(0)
    build = builders(*presets, args.kernel_size)
    models = {name: b().to(device).eval() for name, b in build.items()}
    flops = {name: [count(b, s) for s in args.sizes] for name, b in build.items()}
    times = {name: {s: [] for s in args.sizes} for name in models}

    @torch.no_grad()
    def run(name, size):
        batch = inputs(size, device)
        sync(device)
        start = time.perf_counter()
        models[name](batch[0], batch[1], class_labels=batch[2])
        sync(device)
        return time.perf_counter() - start

    for name in models:  # warm-up (and the RoPE tables of every size)
        for size in args.sizes:
            run(name, size)
    for _ in range(args.repeats):
        for size in args.sizes:
            for name in models:
                times[name][size].append(run(name, size))

    tokens = [s * s for s in args.sizes]
    result = {"sizes": args.sizes, "models": {}}
    header = " ".join(f"{f'{s}x{s}':>16}" for s in args.sizes)
    print(f"\n{'model':<26} {header}  exponent (time / FLOPs)")
    for name in models:
        seconds = [statistics.median(times[name][s]) for s in args.sizes]
        cells = " ".join(
            f"{t:>7.3f}s {f / 1e9:>6.1f}G" for t, f in zip(seconds, flops[name], strict=True)
        )
        time_exponent = exponent(tokens, seconds)
        flop_exponent = exponent(tokens, flops[name])
        print(f"{name:<26} {cells}  {time_exponent:.2f} / {flop_exponent:.2f}")
        result["models"][name] = dict(
            seconds=seconds,
            flops=flops[name],
            time_exponent=time_exponent,
            flop_exponent=flop_exponent,
        )
    print("(cells: forward seconds, forward GFLOPs; exponent a of cost ~ N^a, N = latent pixels)")
    names = list(models)
    largest = args.sizes[-1]
    for name in names[1:]:
        ratio = result["models"][name]["seconds"][-1] / result["models"][names[0]]["seconds"][-1]
        print(f"{name} / {names[0]} at {largest}x{largest}: time {ratio:.2f}x")
    na = result["models"][names[1]]
    gap = na["time_exponent"] - 1.15
    verdict = "met" if gap <= 0 else f"missed by {gap:.2f}"
    print(
        f"target: {names[1]} time exponent <= 1.15 between {args.sizes[0]} and {largest}: "
        f"{na['time_exponent']:.2f} ({verdict}); FLOP exponent {na['flop_exponent']:.2f}"
    )
    return result


if __name__ == "__main__":
    main()

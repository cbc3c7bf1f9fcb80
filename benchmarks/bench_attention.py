"""Benchmark 2-D neighborhood attention: global SDPA vs ours ("torch" backend) vs NATTEN.

Times are medians over interleaved repeats (every method and mode runs once per round, so
machine noise hits all of them alike). "fwd" runs under ``torch.no_grad()``; "fwd+bwd" runs the
forward with autograd and a backward with a fixed random output gradient. NATTEN on CPU has no
backward (only an unfused Flex Attention forward), so only its forward is timed there, and only
up to ``--natten-max-size``.

    python benchmarks/bench_attention.py             # B=8, 6 heads x 64, k=7, 16/32/64 grids
    python benchmarks/bench_attention.py --quick     # CI smoke run, a few seconds
    python benchmarks/bench_attention.py --device cuda --sizes 32 64 128
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffusers_mdit.models.neighborhood_attention import neighborhood_attention, resolve_backend

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def global_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, h, w, heads, d = q.shape

    def tokens(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, h * w, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(tokens(q), tokens(k), tokens(v))
    return out.transpose(1, 2).reshape(b, h, w, heads, d)


def natten_importable() -> bool:
    try:
        import natten  # noqa: F401
    except Exception:
        return False
    return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(
    fn: Attention, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor, backward: bool
) -> float:
    device = grad.device
    if backward:
        q, k, v = (t.detach().requires_grad_() for t in inputs)
        sync(device)
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        sync(device)
    else:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            fn(*inputs)
        sync(device)
    return (time.perf_counter() - start) * 1e3


Times = dict[tuple[str, bool], list[float]]


def cell(times: Times, name: str, backward: bool, width: int) -> str:
    values = times.get((name, backward))
    return f"{statistics.median(values):{width}.1f}" if values else f"{'-':>{width}}"


def ratio(times: Times, backward: bool, width: int) -> str:
    g, o = times[("global", backward)], times[("ours", backward)]
    return f"{statistics.median(g) / statistics.median(o):{width}.2f}x"


def max_abs_diff(
    size: int, kernel: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> tuple[float, float] | None:
    """Ours vs the reference backend on one batch element: (output, gradients) max |diff|."""
    keys_bytes = 2 * heads * size * size * kernel * kernel * head_dim * dtype.itemsize
    if keys_bytes > 1 << 30:  # the reference gathers every window; skip what would not fit
        return None
    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, size, size, heads, head_dim)
    inputs = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3)]
    grad = torch.randn(shape, generator=gen).to(device, dtype)
    results = []
    for backend in ("torch", "reference"):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = neighborhood_attention(q, k, v, kernel, backend=backend)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    ours, ref = results
    out_diff = (ours[0] - ref[0]).abs().max().item()
    grad_diff = max((a - b).abs().max().item() for a, b in zip(ours[1:], ref[1:], strict=True))
    return out_diff, grad_diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny CI smoke run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64], help="grid H = W")
    parser.add_argument("--kernels", type=int, nargs="+", default=[7])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (0: leave as is)")
    parser.add_argument(
        "--natten-max-size",
        type=int,
        default=None,
        help="largest grid to time NATTEN on (default: 32 on CPU, where it is slow; all on GPU)",
    )
    parser.add_argument("--no-natten", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.heads, args.head_dim = 2, 2, 32
        args.sizes, args.kernels, args.repeats, args.warmup = [12, 24], [5], 2, 1

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    use_natten = not args.no_natten and natten_importable()
    natten_bwd = device.type == "cuda"  # NATTEN's CPU path has no backward
    natten_max = args.natten_max_size or (32 if device.type == "cpu" else max(args.sizes))
    # CPU flex_attention is unfused (full score matrices) and forward-only: small grids only.
    flex_max = 32 if device.type == "cpu" else max(args.sizes)
    warnings.filterwarnings("ignore", module=r"(natten|torch\.nn\.attention)")

    print("neighborhood attention benchmark")
    print(f"  torch {torch.__version__}, python {platform.python_version()}, device {device}")
    if device.type == "cpu":
        print(
            f"  CPU threads {torch.get_num_threads()}, "
            f"capability {torch.backends.cpu.get_cpu_capability()}, {platform.machine()}"
        )
    else:
        print(f"  GPU {torch.cuda.get_device_name(device)}")
    if use_natten:
        import natten

        print(f"  natten {natten.__version__}, HAS_LIBNATTEN={natten.HAS_LIBNATTEN}")
    else:
        print("  natten: not used (not importable or --no-natten)")
    print(
        f"  batch {args.batch}, heads {args.heads} x {args.head_dim}, {args.dtype}, "
        f"repeats {args.repeats} (+{args.warmup} warmup), median ms"
    )
    print(f"  'ours' = backend 'torch'; auto backend here: {resolve_backend(device)!r}")
    print()

    header = (
        f"{'grid':>7} {'k':>3} | {'global fwd':>10} {'f+b':>8} | {'ours fwd':>9} {'f+b':>8} | "
        f"{'natten fwd':>10} {'f+b':>8} | {'flex fwd':>9} {'f+b':>8} | "
        f"{'glob/ours fwd':>13} {'f+b':>6} | "
        f"{'max|diff| out':>13} {'grad':>8}"
    )
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        for kernel in args.kernels:
            gen = torch.Generator(device="cpu").manual_seed(size)
            shape = (args.batch, size, size, args.heads, args.head_dim)
            inputs = tuple(torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
            grad = torch.randn(shape, generator=gen).to(device, dtype)

            methods: dict[str, tuple[Attention, tuple[bool, ...]]] = {
                "global": (global_attention, (False, True)),
                "ours": (
                    lambda q, k, v, kernel=kernel: neighborhood_attention(
                        q, k, v, kernel, backend="torch"
                    ),
                    (False, True),
                ),
            }
            if use_natten and size <= natten_max and kernel <= size:
                methods["natten"] = (
                    lambda q, k, v, kernel=kernel: neighborhood_attention(
                        q, k, v, kernel, backend="natten"
                    ),
                    (False, True) if natten_bwd else (False,),
                )
            if size <= flex_max and kernel <= size:
                methods["flex"] = (
                    lambda q, k, v, kernel=kernel: neighborhood_attention(
                        q, k, v, kernel, backend="flex"
                    ),
                    (False, True) if device.type == "cuda" else (False,),
                )
            times: Times = {}
            for round_ in range(args.warmup + args.repeats):
                for name, (fn, modes) in methods.items():
                    for backward in modes:
                        ms = time_once(fn, inputs, grad, backward)
                        if round_ >= args.warmup:
                            times.setdefault((name, backward), []).append(ms)

            diffs = max_abs_diff(size, kernel, args.heads, args.head_dim, dtype, device)
            diff_cells = (
                f"{diffs[0]:13.1e} {diffs[1]:8.1e}" if diffs else f"{'skipped':>13} {'':>8}"
            )
            print(
                f"{size:>3}x{size:<3} {kernel:>3} | {cell(times, 'global', False, 10)} "
                f"{cell(times, 'global', True, 8)} | {cell(times, 'ours', False, 9)} "
                f"{cell(times, 'ours', True, 8)} | {cell(times, 'natten', False, 10)} "
                f"{cell(times, 'natten', True, 8)} | {cell(times, 'flex', False, 9)} "
                f"{cell(times, 'flex', True, 8)} | {ratio(times, False, 12)} "
                f"{ratio(times, True, 5)} | {diff_cells}",
                flush=True,
            )
    print()
    print("max|diff|: ours vs the reference backend (batch 1; output, then q/k/v gradients).")


if __name__ == "__main__":
    main()

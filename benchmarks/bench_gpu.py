"""One prepared GPU benchmark (under 8 minutes on one H200): MDiT-B vs the original DiT-B/2.

Measures, on ``--device`` (default ``cuda``):

1. the training step of MDiT-B and DiT-B/2 (bf16 autocast, AdamW, ``--batch_size`` 32 per GPU,
   4x32x32 latents, 1000 classes), eager and under ``torch.compile``: milliseconds per step,
   images per second, achieved TFLOP/s (3x the forward FLOPs counted on the meta device), peak
   memory;
2. the neighborhood-attention backends on MDiT-B's outer-level shape (6 heads x 64, k=7,
   float32 as in the models), forward and forward+backward, at 32x32, 64x64 and 128x128
   tokens: ours (``torch``), ``flex`` (Flex Attention, compiled), NATTEN (when importable) and
   global SDPA;
3. 50-step sampling latency (DDIM, guidance 4, batch 8) of ``MDiTPipeline`` (MDiT-B) and the
   DiT pipeline (DiT-B/2).

Bringing it to a GPU machine that has torch but no network and no diffusers: download the
pure-Python wheels here and install them there without dependencies::

    pip download --no-deps -d wheels diffusers==0.42.1
    # on the GPU machine, from the repository root:
    pip install --no-deps wheels/*.whl
    PYTHONPATH=src python benchmarks/bench_gpu.py

diffusers needs huggingface_hub, safetensors, filelock, regex, requests, Pillow and numpy,
which a machine with transformers already has; download them too (``pip download --no-deps
huggingface_hub safetensors``) where it does not. NATTEN is optional (its column is skipped
when it cannot be imported). ``--device cpu --quick`` is the smoke test the tests run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def build(preset: str, device: torch.device):
    from diffusers_mdit import from_preset
    from diffusers_mdit.testing import randomize

    return randomize(from_preset(preset), seed=0).to(device)


def forward_flops(preset: str, size: int) -> float:
    from diffusers_mdit.profiling import preset_cost

    return preset_cost(preset, size, size).flops


def make_step(model, optimizer, batch, device: torch.device, dtype):
    """One training step of ``model`` on ``batch`` ``(x, t, y)`` (x0 target = the input)."""
    x, t, y = batch

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x, t, class_labels=y).sample
        (out.float() - x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_attention(name: str, inputs, kernel: int, backward: bool):
    """``name``'s attention on ``inputs`` ``(q, k, v)``, forward (no grad) or with backward."""
    from diffusers_mdit.models.neighborhood_attention import neighborhood_attention

    q, k, v = inputs
    size = q.shape[1]

    def run(q, k, v):
        if name == "global":  # a window covering the grid is plain global attention (SDPA)
            return neighborhood_attention(q, k, v, size, backend="torch")
        return neighborhood_attention(q, k, v, kernel, backend=name)

    def forward():
        with torch.no_grad():
            run(q, k, v)

    def both():
        run(*(t.detach().requires_grad_() for t in (q, k, v))).sum().backward()

    return both if backward else forward


def training_steps(args, device: torch.device, presets: list[str]) -> None:
    print(f"\n1. training step: batch {args.batch_size}, 4x{args.size}x{args.size}, "
          f"autocast {args.autocast}, AdamW")  # fmt: skip
    print(
        f"{'model':10s} {'mode':8s} {'ms/step':>9s} {'img/s':>9s} {'TFLOP/s':>8s} {'peak GiB':>9s}"
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.autocast]
    results = {}
    for preset in presets:
        modes = ["eager"] + ([] if args.no_compile else ["compile"])
        for mode in modes:
            model = build(preset, device).train()
            runner = torch.compile(model) if mode == "compile" else model
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            gen = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(args.batch_size, 4, args.size, args.size, generator=gen).to(device)
            t = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)
            y = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)

            step = make_step(runner, optimizer, (x, t, y), device, dtype)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = timed(step, device, args.repeats, args.warmup + (2 if mode == "compile" else 0))
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0
            flops = 3 * forward_flops(preset, args.size) * args.batch_size
            results[preset, mode] = ms
            print(f"{preset:10s} {mode:8s} {ms:9.1f} {args.batch_size / ms * 1e3:9.1f} "
                  f"{flops / ms / 1e9:8.1f} {peak:9.2f}")  # fmt: skip
            del model, runner, optimizer, step
    for mode in ("eager", "compile"):
        if (presets[0], mode) in results:
            ratio = results[presets[0], mode] / results[presets[1], mode]
            flop_ratio = forward_flops(presets[0], args.size) / forward_flops(presets[1], args.size)
            print(f"{presets[0]} / {presets[1]} ({mode}): step time {ratio:.2f}x, FLOPs "
                  f"{flop_ratio:.2f}x, achieved FLOP/s ratio {flop_ratio / ratio:.2f}")  # fmt: skip


def attention_backends(args, device: torch.device) -> None:
    try:
        import natten  # noqa: F401

        backends = ["torch", "flex", "natten"]
    except ImportError:
        backends = ["torch", "flex"]
    heads, dim, kernel = 6, 64, 7
    train = device.type == "cuda"  # flex and NATTEN have no backward on CPU
    print(f"\n2. neighborhood attention, batch {args.attention_batch}, {heads} x {dim} heads, "
          f"k={kernel}, float32, median ms (fwd / fwd+bwd)")  # fmt: skip
    print(f"{'grid':>8s} " + " ".join(f"{name:>16s}" for name in [*backends, "global SDPA"]))
    for size in args.grids:
        shape = (args.attention_batch, size, size, heads, dim)
        gen = torch.Generator(device="cpu").manual_seed(size)
        q, k, v = (torch.randn(shape, generator=gen).to(device) for _ in range(3))
        cells = []
        for name in [*backends, "global"]:
            try:
                forward = make_attention(name, (q, k, v), kernel, backward=False)
                fwd = timed(forward, device, args.repeats, args.warmup)
                fb = float("nan")
                if train:
                    both = make_attention(name, (q, k, v), kernel, backward=True)
                    fb = timed(both, device, args.repeats, args.warmup)
                cells.append(f"{fwd:7.2f} / {fb:6.2f}")
            except (RuntimeError, ValueError, torch.OutOfMemoryError) as error:
                cells.append(f"{'failed':>16s}")
                print(f"  {name} at {size}x{size}: {type(error).__name__}: {str(error)[:120]}")
        print(f"{size:>3d}x{size:<4d} " + " ".join(f"{c:>16s}" for c in cells), flush=True)


def sampling(args, device: torch.device, presets: list[str]) -> None:
    from diffusers_mdit import DiTBaselinePipeline, MDiTPipeline
    from diffusers_mdit.testing import ddim_x0

    print(f"\n3. sampling: {args.sampling_steps} DDIM steps, guidance 4, batch "
          f"{args.sampling_batch}, 4x{args.size}x{args.size}, bf16 autocast")  # fmt: skip
    latencies = {}
    for preset, pipeline in zip(presets, (MDiTPipeline, DiTBaselinePipeline), strict=True):
        model = build(preset, device).eval()
        model.register_to_config(sample_size=args.size)
        pipe = pipeline(transformer=model, scheduler=ddim_x0()).to(device)
        pipe.set_progress_bar_config(disable=True)
        labels = list(range(args.sampling_batch))

        def sample(pipe=pipe, labels=labels):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                pipe(class_labels=labels, num_inference_steps=args.sampling_steps,
                     guidance_scale=4.0, output_type="pt")  # fmt: skip

        latencies[preset] = timed(sample, device, max(args.repeats // 3, 1), 1) / 1e3
        print(f"{preset:10s} {latencies[preset]:8.2f} s per batch")
        del pipe, model
    print(f"{presets[0]} / {presets[1]} sampling latency: "
          f"{latencies[presets[0]] / latencies[presets[1]]:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: tiny presets")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="latent height and width")
    parser.add_argument("--autocast", choices=["bf16", "fp16", "none"], default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--attention_batch", type=int, default=8)
    parser.add_argument("--sampling_steps", type=int, default=50)
    parser.add_argument("--sampling_batch", type=int, default=8)
    args = parser.parse_args()
    presets = ["MDiT-B", "DiT-B/2"]
    if args.quick:
        presets = ["MDiT-S", "DiT-S/2"]
        args.batch_size, args.size, args.repeats, args.warmup = 2, 16, 2, 1
        args.grids, args.attention_batch = [8, 16], 1
        args.sampling_steps, args.sampling_batch, args.no_compile = 2, 2, True
    device = torch.device(args.device)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"GPU benchmark on {name}: torch {torch.__version__}, presets {presets}")
    training_steps(args, device, presets)
    attention_backends(args, device)
    sampling(args, device, presets)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""MDiT-B vs diffusers' DiT-B/2 on this machine, measured side by side in one run.

Prints forward and forward+backward seconds per image, model GFLOPs, achieved GFLOP/s, the
fraction of this machine's measured matmul peak, and the MDiT/DiT ratios. FLOPs are counted by
``torch.utils.flop_counter`` on the meta device (matmuls and attention; neighborhood attention
at its ideal k*k cost), forward+backward as counted through autograd.

    python benchmarks/bench_model.py            # batch 8, 5 interleaved repeats (CPU: ~5 min)
    python benchmarks/bench_model.py --quick    # CI smoke run
    python benchmarks/bench_model.py --device cuda --batch_size 64 --autocast bf16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DiTTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from diffusers_mdit import MDiTTransformer2DModel


def build(name: str):
    if name == "MDiT-B":
        return MDiTTransformer2DModel.from_preset("MDiT-B")
    # DiT-B/2 exactly as in the DiT paper (learned sigma: 8 output channels).
    return DiTTransformer2DModel(
        num_attention_heads=12,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=12,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )


def call(model, latents, timestep, labels):
    if isinstance(model, MDiTTransformer2DModel):
        return model(latents, timestep, class_labels=labels).sample
    return model(latents, timestep=timestep, class_labels=labels).sample


def inputs(batch, resolution, device):
    latents = torch.randn(batch, 4, resolution, resolution, device=device)
    timestep = torch.randint(0, 1000, (batch,), device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)
    return latents, timestep, labels


def count_flops(name: str, resolution: int) -> tuple[int, int]:
    """(forward, forward+backward) FLOPs per image, counted on the meta device."""
    with torch.device("meta"):
        model = build(name)
        args = inputs(1, resolution, "meta")
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            call(model, *args)
        forward = counter.get_total_flops()
        counter = FlopCounterMode(display=False)
        with counter:
            call(model, *args).sum().backward()
        train = counter.get_total_flops()
    return forward, train


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, size=2048, repeats=10) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32, help="latent height and width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--quick", action="store_true", help="batch 2, 1 repeat: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.repeats = 2, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    print(
        f"config: batch {args.batch_size}, latent 4x{args.resolution}x{args.resolution}, "
        f"{args.repeats} interleaved repeats (median), device {device}, "
        f"{torch.get_num_threads()} threads, autocast {args.autocast}, torch {torch.__version__}"
    )
    peak = matmul_peak(device)
    print(f"matmul peak (2048^3 fp32): {peak:.1f} GFLOP/s")

    names = ["MDiT-B", "DiT-B/2"]
    torch.manual_seed(0)
    models = {name: build(name).to(device) for name in names}
    flops = {name: count_flops(name, args.resolution) for name in names}
    batch = inputs(args.batch_size, args.resolution, device)
    times = {name: {"fwd": [], "train": []} for name in names}

    def step(name, train):
        model = models[name]
        model.train(train)
        model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            if train:
                call(model, *batch).float().square().mean().backward()
            else:
                with torch.no_grad():
                    call(model, *batch)
        sync(device)
        return time.perf_counter() - start

    for name in names:  # warm-up
        step(name, False)
        step(name, True)
    for _ in range(args.repeats):
        for name in names:
            times[name]["fwd"].append(step(name, False))
            times[name]["train"].append(step(name, True))

    rows = {}
    print(
        f"\n{'model':<8} {'params':>8} {'GFLOPs fwd':>11} {'fwd s/img':>10} {'fwd GFLOP/s':>12} "
        f"{'fwd+bwd s/img':>14} {'train GFLOP/s':>14} {'% peak':>7}"
    )
    for name in names:
        fwd = statistics.median(times[name]["fwd"]) / args.batch_size
        train = statistics.median(times[name]["train"]) / args.batch_size
        forward_flops, train_flops = flops[name]
        rows[name] = dict(
            fwd=fwd,
            train=train,
            fwd_rate=forward_flops / fwd / 1e9,
            train_rate=train_flops / train / 1e9,
        )
        params = sum(p.numel() for p in models[name].parameters())
        print(
            f"{name:<8} {params / 1e6:>7.1f}M {forward_flops / 1e9:>11.2f} {fwd:>10.3f} "
            f"{rows[name]['fwd_rate']:>12.1f} {train:>14.3f} {rows[name]['train_rate']:>14.1f} "
            f"{100 * rows[name]['train_rate'] / peak:>6.0f}%"
        )
    mdit, dit = rows["MDiT-B"], rows["DiT-B/2"]
    print(
        f"\nMDiT-B / DiT-B/2: forward time {mdit['fwd'] / dit['fwd']:.2f}x, "
        f"fwd+bwd time {mdit['train'] / dit['train']:.2f}x, "
        f"FLOPs {flops['MDiT-B'][0] / flops['DiT-B/2'][0]:.2f}x"
    )
    fwd_ratio = mdit["fwd_rate"] / dit["fwd_rate"]
    train_ratio = mdit["train_rate"] / dit["train_rate"]
    print(
        f"achieved GFLOP/s ratio (target >= 0.9): forward {fwd_ratio:.2f}, "
        f"fwd+bwd {train_ratio:.2f}"
    )


if __name__ == "__main__":
    main()

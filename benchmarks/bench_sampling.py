"""Sampling latency: MDiTPipeline (MDiT-B) vs diffusers' DiTPipeline (DiT-B/2), and our
neighborhood attention vs NATTEN's forward at MDiT-B's outer-level shape, side by side in one
run.

Both pipelines sample one class-conditional image with the same DDIM scheduler, 50 steps and
classifier-free guidance 4.0 (so every step runs the transformer on a batch of 2), and decode
with the same small random VAE (``diffusers_mdit.testing.tiny_vae``; its decode is a
negligible, identical share of both): the latency measured is the denoising loop's. Weights
are random, which does not change the cost. Runs are interleaved; medians are reported. From
the latency ratio and the transformers' forward FLOPs (counted on the meta device, as
``bench_model.py`` does) it prints MDiT-B's achieved GFLOP/s over DiT-B/2's (issue 19's target:
>= 0.95, with glibc's default allocator; the script sets no allocator option).

    python benchmarks/bench_sampling.py              # CPU: ~4 min
    python benchmarks/bench_sampling.py --quick      # CI smoke run (MDiT-S / DiT-S-sized, 2 steps)
    python benchmarks/bench_sampling.py --device cuda --repeats 5

The attention comparison times one forward of ``neighborhood_attention`` (batch 2, 32x32 grid,
6 heads x 64, k=7: one MDiT-B outer block's attention at a 256x256 image) with backend
``torch`` (ours) and ``natten`` (NATTEN's fused kernels on CUDA; on CPU its Flex Attention
forward), when NATTEN is installed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from bench_attention import natten_importable, sync
from bench_model import ISOLATION, TARGET, count_flops, diffusers_dit, load_average
from diffusers import DDIMScheduler, DiTPipeline

from diffusers_mdit import MDiTPipeline, MDiTTransformer2DModel
from diffusers_mdit.models.neighborhood_attention import neighborhood_attention
from diffusers_mdit.profiling import cpu_name
from diffusers_mdit.testing import tiny_vae


def transformers(quick: bool) -> tuple[Callable, Callable]:
    """Builders of (MDiT, DiT): MDiT-B and DiT-B/2, or MDiT-S and DiT-S/2 sized for 16x16."""
    if quick:

        def dit_small():
            dit = diffusers_dit(256, 4, 6)
            dit.register_to_config(sample_size=16)
            return dit

        return lambda: MDiTTransformer2DModel.from_preset("MDiT-S", sample_size=16), dit_small
    return lambda: MDiTTransformer2DModel.from_preset("MDiT-B"), lambda: diffusers_dit(768, 12, 12)


def pipeline_names(quick: bool) -> list[str]:
    sizes = ("MDiT-S", "DiT-S/2") if quick else ("MDiT-B", "DiT-B/2")
    return [f"MDiTPipeline ({sizes[0]})", f"DiTPipeline ({sizes[1]})"]


def build_pipeline(index: int, quick: bool, device):
    """Pipeline ``index`` of :func:`pipeline_names` (0: ours, 1: diffusers' DiT)."""
    torch.manual_seed(index)
    vae = tiny_vae()
    transformer = transformers(quick)[index]().eval()
    if index == 0:
        scheduler = DDIMScheduler(prediction_type="sample")
        pipe = MDiTPipeline(transformer=transformer, scheduler=scheduler, vae=vae)
    else:
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class LocalSampler:
    """Samples with a pipeline built in this process (``--isolation none``)."""

    def __init__(self, index: int, quick: bool, device, threads: int):
        self.pipe, self.device = build_pipeline(index, quick, device), device

    def sample(self, steps: int) -> float:
        return sample(self.pipe, steps, self.device)

    def close(self) -> None:
        self.pipe = None


def _sampler_process(connection, index: int, quick: bool, device: str, threads: int) -> None:
    torch.set_num_threads(threads)
    sampler = LocalSampler(index, quick, torch.device(device), threads)
    connection.send(True)
    while (steps := connection.recv()) is not None:
        connection.send(sampler.sample(steps))


class ProcessSampler:
    """A pipeline in a worker process of its own (``--isolation process``, the default): the
    two pipelines do not share glibc's heap, whose state each one's allocations would shape
    for the other (see ``bench_model.ProcessTimer``), as in a user's sampling process."""

    def __init__(self, index: int, quick: bool, device, threads: int):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(
            target=_sampler_process, args=(child, index, quick, str(device), threads), daemon=True
        )
        self.process.start()
        self.connection.recv()

    def sample(self, steps: int) -> float:
        self.connection.send(steps)
        return self.connection.recv()

    def close(self) -> None:
        self.connection.send(None)
        self.process.join()


def sample(pipe, steps: int, device) -> float:
    generator = torch.Generator(device).manual_seed(0)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        pipe(class_labels=[1], num_inference_steps=steps, guidance_scale=4.0, generator=generator)
    sync(device)
    return time.perf_counter() - start


def attention_times(device, repeats: int, size: int) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, size, size, 6, 64, generator=generator).to(device) for _ in "qkv")
    backends = ["torch"] + (["natten"] if natten_importable() else [])
    times = {b: [] for b in backends}
    with torch.no_grad():
        for backend in backends:  # warm-up
            neighborhood_attention(q, k, v, 7, backend=backend)
        for _ in range(repeats):
            for backend in backends:
                sync(device)
                start = time.perf_counter()
                neighborhood_attention(q, k, v, 7, backend=backend)
                sync(device)
                times[backend].append(time.perf_counter() - start)
    return {b: 1e3 * statistics.median(t) for b, t in times.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small models, 2 steps, 1 repeat")
    parser.add_argument(
        "--isolation", choices=list(ISOLATION), default="process",
        help="'process': each pipeline timed in a process of its own (default); 'none': both in "
        "this one",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 2, 1
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module=r"(natten|torch\.nn\.attention)")
    device = torch.device(args.device)
    print(
        f"config: 1 image, class-conditional, DDIM {args.steps} steps, guidance 4.0 (batch 2 "
        f"per step), {args.repeats} interleaved repeats (median), device {device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, malloc mmap threshold: "
        f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}"
    )
    print(f"machine: {cpu_name()}, load average {load_average()} (1/5/15 min, at start)")
    print(ISOLATION[args.isolation])
    kind = ProcessSampler if args.isolation == "process" else LocalSampler
    samplers = {
        name: kind(index, args.quick, device, args.threads)
        for index, name in enumerate(pipeline_names(args.quick))
    }
    for sampler in samplers.values():  # warm-up
        sampler.sample(1)
    times = {name: [] for name in samplers}
    for _ in range(args.repeats):
        for name, sampler in samplers.items():
            times[name].append(sampler.sample(args.steps))
    for sampler in samplers.values():
        sampler.close()
    seconds = {name: statistics.median(t) for name, t in times.items()}
    for name, value in seconds.items():
        print(f"{name:<24} {value:>8.2f} s   {value / args.steps * 1e3:>8.1f} ms/step")
    ours, theirs = list(seconds)
    ratio = seconds[ours] / seconds[theirs]
    gap = ratio - 1.3
    verdict = "met" if gap <= 0 else f"missed by {gap:.2f}"
    print(f"{ours} / {theirs}: {ratio:.2f}x (target <= 1.3x: {verdict})")
    resolution = 16 if args.quick else 32
    flops = [count_flops(build, resolution)[0] for build in transformers(args.quick)]
    flop_ratio = flops[0] / flops[1]
    rate_ratio = flop_ratio / ratio
    verdict = "met" if rate_ratio >= TARGET else f"missed by {TARGET - rate_ratio:.2f}"
    print(
        f"transformer forward GFLOPs per image: {flops[0] / 1e9:.2f} vs {flops[1] / 1e9:.2f} "
        f"({flop_ratio:.2f}x); achieved GFLOP/s ratio {rate_ratio:.2f} "
        f"(target >= {TARGET}: {verdict})"
    )

    size = 8 if args.quick else 32
    attention = attention_times(device, 3 if args.quick else 10, size)
    shape = f"batch 2, {size}x{size}, 6x64 heads, k=7, forward"
    for backend, ms in attention.items():
        print(f"neighborhood attention [{backend}] ({shape}): {ms:.2f} ms")
    if "natten" in attention:
        print(f"natten / ours: {attention['natten'] / attention['torch']:.2f}x")
    else:
        print("NATTEN is not installed: only ours was timed.")
    return {"seconds": seconds, "ratio": ratio, "rate_ratio": rate_ratio, "attention_ms": attention}


if __name__ == "__main__":
    main()

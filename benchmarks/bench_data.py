"""Can the training data loader feed the GPUs? Samples per second it delivers, against what
training consumes.

Measures, in one run on this machine:

1. the trainer's loader (``diffusers_mdit.training.loader.training_loader``: DataLoader with a
   step batch sampler, the trainer's collate) over latent shards made by the script
   (4x32x32 float16 latents with their flipped twins and labels, ImageNet-256's layout, 10,240
   samples by default), drawing random flips, at 0/1/2 workers;
2. the same over a JPEG image folder at 256px (decode, resize the shorter side, center-crop,
   flip), images of 320x400 made by the script, at 0/1/2 workers;
3. what one MDiT-B training step (forward + backward + AdamW, fp32, 32x32 latents) consumes on
   this CPU, in samples per second.

Then the arithmetic for 8 GPUs at the paper's global batch 256 (32 per GPU): the per-GPU step
time is *assumed* from MDiT-B's FLOPs (measured here with ``torch.utils.flop_counter``; a
training step is ~3x a forward) at an *assumed* sustained 40% of an A100's 312 bf16 TFLOP/s
(``--gpu_tflops``, ``--gpu_utilization``); the number of loader processes that keep the 8 GPUs
fed follows from the per-worker rates measured in 1 and 2. The GPU rate is an assumption, not a
measurement: benchmarks/bench_gpu.py measures it on a GPU machine.

    python benchmarks/bench_data.py            # ~3 minutes on 2 cores
    python benchmarks/bench_data.py --quick    # smoke test (MDiT-S in place of MDiT-B)
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import numpy as np
import torch

from diffusers_mdit.profiling import cpu_name


def make_shards(folder: str, count: int) -> None:
    from diffusers_mdit.data.shards import LatentShardWriter

    rng = np.random.default_rng(0)
    writer = LatentShardWriter(folder, metadata={"num_classes": 1000}, shard_size=2048)
    for i in range(count):
        latent = rng.standard_normal((4, 32, 32), dtype=np.float32)
        writer.write(latent, flipped_latent=latent[..., ::-1], class_label=i % 1000)
    writer.close()


def make_jpegs(folder: str, count: int) -> None:
    import PIL.Image

    rng = np.random.default_rng(0)
    for c in range(4):
        os.makedirs(os.path.join(folder, f"class{c}"), exist_ok=True)
    base = rng.integers(0, 256, (400, 320, 3), dtype=np.uint8)
    for i in range(count):
        # Smooth content (a shifted gradient plus noise) compresses like a photo, not like noise.
        image = (
            np.roll(base, i, axis=0) // 4 + np.linspace(0, 190, 320, dtype=np.uint8)[None, :, None]
        )
        path = os.path.join(folder, f"class{i % 4}", f"{i:06d}.jpg")
        PIL.Image.fromarray(image.astype(np.uint8)).save(path, quality=90)


def loader_rate(dataset, batch: int, steps: int, workers: int) -> float:
    """Samples per second the trainer's loader delivers (after its first batch)."""
    from diffusers_mdit.training.loader import training_loader

    loader = training_loader(
        dataset, batch, seed=0, start=0, stop=steps + 1 + 2 * workers, share=slice(None),
        random_flip=True,
        num_workers=workers,
    )  # fmt: skip
    batches = iter(loader)
    # Worker start-up is paid once per run, and while the first batch is awaited the workers
    # prefetch 2 batches each: time the steady state after those.
    for _ in range(1 + 2 * workers):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return batch * steps / (time.perf_counter() - start)


def training_rate(batch: int, repeats: int, preset: str = "MDiT-B") -> tuple[float, float]:
    """Samples per second a training step of ``preset`` consumes on this CPU, and its GFLOPs
    per forward sample."""
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_mdit import MDiTTransformer2DModel

    model = MDiTTransformer2DModel.from_preset(preset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, 32, 32)
    t = torch.randint(0, 1000, (batch,))
    y = torch.randint(0, 1000, (batch,))
    with torch.device("meta"):
        meta = MDiTTransformer2DModel.from_preset(preset)
    with FlopCounterMode(display=False) as counter:
        meta(x[:1].to("meta"), t[:1].to("meta"), class_labels=y[:1].to("meta"))
    gflops = counter.get_total_flops() / 1e9
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(x, t, class_labels=y).sample.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    return batch / float(np.median(times)), gflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, for the tests.")
    parser.add_argument("--shard_samples", type=int, default=10_240)
    parser.add_argument("--jpeg_images", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=256, help="Loader batch (shards).")
    parser.add_argument("--jpeg_batch_size", type=int, default=32, help="Loader batch (JPEGs).")
    parser.add_argument("--steps", type=int, default=30, help="Timed batches per measurement.")
    parser.add_argument("--gpu_tflops", type=float, default=312.0, help="Assumed GPU peak.")
    parser.add_argument("--gpu_utilization", type=float, default=0.4, help="Assumed fraction.")
    args = parser.parse_args()
    if args.quick:
        args.shard_samples, args.jpeg_images, args.batch_size = 256, 32, 16
        args.jpeg_batch_size, args.steps = 8, 4
    from diffusers_mdit.data import ImageDataset
    from diffusers_mdit.data.shards import LatentShardDataset

    print("training data loader benchmark")
    print(f"  {cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        shards, jpegs = os.path.join(tmp, "shards"), os.path.join(tmp, "jpegs")
        make_shards(shards, args.shard_samples)
        make_jpegs(jpegs, args.jpeg_images)
        sets = {
            "latent shards 4x32x32 fp16 + flip": LatentShardDataset(shards),
            "JPEG folder 256px (decode+crop+flip)": ImageDataset(
                train_data_dir=jpegs, resolution=256
            ),
        }
        print(f"  loader batch {args.batch_size} (shards) / {args.jpeg_batch_size} (JPEGs), "
              f"{args.steps} timed batches after the prefetched ones; {args.shard_samples} "
              f"shard samples, {args.jpeg_images} JPEGs of 320x400\n")  # fmt: skip
        print(f"{'source':40s} {'workers':>7s} {'samples/s':>10s} {'per worker':>10s}")
        rates = {}
        for name, dataset in sets.items():
            # JPEGs: smaller batches, so that many steps are timed (epochs wrap around).
            batch = min(args.batch_size if "shards" in name else args.jpeg_batch_size, len(dataset))
            steps = args.steps
            for workers in (0, 1, 2):
                rate = loader_rate(dataset, batch, steps, workers)
                rates[name, workers] = rate
                per = rate / max(workers, 1)
                print(f"{name:40s} {workers:7d} {rate:10.0f} {per:10.0f}")
    step_batch, preset = (1, "MDiT-S") if args.quick else (2, "MDiT-B")
    consumed, gflops = training_rate(step_batch, 1 if args.quick else 3, preset)
    print(f"\n{preset} training step on this CPU (batch {step_batch}, fp32): {consumed:.2f} "
          f"samples/s consumed; {gflops:.1f} GFLOPs per forward sample")  # fmt: skip
    for name in sets:
        print(f"  {name}: loader (0 workers) / CPU training = {rates[name, 0] / consumed:.0f}x")
    # 8 GPUs at global batch 256: assumed per-GPU throughput from FLOPs.
    per_sample = 3 * gflops * 1e9 / (args.gpu_tflops * 1e12 * args.gpu_utilization)
    step_time = 32 * per_sample
    needed = 256 / step_time
    print(f"\n8 GPUs, global batch 256 (32 per GPU): assumed {args.gpu_utilization:.0%} of "
          f"{args.gpu_tflops:.0f} TFLOP/s -> {step_time * 1e3:.0f} ms per step, "
          f"{needed:.0f} samples/s to feed")  # fmt: skip
    for name in sets:
        per_worker = rates[name, 1]
        print(f"  {name}: {per_worker:.0f} samples/s per worker -> "
              f"{math.ceil(needed / per_worker)} loader processes in all "
              f"({math.ceil(needed / per_worker / 8)} per GPU)")  # fmt: skip


if __name__ == "__main__":
    main()

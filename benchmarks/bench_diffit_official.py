"""Cost of sampling a converted official DiffiT checkpoint as the authors do: seconds per
250-step 256px sample and peak memory, on this machine.

The pipeline is the converted one at the real size: ``DiffiTTransformer2DModel`` with the
config ``from_single_file`` infers from ``diffit_256.safetensors`` (DiffiT-XL: depth 28, width
1152, 16 heads, patch 2, 32x32 latents, 1000 classes, learned sigma), the official scheduler and
guidance (``OFFICIAL_SAMPLING[256]``: every step runs the transformer on a batch of 2), and a
VAE with sd-vae-ft-ema's architecture. Weights are random (the real ones cannot be downloaded
here), which does not change the cost. One image; a few steps are timed (the first is a warmup)
and their median is scaled to 250, plus one decode.

    python benchmarks/bench_diffit_official.py            # CPU: ~2 min
    python benchmarks/bench_diffit_official.py --quick    # smoke run (tiny model, 2 steps)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from diffusers import AutoencoderKL

from diffusers_mdit import DiffiTPipeline, DiffiTTransformer2DModel
from diffusers_mdit.models.conversion_diffit import OFFICIAL_SAMPLING, official_diffit_scheduler
from diffusers_mdit.profiling import config_cost, cpu_name
from diffusers_mdit.testing import tiny_vae

# sd-vae-ft-ema's architecture (diffusers' AutoencoderKL of Stable Diffusion 1.x)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    sample_size=256,
    scaling_factor=0.18215,
)
TOTAL_STEPS = 250


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build(quick: bool) -> DiffiTPipeline:
    if quick:
        transformer = DiffiTTransformer2DModel(
            sample_size=8, hidden_size=64, num_layers=2, num_attention_heads=2, num_classes=10,
            out_channels=8,
        )  # fmt: skip
        vae = tiny_vae()
    else:
        transformer = DiffiTTransformer2DModel.from_preset("DiffiT-XL", out_channels=8)
        vae = AutoencoderKL(**SD_VAE)
    pipe = DiffiTPipeline(
        transformer=transformer.eval(), scheduler=official_diffit_scheduler(), vae=vae.eval()
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 4; 2)")
    args = parser.parse_args()
    steps = args.steps or (2 if args.quick else 4)

    rss_start = peak_rss_mib()
    pipe = build(args.quick)
    config = pipe.transformer.config
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    rss_built = peak_rss_mib()
    print("official DiffiT sampling benchmark (converted pipeline, random weights)")
    print(f"  torch {torch.__version__}, CPU {cpu_name()}, threads {torch.get_num_threads()}")
    print(
        f"  transformer: depth {config.num_layers}, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads, {config.sample_size}x{config.sample_size} latents, "
        f"{parameters / 1e6:.1f}M parameters; float32, 1 image, guidance batch 2"
    )
    settings = {**OFFICIAL_SAMPLING[256], "num_inference_steps": steps}
    print(f"  sampling: {settings} (timed steps scaled to {TOTAL_STEPS})")

    stamps: list[float] = []

    def stamp(pipeline, step, timestep, tensors):
        stamps.append(time.perf_counter())
        return tensors

    start = time.perf_counter()
    with torch.no_grad():
        latents = pipe(
            class_labels=[1 if args.quick else 207],
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            callback_on_step_end=stamp,
            **settings,
        ).images
    step_times = [b - a for a, b in zip([start, *stamps], stamps, strict=False)]
    timed = step_times[1:] or step_times  # the first step warms up
    per_step = statistics.median(timed)
    decode_times = []
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            pipe.decode(latents, "pt")
            decode_times.append(time.perf_counter() - t0)
    decode = decode_times[-1]
    total = TOTAL_STEPS * per_step + decode

    print(f"  step times (s): {', '.join(f'{t:.2f}' for t in step_times)}")
    # FLOPs of one guided step: the transformer on the batch of 2 (the scheduler is negligible)
    step_flops = (
        2
        * config_cost(
            {**config, "_class_name": "DiffiTTransformer2DModel"},
            config.sample_size,
            config.sample_size,
        ).flops
    )
    print(
        f"  median step {per_step:.2f} s ({step_flops / 1e9:.0f} GFLOP: "
        f"{step_flops / per_step / 1e9:.1f} GFLOP/s achieved), decode {decode:.2f} s"
    )
    print(f"  s per {TOTAL_STEPS}-step sample: {total:.0f} s ({total / 60:.1f} min)")
    print(
        f"  peak RSS: {peak_rss_mib():.0f} MiB (process start {rss_start:.0f}, after building "
        f"{rss_built:.0f}; transformer weights {parameters * 4 / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    main()

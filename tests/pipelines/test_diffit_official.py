"""Sampling a converted official DiffiT checkpoint as the authors do: ``DiffiTPipeline`` with
``official_diffit_scheduler()`` and ``OFFICIAL_SAMPLING[256]`` against (1) the official
sampler's output stored in the fixture (MDT's ``p_sample_loop`` with their ``forward_with_cfg``,
5 respaced steps) and (2) a hand-written reference of that loop (guided-diffusion's respacing and
``p_sample`` with learned-range variance, guidance on 3 channels from the timestep)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from diffusers_mdit import DiffiTPipeline, DiffiTTransformer2DModel
from diffusers_mdit.models.conversion_diffit import OFFICIAL_SAMPLING, official_diffit_scheduler

FIXTURE = Path(__file__).parents[1] / "models" / "fixtures" / "diffit_official_tiny.safetensors"
STEPS, NOISE_SEED, SCALE, POWER = 5, 123, 4.4, 4.0  # as the fixture was made


def converted(tmp_path: Path) -> tuple[DiffiTTransformer2DModel, dict[str, torch.Tensor]]:
    data = load_file(FIXTURE)
    state = {k[len("official.") :]: v for k, v in data.items() if k.startswith("official.")}
    save_file(state, tmp_path / "diffit.safetensors")
    return DiffiTTransformer2DModel.from_single_file(tmp_path / "diffit.safetensors"), data


def pipeline_sample(model, z, labels) -> torch.Tensor:
    pipe = DiffiTPipeline(transformer=model, scheduler=official_diffit_scheduler())
    pipe.set_progress_bar_config(disable=True)
    settings = {**OFFICIAL_SAMPLING[256], "num_inference_steps": STEPS}
    return pipe(
        class_labels=labels.tolist(),
        latents=z,
        generator=torch.Generator().manual_seed(NOISE_SEED),
        output_type="latent",
        **settings,
    ).images


def reference_sample(model, z, labels, num_classes) -> torch.Tensor:
    """guided-diffusion's ``p_sample_loop`` on a respaced linear schedule, written out."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    stride = 999 / (STEPS - 1)
    kept = sorted({round(i * stride) for i in range(STEPS)})  # space_timesteps(1000, "5")
    respaced, last = [], 1.0
    for t in kept:
        respaced.append(1.0 - alphas_cumprod[t] / last)
        last = alphas_cumprod[t]
    b = np.array(respaced)
    a = np.cumprod(1.0 - b)
    a_prev = np.append(1.0, a[:-1])
    posterior_variance = b * (1.0 - a_prev) / (1.0 - a)
    log_min = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    coef_x0 = b * np.sqrt(a_prev) / (1.0 - a)
    coef_xt = (1.0 - a_prev) * np.sqrt(1.0 - b) / (1.0 - a)

    generator = torch.Generator().manual_seed(NOISE_SEED)
    null = torch.full_like(labels, num_classes)
    x = z.double()
    for index in reversed(range(STEPS)):
        t = kept[index]
        with torch.no_grad():
            out = model(torch.cat([x, x]).float(), torch.tensor([t] * 2 * len(x)),
                        torch.cat([labels, null])).sample.double()  # fmt: skip
        cond, uncond = out.chunk(2)
        scale = 1 + (SCALE - 1) * (1 - math.cos(math.pi * (1 - t / 1000) ** POWER)) / 2
        eps = torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:4]], 1)
        frac = (cond[:, 4:] + 1) / 2
        log_variance = frac * math.log(b[index]) + (1 - frac) * log_min[index]
        x0 = math.sqrt(1 / a[index]) * x - math.sqrt(1 / a[index] - 1) * eps
        mean = coef_x0[index] * x0 + coef_xt[index] * x
        if index > 0:
            noise = torch.randn(x.shape, generator=generator).double()
            x = mean + torch.exp(0.5 * log_variance) * noise
        else:
            x = mean
    return x.float()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max difference over the samples' scale: with random weights the x0 predictions at the
    first, noisiest steps are far from unit scale (samples reach |x| ~ 460)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def test_converted_pipeline_reproduces_the_official_sampler(tmp_path):
    model, data = converted(tmp_path)
    sample = pipeline_sample(model, data["sample.z"], data["sample.labels"])
    assert relative_error(sample, data["sample.out"]) < 1e-5  # measured 3.3e-7


def test_converted_pipeline_matches_a_hand_written_official_loop(tmp_path):
    model, data = converted(tmp_path)
    z, labels = data["sample.z"], data["sample.labels"]
    reference = reference_sample(model, z, labels, model.config.num_classes)
    assert relative_error(reference, data["sample.out"]) < 1e-5
    assert relative_error(pipeline_sample(model, z, labels), reference) < 1e-5

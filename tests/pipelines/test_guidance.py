"""Sampling features: guidance schedules, 3-channel guidance, dynamic thresholding, x0 maps."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_mdit.pipelines.guidance import (
    apply_guidance,
    dynamic_threshold,
    guidance_scale_at,
    prediction_to_x0,
    x0_to_prediction,
)


def test_power_cosine_schedule_from_the_timestep_is_the_official_diffit_ramp():
    # DiffiT's forward_with_cfg: 1 + (s - 1) (1 - cos(pi (1 - t / 1000)^4)) / 2.
    for t in (999, 750, 500, 250, 0):
        expected = 1 + 3.4 * (1 - math.cos(math.pi * (1 - t / 1000) ** 4)) / 2
        assert guidance_scale_at(4.4, 0, 250, "power-cosine", 4.0, timestep=t) == pytest.approx(
            expected, abs=1e-12
        )
    # It depends on the timestep, not on the step index.
    assert guidance_scale_at(4.4, 3, 5, "power-cosine", timestep=torch.tensor(500)) == (
        guidance_scale_at(4.4, 100, 250, "power-cosine", timestep=500)
    )
    with pytest.raises(ValueError, match="timestep"):
        guidance_scale_at(4.4, 0, 250, "power-cosine")


def test_power_cosine_step_schedule_ramps_from_one_to_the_full_scale():
    scales = [guidance_scale_at(4.0, i, 11, "power-cosine-step", 4.0) for i in range(11)]
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(4.0)
    assert all(a <= b for a, b in zip(scales, scales[1:], strict=False))
    # Halfway: 1 + 3 * (1 - cos(pi / 16)) / 2.
    assert scales[5] == pytest.approx(1 + 3 * (1 - math.cos(math.pi * 0.5**4)) / 2)
    assert guidance_scale_at(4.0, 3, 11) == 4.0
    with pytest.raises(ValueError, match="power-cosine"):
        guidance_scale_at(4.0, 0, 10, "linear")


def test_three_channel_guidance_keeps_the_other_channels_conditional():
    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    guided = apply_guidance(cond, uncond, 3.0, channels=3)
    torch.testing.assert_close(guided[:, :3], uncond[:, :3] + 3 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(guided[:, 3:], cond[:, 3:])
    torch.testing.assert_close(apply_guidance(cond, uncond, 1.0), cond)


def test_dynamic_threshold_bounds_and_leaves_small_samples_alone():
    x0 = torch.randn(3, 4, 8, 8) * 5
    out = dynamic_threshold(x0, 0.9, 1.4)
    assert out.abs().amax(dim=(1, 2, 3)).le(1.4 + 1e-6).all()
    small = torch.rand(2, 4, 8, 8) * 0.5  # quantile < 1: threshold 1, only the post scale acts
    torch.testing.assert_close(dynamic_threshold(small, 0.9, 1.4), small * 1.4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_x0_conversions_invert_each_other_and_match_the_forward_process(prediction_type):
    scheduler = DDIMScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sample = scheduler.add_noise(x0, noise, t[None])
    alpha = scheduler.alphas_cumprod[t].sqrt()
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt()
    truth = {"epsilon": noise, "sample": x0, "v_prediction": alpha * noise - sigma * x0}
    prediction = truth[prediction_type]
    torch.testing.assert_close(prediction_to_x0(scheduler, prediction, sample, t), x0)
    torch.testing.assert_close(x0_to_prediction(scheduler, x0, sample, t), prediction)


def test_x0_conversions_for_flow_matching():
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[2]
    sigma = scheduler.sigmas[2]
    x0, noise = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    sample = (1 - sigma) * x0 + sigma * noise
    velocity = noise - x0
    torch.testing.assert_close(prediction_to_x0(scheduler, velocity, sample, t), x0)
    torch.testing.assert_close(x0_to_prediction(scheduler, x0, sample, t), velocity)

"""Radial spectral power: known spectra, and the capture of exactly the core-level blocks at
the requested sampling step."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.explain import cli
from diffusers_mdit.explain.common import block_names, capture_outputs
from diffusers_mdit.explain.spectrum import (
    plot_spectrum,
    radial_power,
    radial_radius,
    spectral_analysis,
)
from diffusers_mdit.testing import ddim_x0, tiny_mdit


def test_constant_grid_has_all_its_amplitude_at_radius_zero():
    profile = radial_power(torch.full((2, 8, 8, 3), 0.5))
    # orthonormal FFT: DC = mean * sqrt(H * W)
    assert profile[0].item() == pytest.approx(0.5 * 8)
    assert torch.all(profile[1:].abs() < 1e-12)


@pytest.mark.parametrize("frequency", [1, 2, 3, 5])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_cosine_peaks_at_its_frequency(frequency, axis):
    size = 16
    position = torch.arange(size, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * frequency * position / size)
    grid = wave[None, :].expand(size, size) if axis == "x" else wave[:, None].expand(size, size)
    profile = radial_power(grid[None, :, :, None].float())
    assert int(profile.argmax()) == frequency
    # |F| = sqrt(H W) / 2 at (0, +-f): two of the ring's frequencies carry all the energy
    ring = (radial_radius(size, size) == frequency).sum().item()
    assert profile[frequency].item() == pytest.approx(2 * (size / 2) / ring, rel=1e-5)
    others = torch.cat([profile[:frequency], profile[frequency + 1 :]])
    assert torch.all(others < 1e-5)


def test_profile_length_and_ordering_by_radius():
    # 8 x 6: centre (4, 3), farthest corner (-4, -3) -> radius 5 -> 6 bins
    assert radial_power(torch.randn(1, 8, 6, 2)).shape == (6,)
    assert radial_power(torch.randn(1, 4, 4, 2)).shape == (4,)  # corner sqrt(8) rounds to 3
    radius = radial_radius(5, 5)
    assert radius[2, 2] == 0 and radius[2, 4] == 2 and radius[0, 0] == 3
    # white noise is flat in expectation; a smooth (low-pass) grid decays with radius
    smooth = torch.randn(64, 1, 1, 1).expand(64, 16, 16, 1) + 0.01 * torch.randn(64, 16, 16, 1)
    profile = radial_power(smooth)
    assert profile[0] > 10 * profile[1:].max()
    with pytest.raises(ValueError, match="channels-last"):
        radial_power(torch.randn(8, 8))


def tiny_pipeline():
    pipe = MDiTPipeline(transformer=tiny_mdit(num_classes=10), scheduler=ddim_x0())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(("guidance_scale", "step"), [(1.0, 2), (3.0, 1)])
def test_captures_exactly_the_core_blocks_at_the_step(guidance_scale, step):
    pipe = tiny_pipeline()
    result = spectral_analysis(
        pipe, step=step, num_images=3, num_inference_steps=3, guidance_scale=guidance_scale
    )
    assert result.blocks == ["core.0", "aggregate.0", "core.1"]
    assert result.levels == ["core", "aggregate", "core"]
    assert result.grid == (4, 4) and result.step == step and result.num_samples == 3
    assert result.timestep == int(pipe.scheduler.timesteps[step - 1])
    # independent computation: capture every call of every block, take the step's output
    blocks = dict(block_names(pipe.transformer))
    with capture_outputs(blocks) as outputs:
        pipe(
            class_labels=[0, 1, 2],
            num_inference_steps=3,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    for name, profile in zip(result.blocks, result.profiles, strict=True):
        assert len(outputs[name]) == 3
        hidden = outputs[name][step - 1]
        assert hidden.shape[0] == (6 if guidance_scale != 1.0 else 3)
        expected = radial_power(hidden[3:] if guidance_scale != 1.0 else hidden)
        torch.testing.assert_close(torch.tensor(profile, dtype=torch.float64), expected)
    assert all(not b._forward_hooks for b in blocks.values())
    assert not pipe.transformer._forward_pre_hooks


def test_default_step_bad_step_plot_and_cli(tmp_path):
    pipe = tiny_pipeline()
    result = spectral_analysis(pipe, num_images=2, num_inference_steps=4)
    assert result.step == 2 and len(result.profiles[0]) == 4
    with pytest.raises(ValueError, match="step must be in"):
        spectral_analysis(pipe, step=5, num_inference_steps=4)
    path = plot_spectrum(result, str(tmp_path))
    assert path.endswith("spectrum.png") and open(path, "rb").read(4) == b"\x89PNG"

    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    argv = ["spectrum", str(tmp_path / "pipe"), "--output_dir", str(out)]
    cli.main([*argv, "--num_images", "2", "--num_inference_steps", "3", "--step", "3"])
    data = json.loads((out / "spectrum.json").read_text())
    assert data["result"]["step"] == 3 and data["result"]["blocks"][1] == "aggregate.0"
    assert (out / "spectrum.png").is_file()

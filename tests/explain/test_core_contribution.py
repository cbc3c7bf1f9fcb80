"""Core contribution: eq. 4 case by case, the captured tensors are the two terms of h = s + c,
and the sampling-time statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.explain import cli
from diffusers_mdit.explain.core_contribution import (
    capture_core_and_skip,
    contribution_statistics,
    core_contribution,
    plot_core_contribution,
    rho,
)
from diffusers_mdit.testing import ddim_x0, randomize, tiny_mdit


@pytest.mark.parametrize(
    ("c", "s", "expected", "case"),
    [
        (3.0, 1.0, 2.0, "c >= 0, s >= 0: c - s"),
        (1.0, 3.0, -2.0, "c >= 0, s >= 0: c - s"),
        (0.0, 0.0, 0.0, "c >= 0, s >= 0: c - s"),
        (-3.0, -1.0, 2.0, "c < 0, s < 0: s - c"),
        (-1.0, -4.0, -3.0, "c < 0, s < 0: s - c"),
        (3.0, -1.0, 2.0, "c >= 0, s < 0: c + s"),
        (0.0, -2.0, -2.0, "c >= 0, s < 0: c + s"),
        (-3.0, 1.0, 2.0, "c < 0, s >= 0: -c - s"),
        (-1.0, 0.0, 1.0, "c < 0, s >= 0: -c - s"),
    ],
)
def test_rho_matches_eq_4_case_by_case(c, s, expected, case):
    assert rho(torch.tensor(c), torch.tensor(s)).item() == expected, case


def test_rho_equals_core_minus_skip_magnitude_elementwise():
    c, s = torch.randn(1000), torch.randn(1000)
    torch.testing.assert_close(rho(c, s), c.abs() - s.abs())


def test_statistics_of_known_grids():
    skip = torch.ones(2, 3, 3, 4)
    core = torch.zeros(2, 3, 3, 4)
    core[0] = 3.0  # core dominates every channel of sample 0
    core[1, ..., :1] = -1.0  # sample 1: equal magnitude on one channel, nothing elsewhere
    stats = contribution_statistics(core, skip)
    torch.testing.assert_close(stats.core_norm, torch.tensor([6.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(stats.skip_norm, torch.tensor([2.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(stats.ratio, torch.tensor([3.0, 0.5], dtype=torch.float64))
    # sample 0: sum(3 - 1) / sum(3 + 1) = 0.5; sample 1: (0 - 3 * 1) / (1 + 4 * 1) per token.
    torch.testing.assert_close(
        stats.relative_contribution, torch.tensor([0.5, -0.6], dtype=torch.float64)
    )
    torch.testing.assert_close(
        stats.core_dominant_channels, torch.tensor([1.0, 0.0], dtype=torch.float64)
    )


def test_captured_core_and_skip_are_the_two_terms_added_before_the_output_blocks():
    model = randomize(tiny_mdit(num_classes=10)).eval()
    entering_outer_out = []
    handle = model.outer_out_blocks[0].register_forward_pre_hook(
        lambda _m, inputs: entering_outer_out.append(inputs[0])
    )
    with torch.no_grad(), capture_core_and_skip(model) as pairs:
        model(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), class_labels=torch.tensor([1, 2]))
        model(torch.randn(2, 4, 8, 8), 3)
    handle.remove()
    assert len(pairs) == 2
    for (core, skip), h in zip(pairs, entering_outer_out, strict=True):
        assert core.shape == skip.shape == (2, 8, 8, model.config.outer_dim)
        torch.testing.assert_close(skip + core, h)
        assert core.abs().sum() > 0 and not torch.equal(core, skip)
    assert not model.core_patch_embed._forward_pre_hooks and not model.core_unpatch._forward_hooks


def test_models_without_an_outer_level_are_refused():
    model = tiny_mdit(num_outer_in_blocks=0, num_outer_out_blocks=0)
    with pytest.raises(ValueError, match="no outer level"), capture_core_and_skip(model):
        pass


def test_sampling_statistics_per_step_plot_and_cli(tmp_path):
    pipe = MDiTPipeline(transformer=randomize(tiny_mdit(num_classes=10)), scheduler=ddim_x0())
    pipe.set_progress_bar_config(disable=True)
    result = core_contribution(
        pipe, num_images=5, num_inference_steps=3, batch_size=2, progress=False
    )
    assert len(result.timesteps) == len(result.ratio_mean) == len(result.core_norm_std) == 3
    assert result.timesteps[0] > result.timesteps[-1]
    assert result.num_samples == 5 and 1 <= result.peak_step <= 3
    ratio = np.array(result.ratio_mean)
    assert np.all(ratio > 0) and np.all(np.isfinite(ratio))
    assert all(-1 <= v <= 1 for v in result.relative_contribution_mean)
    assert all(s > 0 for s in result.core_norm_std)  # 5 different samples
    again = core_contribution(
        pipe, num_images=5, num_inference_steps=3, batch_size=2, progress=False
    )
    assert again.ratio_mean == result.ratio_mean  # seeded
    guided = core_contribution(pipe, num_images=3, num_inference_steps=2, guidance_scale=3.0,
                               batch_size=3, progress=False)  # fmt: skip
    assert guided.num_samples == 3 and len(guided.ratio_mean) == 2
    path = plot_core_contribution(result, str(tmp_path / "core.png"))
    assert open(path, "rb").read(4) == b"\x89PNG"

    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    argv = ["core-contribution", str(tmp_path / "pipe"), "--output_dir", str(out)]
    cli.main([*argv, "--num_images", "2", "--num_inference_steps", "2"])
    data = json.loads((out / "core-contribution.json").read_text())
    assert len(data["result"]["ratio_mean"]) == 2 and (out / "core_contribution.png").is_file()


def test_capture_refuses_a_core_at_reduced_resolution():
    pipe = MDiTPipeline(transformer=tiny_mdit(in_channels=3, num_classes=10), scheduler=ddim_x0())
    with capture_core_and_skip(pipe.transformer), pytest.raises(RuntimeError, match="full reso"):
        pipe(class_labels=[1], height=16, width=16, num_inference_steps=2, core_patch_schedule=1.0,
             output_type="pt")  # fmt: skip

"""The reproduction experiments of experiments/: their arithmetic, and --quick smoke runs."""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest


def load_experiment(name: str):
    """``experiments.<name>``: the package is importable from the repository root (pytest's
    ``pythonpath``), as ``python -m experiments.<name>`` runs it."""
    return importlib.import_module(f"experiments.{name}")


def stages(values, flops_per_step):
    return [
        {"step": step, "fd": fd, "train_flops": step * flops_per_step}
        for step, fd in zip((100, 200, 400, 800), values, strict=True)
    ]


def test_speedup_counts_the_steps_each_arm_needs_to_reach_the_dit_final_quality():
    convergence = load_experiment("convergence")
    runs = {
        "mdit": {0: stages([30, 12, 6, 5], 2.0), 1: stages([40, 30, 25, 20], 2.0)},
        "dit": {0: stages([35, 20, 12, 12], 1.0), 1: stages([30, 25, 15, 9], 1.0)},
    }
    seed0, seed1 = convergence.speedups(runs)
    # Seed 0: the DiT's final FD 12 is first reached at its step 400; MDiT reaches it at 200.
    assert (seed0["dit_step"], seed0["mdit_step"]) == (400, 200)
    assert seed0["step_speedup"] == 2.0
    assert seed0["flop_speedup"] == pytest.approx(400 * 1.0 / (200 * 2.0))
    # Seed 1: MDiT never reaches FD 9, so there is no speedup to report.
    assert seed1["mdit_step"] is None and seed1["step_speedup"] is None


def test_dit_analog_matches_mdit_parameters_within_ten_percent():
    from diffusers_mdit.profiling import config_cost

    common = load_experiment("common")
    extra = dict(sample_size=16, in_channels=3, out_channels=3, num_classes=10)
    mdit = config_cost(dict(common.MDIT_DIGITS, **extra), 16, 16).parameters
    dit = config_cost(dict(common.DIT_DIGITS, **extra), 16, 16).parameters
    assert abs(dit / mdit - 1) < 0.1


def test_ablation_arms_match_the_full_model_within_ten_percent_and_change_one_thing():
    ablations = load_experiment("ablations")
    common = load_experiment("common")
    recipe = common.Recipe()
    full, no_outer, no_aggregate, modulation = (ablations.ARMS[arm] for arm in ablations.ARMS)
    base = common.parameter_count(full, recipe)
    assert abs(common.parameter_count(modulation, recipe) / base - 1) < 0.1
    assert {k for k in modulation if modulation.get(k) != full.get(k)} == {"class_conditioning"}
    assert modulation["class_conditioning"] == "modulation"
    for config in (no_outer, no_aggregate):
        assert abs(common.parameter_count(config, recipe) / base - 1) < 0.1
        changed = {k for k in config if config[k] != full[k]}
        assert changed <= {
            "num_outer_in_blocks", "num_outer_out_blocks", "num_alternating_blocks",
            "num_core_blocks",
        }  # fmt: skip
    assert no_outer["num_outer_in_blocks"] == no_outer["num_outer_out_blocks"] == 0
    assert no_outer["num_alternating_blocks"] == full["num_alternating_blocks"]
    assert no_aggregate["num_alternating_blocks"] == 0
    assert no_aggregate["num_outer_in_blocks"] == full["num_outer_in_blocks"]
    rows = [
        {"arm": "a", "parameters": 1, "fd": 10.0, "accuracy": 0.9},
        {"arm": "a", "parameters": 1, "fd": 14.0, "accuracy": 1.0},
    ]
    (summary,) = common.summarise_arms(rows, ["a"])
    assert summary["fd_mean"] == 12.0 and summary["fd_std"] == pytest.approx(2**0.5 * 2)


def test_time_conditioning_arms_differ_only_in_conditioning_at_matched_parameters():
    experiment = load_experiment("time_conditioning")
    common = load_experiment("common")
    tmsa, adaln = experiment.ARMS.values()
    assert {k for k in adaln if adaln.get(k) != tmsa.get(k)} == {"time_conditioning", "mlp_ratio"}
    ratio = common.parameter_count(adaln, common.Recipe()) / common.parameter_count(
        tmsa, common.Recipe()
    )
    assert abs(ratio - 1) < 0.01
    assert common.arm_folder("adaln-zero (mlp ratio 2.5)") == "adaln_zero_mlp_ratio_2.5"
    assert common.arm_folder("no outer level {0,0,2,5}") == "no_outer_level"


def test_sample_variances_is_eq2_variance_per_sample_and_channel():
    import torch

    variance_matching = load_experiment("variance_matching")
    images = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = np.array([[images[b, c].flatten().var().item() for c in range(2)] for b in range(3)])
    np.testing.assert_allclose(variance_matching.sample_variances(images), expected.flatten(), 1e-5)


def test_psnr_of_a_known_error_and_the_gap_sign():
    import torch

    local_attention = load_experiment("local_attention")
    target = torch.zeros(2, 3, 4, 4)
    estimate = torch.full_like(target, 0.2)  # MSE 0.04 on a peak-to-peak range of 2
    expected = 10 * np.log10(4 / 0.04)  # 20 dB
    np.testing.assert_allclose(local_attention.psnr(estimate, target).numpy(), [expected] * 2)
    record = {
        "step": 2, "train_seconds": 1.0, "score_seconds": 1.0, "fd": 5.0, "accuracy": 0.5,
        "psnr_train": {"100": 30.0, "600": 20.0}, "psnr_held": {"100": 27.0, "600": 19.0},
    }  # fmt: skip
    recipe = load_experiment("common").Recipe()
    rows = local_attention.run_rows("k3 blocks 1-2", "10", 0, record, recipe)
    assert [(r["t"], r["gap"]) for r in rows] == [(100, 3.0), (600, 1.0)]
    assert rows[0]["mean_gap"] == 2.0 and rows[0]["train_size"] == 10
    assert rows[0]["core_kernel_sizes"] == "3 3 - - - -"
    (summary,) = local_attention.summarise(rows)
    assert summary["gap_mean"] == 2.0 and summary["gap_by_t"] == {100: 3.0, 600: 1.0}


def test_denoising_psnr_of_an_x0_model_that_returns_its_input_is_the_noise_psnr():
    """An x0 model that outputs its noisy input: x0_hat = x_t, so the PSNR is that of the
    noise alone, computed independently from the schedule's alpha_bar."""
    import torch

    local_attention = load_experiment("local_attention")
    from diffusers_mdit.training.objectives import make_objective

    class Identity(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return type("Out", (), {"sample": x})()

    objective = make_objective("x0")
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    (score,) = local_attention.denoising_psnr(
        Identity(), objective, images, torch.zeros(4, dtype=torch.long), [300], seed=0
    ).values()
    alpha_bar = objective.noise_scheduler.alphas_cumprod[300]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(300))
    noisy = (alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise).clamp(-1, 1)
    mse = (noisy - images).pow(2).flatten(1).mean(1)
    assert score == pytest.approx((10 * torch.log10(4 / mse)).mean().item(), rel=1e-5)


def test_local_attention_arms_differ_from_global_only_in_their_windows():
    local_attention = load_experiment("local_attention")
    common = load_experiment("common")
    recipe = common.Recipe()
    base = local_attention.ARMS["global"]
    count = common.parameter_count(base, recipe)
    windows = set()
    for arm, config in local_attention.ARMS.items():
        assert {k for k in {**config, **base} if config.get(k) != base.get(k)} <= {
            "core_kernel_sizes"
        }
        assert common.parameter_count(config, recipe) == count, arm
        kernels = config.get("core_kernel_sizes")
        if arm != "global":
            assert len(kernels) == base["num_core_blocks"] and any(kernels)
            assert max(k or 0 for k in kernels) < local_attention.GRID
            windows.add(tuple(kernels))
    assert len(windows) == len(local_attention.ARMS) - 1  # every arm is a distinct layout
    with pytest.raises(ValueError, match="covers the 8x8"):
        local_attention.check_arm(dict(base, core_kernel_sizes=[9, 3, 0, 0, 0, 0]))
    assert local_attention.training_size("full") == 1797 - 359
    assert local_attention.training_size("10") == 10


@pytest.mark.slow  # each quick run trains several small models
@pytest.mark.parametrize(
    "name",
    [
        "convergence", "variance_matching", "ablations", "time_conditioning", "local_attention",
        "heldout_convergence",
    ],
)  # fmt: skip
def test_quick_run_writes_raw_numbers_and_plots(tmp_path, name):
    experiment = load_experiment(name)
    result = experiment.main(
        ["--quick", "--output_dir", str(tmp_path / "runs"), "--results_dir", str(tmp_path)]
    )
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert all(np.isfinite(row["fd"]) and 0 <= row["accuracy"] <= 1 for row in saved["rows"])
    assert (tmp_path / f"{name}.csv").is_file() and (tmp_path / f"{name}.png").is_file()
    if name == "local_attention":
        assert (tmp_path / "local_attention_sizes.png").is_file()
        arms = {(row["arm"], row["train_size"], row["t"]) for row in saved["rows"]}
        assert arms == {
            (arm, size, t)
            for arm in ("global", "k3 blocks 1-2")
            for size in (10, 1438)
            for t in (100, 600)
        }
        assert all(np.isfinite(row["gap"]) for row in saved["rows"])
    if name == "heldout_convergence":
        # Every arm of the seed, evaluated at each evaluation step, scored on its samples.
        assert {(row["arm"], row["step"]) for row in saved["rows"]} == {
            (arm, step) for arm in experiment.ARMS for step in (2, 4)
        }
        assert all(np.isfinite(row["heldout_loss"]) for row in saved["rows"])
        assert {row["samples"] for row in saved["runs"]} == {2 * 10}
        assert len(saved["speedups"]) == len(experiment.BASELINES)


def test_parameter_count_builds_the_family_the_config_names():
    """A DiffiT arm is counted as a DiffiT (not as a default MDiT, which ignores its keys)."""
    from diffusers_mdit.models import DiffiTTransformer2DModel

    time_conditioning = load_experiment("time_conditioning")
    common = load_experiment("common")
    recipe = common.Recipe()
    for config in time_conditioning.ARMS.values():
        extra = dict(sample_size=16, in_channels=3, out_channels=3, num_classes=10)
        settings = {k: v for k, v in config.items() if not k.startswith("_")}
        model = DiffiTTransformer2DModel(**settings, **extra)
        expected = sum(p.numel() for p in model.parameters())
        assert common.parameter_count(config, recipe) == expected
    tmsa, adaln = (common.parameter_count(c, recipe) for c in time_conditioning.ARMS.values())
    assert tmsa != adaln and abs(adaln / tmsa - 1) < 0.01


def test_update_keeps_the_other_arms_rows_only_when_made_with_the_same_settings(tmp_path):
    common = load_experiment("common")
    args = common.arm_arguments("", ["a", "b"], "ablations", ["--arms", "b", "--update"])
    rows = [
        {"arm": "a", "seed": 0, "fd": 10.0, "accuracy": 0.9},
        {"arm": "b", "seed": 0, "fd": 99.0, "accuracy": 0.1},
    ]
    earlier = {"recipe": common.recipe_dict(common.Recipe()), "rows": rows,
               "arguments": dict(vars(args), arms=["a", "b"], update=False)}  # fmt: skip
    path = tmp_path / "ablations.json"
    path.write_text(json.dumps(earlier))
    assert common.kept_rows(str(path), args, common.Recipe()) == rows[:1]
    path.write_text(json.dumps(dict(earlier, arguments=dict(earlier["arguments"], steps=5))))
    with pytest.raises(ValueError, match="another recipe"):
        common.kept_rows(str(path), args, common.Recipe())
    with pytest.raises(FileNotFoundError, match="run without it"):
        common.kept_rows(str(tmp_path / "missing.json"), args, common.Recipe())


def test_convergence_trains_and_scores_on_a_labelled_imagefolder(tmp_path):
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in range(3):
        folder = tmp_path / "images" / f"class_{label}"
        folder.mkdir(parents=True)
        for index in np.flatnonzero(digits.target == label)[:12]:
            pixels = (digits.images[index] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").save(folder / f"{index}.png")
    convergence = load_experiment("convergence")
    result = convergence.main(
        ["--quick", "--train_data_dir", str(tmp_path / "images"), "--resolution", "8",
         "--batch_size", "8", "--output_dir", str(tmp_path / "runs"),
         "--results_dir", str(tmp_path)]
    )  # fmt: skip
    assert 0 <= result["classifier_heldout_accuracy"] <= 1
    assert {row["arm"] for row in result["rows"]} == set(convergence.ARMS)
    assert all(np.isfinite(row["fd"]) and 0 <= row["accuracy"] <= 1 for row in result["rows"])
    saved = torch.load(tmp_path / "runs" / "mdit" / "seed0" / "samples-000004.pt")
    assert saved["images"].shape == (3 * 2, 3, 8, 8)  # 3 classes x 2 samples, at --resolution
    assert sorted(set(saved["labels"].tolist())) == [0, 1, 2]
    with pytest.raises(SystemExit):
        convergence.parse_args(["--resolution", "18"])
    args = convergence.parse_args(["--train_data_dir", "data/flowers/", "--resolution", "32"])
    assert args.output_dir == "outputs/experiments/convergence_flowers_32"
    assert args.results_dir == "outputs/experiments/convergence_flowers_32/results"
    assert convergence.parse_args([]).results_dir == "experiments/results"


def heldout_curve(points):
    return [{"step": step, "heldout_loss": loss} for step, loss in points]


def test_steps_to_reach_interpolates_in_log_step_and_says_when_never():
    experiment = load_experiment("heldout_convergence")
    curve = heldout_curve([(25, 1.0), (50, 0.6), (100, 0.4), (200, 0.3)])
    # 0.5 lies halfway between the losses at 50 and 100: halfway in log-step is sqrt(50 * 100).
    assert experiment.steps_to_reach(curve, 0.5) == pytest.approx((50 * 100) ** 0.5)
    assert experiment.steps_to_reach(curve, 0.4) == pytest.approx(100)
    assert experiment.steps_to_reach(curve, 2.0) == 25  # already there at the first evaluation
    assert experiment.steps_to_reach(curve, 0.1) is None


def test_heldout_speedups_pair_seeds_and_bound_what_is_not_reached():
    experiment = load_experiment("heldout_convergence")
    mdit = {
        seed: {"curve": heldout_curve([(50, 0.5), (100, 0.3)]), "train_flops_per_step": 2.0}
        for seed in (0, 1)
    }
    fast = {"curve": heldout_curve([(50, 0.6), (100, 0.5), (200, 0.4), (400, 0.3)]),
            "train_flops_per_step": 1.0}  # fmt: skip
    slow = {"curve": heldout_curve([(50, 0.9), (100, 0.8), (400, 0.6)]),
            "train_flops_per_step": 1.0}  # fmt: skip
    runs = {experiment.MDIT_ARM: mdit, "dit": {0: fast, 1: slow}}
    rows = experiment.speedups(runs, [50, 100])
    by = {(r["mdit_step"], r["seed"]): r for r in rows}
    # Seed 0: MDiT's 0.5 at step 50 is reached by the baseline at 100, 0.3 at 100 only at 400.
    assert by[50, 0]["baseline_steps"] == 100 and by[50, 0]["step_speedup"] == 2.0
    assert by[50, 0]["flop_speedup"] == pytest.approx(100 * 1.0 / (50 * 2.0))
    assert by[100, 0]["step_speedup"] == 4.0
    # Seed 1 never gets there: a lower bound of its last step over S, no speedup.
    assert by[100, 1]["step_speedup"] is None and by[100, 1]["step_speedup_lower_bound"] == 4.0
    # The other reading: MDiT reaches seed 0's final 0.3 at its step 100 (400 / 100 = 4x) and
    # seed 1's final 0.6 already at its first evaluation (step 50: 400 / 50 = 8x).
    final0, final1 = experiment.final_loss_speedups(runs)
    assert final0["mdit_steps"] == 100 and final0["step_speedup"] == pytest.approx(4.0)
    assert final0["flop_speedup"] == pytest.approx(400 * 1.0 / (100 * 2.0))
    assert final1["mdit_steps"] == 50 and final1["step_speedup"] == pytest.approx(8.0)
    summary = {s["mdit_step"]: s for s in experiment.summarise_speedups(rows)}
    assert summary[100]["step_mean"] == 4.0 and summary[100]["step_not_reached_lower_bounds"] == [
        4.0
    ]


def test_heldout_arms_are_the_paper_proportions_and_matched_baselines():
    from diffusers_mdit.models import DiTBaselineTransformer2DModel, MDiTTransformer2DModel

    experiment = load_experiment("heldout_convergence")
    mdit = experiment.build(experiment.ARMS[experiment.MDIT_ARM], 10, seed=0)
    assert isinstance(mdit, MDiTTransformer2DModel)
    config = mdit.config
    assert config.core_patch_size == 2 and 2 * config.outer_dim == config.core_dim
    assert config.num_outer_out_blocks == 2 * config.num_outer_in_blocks
    outer_heads = mdit.outer_in_blocks[0].attn.num_heads
    core_heads = mdit.core_blocks[0].attn.num_heads
    assert outer_heads >= 2 and mdit.aggregate_blocks[0].attn.num_heads == 1.5 * core_heads
    parameters, flops = experiment.cost(experiment.ARMS[experiment.MDIT_ARM])
    assert parameters == sum(p.numel() for p in mdit.parameters())
    for arm in experiment.BASELINES:
        other_parameters, other_flops = experiment.cost(experiment.ARMS[arm])
        if "FLOPs" in arm:
            assert abs(other_flops / flops - 1) < 0.05, arm
        else:
            assert abs(other_parameters / parameters - 1) < 0.05, arm
    for arm in ("DiT@params d5", "DiT@FLOPs d8"):
        dit = experiment.build(experiment.ARMS[arm], 10, seed=0)
        assert isinstance(dit, DiTBaselineTransformer2DModel) and dit.config.patch_size == 2
        assert dit.inner_dim == config.core_dim  # the core's width and token grid
    full = experiment.ARMS[experiment.MDIT_ARM]
    no_outer = experiment.ARMS["no outer level {0,0,2,3}"]
    no_aggregate = experiment.ARMS["no aggregate blocks {1,2,0,5}"]
    assert {k for k in full if no_outer[k] != full[k]} == {
        "num_outer_in_blocks", "num_outer_out_blocks", "num_core_blocks"
    }  # fmt: skip
    assert {k for k in full if no_aggregate[k] != full[k]} == {
        "num_alternating_blocks", "num_core_blocks"
    }  # fmt: skip
    # The same seed builds the same model; the data and noise generator is separate from it.
    again = experiment.build(experiment.ARMS[experiment.MDIT_ARM], 10, seed=0)
    pairs = zip(mdit.parameters(), again.parameters(), strict=True)
    assert all(bool((a == b).all()) for a, b in pairs)


def test_heldout_loss_of_an_x0_model_returning_its_input_is_the_noise_mse():
    """An x0 model whose output is its noisy input: the loss is the MSE of the forward
    process's noise at each timestep, computed here from alpha_bar."""
    import torch

    experiment = load_experiment("heldout_convergence")
    from diffusers_mdit.training.objectives import make_objective

    class Identity(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return type("Out", (), {"sample": x})()

    objective = make_objective("x0", snr_gamma=5.0)
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    losses = experiment.heldout_loss(Identity(), objective, images, None, (100, 700), seed=5)
    for t in (100, 700):
        alpha_bar = objective.noise_scheduler.alphas_cumprod[t]
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(5 + t))
        noisy = alpha_bar.sqrt() * images + (1 - alpha_bar).sqrt() * noise
        assert losses[t] == pytest.approx((noisy - images).pow(2).mean().item(), rel=1e-5)
    assert losses[700] > losses[100]  # more noise, larger error


def test_heldout_resolution_is_part_of_the_protocol_and_of_the_file_names(tmp_path):
    from dataclasses import asdict

    experiment = load_experiment("heldout_convergence")
    default = experiment.parse_args([])
    assert default.output_dir == "outputs/experiments/heldout_convergence"
    assert experiment.make_protocol(default).resolution == 16
    args = experiment.parse_args(["--resolution", "32"])
    assert args.output_dir == "outputs/experiments/heldout_convergence_32x32"
    protocol = experiment.make_protocol(args)
    assert protocol.resolution == 32 and experiment.suffix(32) == "_32x32"
    with pytest.raises(SystemExit):
        experiment.parse_args(["--resolution", "30"])  # not a multiple of 4
    # The arms' FLOPs follow the resolution (4x the pixels, more than 4x the outer attention).
    arm = experiment.ARMS[experiment.MDIT_ARM]
    assert experiment.cost(arm, 10, 32)[1] > 4 * experiment.cost(arm, 10, 16)[1]
    # A run saved before the resolution was recorded is a 16x16 run: reused at 16, not at 32.
    old = {k: v for k, v in asdict(experiment.make_protocol(default)).items() if k != "resolution"}
    path = experiment.run_path(experiment.MDIT_ARM, 0, str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({"protocol": old, "run": {"arm": "saved"}}, f)
    saved = experiment.saved_run(
        experiment.MDIT_ARM, 0, experiment.make_protocol(default), str(tmp_path)
    )
    assert saved == {"arm": "saved"}
    assert experiment.saved_run(experiment.MDIT_ARM, 0, protocol, str(tmp_path)) is None

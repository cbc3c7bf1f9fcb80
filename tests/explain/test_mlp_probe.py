"""Layer-wise MLP probes (section 4.2, appendix F.2): the probe itself on features with a known
answer, pooled block features against a direct computation, the analysis end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.explain import to_jsonable
from diffusers_mdit.explain.common import block_names, capture_outputs
from diffusers_mdit.explain.mlp_probe import (
    MLPProbeResult,
    core_region,
    mlp_probe,
    noised_inputs,
    plot_mlp_probe,
    pooled_block_features,
    stratified_split,
    train_probe,
)
from diffusers_mdit.testing import ddim_x0, tiny_mdit


def _gaussian_classes(n: int, classes: int, width: int, separation: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, width, generator=generator) * separation
    labels = torch.randint(0, classes, (n,), generator=generator)
    return means[labels] + torch.randn(n, width, generator=generator), labels


def test_probe_reads_labels_carried_by_the_features():
    x, y = _gaussian_classes(800, classes=5, width=16, separation=1.5, seed=0)
    score = train_probe(x[:400], y[:400], x[400:], y[400:], epochs=40, seed=0)
    assert score.accuracy > 0.9
    # Deterministic given the seed.
    assert train_probe(x[:400], y[:400], x[400:], y[400:], epochs=40, seed=0) == score
    # Standardisation uses the training statistics: a global shift and scale changes nothing.
    shifted = train_probe(
        x[:400] * 50 + 7, y[:400], x[400:] * 50 + 7, y[400:], epochs=40, seed=0
    ).accuracy
    assert abs(shifted - score.accuracy) < 0.02


def test_probe_is_at_chance_on_features_independent_of_the_label():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 32, generator=generator)
    y = torch.randint(0, 4, (3000,), generator=generator)
    score = train_probe(x[:1500], y[:1500], x[1500:], y[1500:], epochs=40, seed=0)
    # 1500 held out: the standard deviation of chance accuracy is about 0.011.
    assert abs(score.accuracy - 0.25) < 0.05
    assert score.train_accuracy > score.accuracy  # it did fit (memorise) the training part


def test_stratified_split_keeps_class_shares_and_is_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, test = stratified_split(labels, 0.8, seed=3)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(100))
    assert torch.bincount(labels[train]).tolist() == [40, 24, 16]
    again, _ = stratified_split(labels, 0.8, seed=3)
    other, _ = stratified_split(labels, 0.8, seed=4)
    assert torch.equal(train, again) and not torch.equal(train, other)
    with pytest.raises(ValueError, match="train_fraction"):
        stratified_split(labels, 1.0)


def test_pooled_block_features_match_a_direct_pooling_and_leave_no_hooks():
    model = tiny_mdit()
    images = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    features = pooled_block_features(model, images, timestep=0, batch_size=4, progress=False)
    blocks = dict(block_names(model))
    assert list(features) == ["outer_in.0", "core.0", "aggregate.0", "core.1", "outer_out.0"]
    assert [f.shape for f in features.values()] == [(6, 32), (6, 64), (6, 64), (6, 64), (6, 32)]
    assert all(not block._forward_hooks for block in blocks.values())
    with capture_outputs(blocks) as outputs, torch.no_grad():
        model(images, 0)
    for name, pooled in features.items():
        grid = outputs[name][0]
        expected = grid.sum((1, 2)) / (grid.shape[1] * grid.shape[2])
        torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)

    noisy = pooled_block_features(
        model, images, 500, 4, noise_seed=1, scheduler=ddim_x0(), progress=False
    )
    noisy_again = pooled_block_features(
        model, images, 500, 4, noise_seed=1, scheduler=ddim_x0(), progress=False
    )
    assert torch.equal(noisy["core.0"], noisy_again["core.0"])
    assert not torch.allclose(noisy["core.0"], features["core.0"])
    with pytest.raises(ValueError, match="is not an MDiT"):
        pooled_block_features(torch.nn.Linear(2, 2), images)


def test_noised_inputs_follow_the_schedule():
    x0, noise = torch.ones(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    assert noised_inputs(x0, noise, 0, ddim_x0()) is x0
    scheduler = ddim_x0()
    alpha = scheduler.alphas_cumprod[300]
    torch.testing.assert_close(
        noised_inputs(x0, noise, 300, scheduler), alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    )
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = FlowMatchEulerDiscreteScheduler()
    torch.testing.assert_close(noised_inputs(x0, noise, 250, flow), 0.75 * x0 + 0.25 * noise)
    with pytest.raises(ValueError, match="outside"):
        noised_inputs(x0, noise, 1000, scheduler)


def _class_mean_images(per_class: int, classes: int, seed: int = 0):
    """Images whose per-channel mean carries the class (visible after average pooling)."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn(classes, 4, 1, 1, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    images = offsets[labels] + 0.3 * torch.randn(len(labels), 4, 8, 8, generator=generator)
    return images, labels


def test_mlp_probe_end_to_end(tmp_path):
    images, labels = _class_mean_images(per_class=30, classes=3)
    labels = labels * 2 + 5  # any label values: mapped to 0..K-1
    result = mlp_probe(
        tiny_mdit(),
        images,
        labels,
        timesteps=(0, 900),
        scheduler=ddim_x0(),
        epochs=30,
        batch_size=32,
        progress=False,
    )
    assert isinstance(result, MLPProbeResult)
    assert result.accuracy.shape == result.train_accuracy.shape == (2, 5)
    assert ((result.accuracy >= 0) & (result.accuracy <= 1)).all()
    assert (result.num_train, result.num_test, result.num_classes) == (72, 18, 3)
    assert result.chance_level == pytest.approx(1 / 3)
    assert result.levels == ["outer_in", "core", "aggregate", "core", "outer_out"]
    assert result.widths == [32, 64, 64, 64, 32]
    assert result.core_region == (0.2, 0.8)
    assert result.max_accuracy == pytest.approx(result.accuracy.max(1).tolist())
    assert result.peak_block[0] == result.blocks[int(result.accuracy[0].argmax())]
    # The label is plain in the clean inputs; near-pure noise (t = 900) hides most of it.
    assert result.accuracy[0].max() > 0.9
    assert result.accuracy[1].mean() < result.accuracy[0].mean()
    json.dumps(to_jsonable(result))
    paths = plot_mlp_probe(result, str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["mlp_probe.png", "mlp_probe_timesteps.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("mlp_probe.png",))
    with pytest.raises(ValueError, match="labelled"):
        mlp_probe(tiny_mdit(), images, -torch.ones(len(images)), progress=False)


def test_core_region_spans_core_and_aggregate_blocks():
    assert core_region(["outer_in", "core", "aggregate", "core", "outer_out"]) == (0.2, 0.8)
    assert core_region(["core"] * 4) == (0.0, 1.0)
    assert core_region(["outer_in", "outer_out"]) is None


def test_cli_on_a_saved_pipeline_with_digits(tmp_path):
    from diffusers_mdit.explain.cli import main

    model = tiny_mdit(num_classes=10, in_channels=3, out_channels=3)
    MDiTPipeline(transformer=model, scheduler=ddim_x0()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    argv = [
        "mlp-probe",
        str(tmp_path / "pipe"),
        "--output_dir",
        str(out),
        "--device",
        "cpu",
        "--num_images",
        "200",
        "--timesteps",
        "0,500",
        "--epochs",
        "20",
        "--hidden",
        "64",
    ]
    assert main(argv) == 0
    written = json.loads((out / "mlp-probe.json").read_text())
    result = written["result"]
    assert result["timesteps"] == [0, 500]
    assert np.array(result["accuracy"]).shape == (2, 5)
    assert result["num_train"] + result["num_test"] == 200
    assert result["num_classes"] == 10
    assert set(written["table"]) == {"0", "500"}
    assert (out / "mlp_probe.png").is_file() and (out / "mlp_probe_timesteps.png").is_file()


def test_cli_refuses_a_dataset_without_labels(tmp_path, capsys):
    from PIL import Image

    from diffusers_mdit.explain.cli import main, run

    model = tiny_mdit(num_classes=10, in_channels=3, out_channels=3)
    MDiTPipeline(transformer=model, scheduler=ddim_x0()).save_pretrained(tmp_path / "pipe")
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    argv = [
        "mlp-probe",
        str(tmp_path / "pipe"),
        "--output_dir",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--dataset",
        str(folder),
    ]
    with pytest.raises(ValueError, match="has no labels"):
        run(argv)
    # The console script reports it as a user error, without a traceback.
    assert main(argv) == 2
    assert "mdit-explain: error: " in capsys.readouterr().err

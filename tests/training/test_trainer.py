"""The training loop: loss goes down, killed runs resume exactly, bad input is reported."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from diffusers_mdit.testing import TINY_MDIT
from diffusers_mdit.training.trainer import add_arguments, save_grid, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "training", "train_mdit.py")


def flags(tmp_path, output, model=TINY_MDIT, **extra) -> list[str]:
    config = tmp_path / f"config-{abs(hash(json.dumps(model)))}.json"
    config.write_text(json.dumps(model))
    values = dict(
        output_dir=str(output),
        model_config=str(config),
        resolution=8,
        train_batch_size=8,
        max_train_steps=12,
        checkpointing_steps=3,
        learning_rate=2e-3,
        report_to="none",
        use_ema=None,
        ema_decay=0.9,
        seed=3,
    )
    values.update(extra)
    out = []
    for key, value in values.items():
        out += [f"--{key}"] if value is None else [f"--{key}", str(value)]
    return out


def parse(argv: list[str]):
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


def test_training_reduces_the_loss_and_saves_a_loadable_pipeline(tmp_path):
    from diffusers_mdit import MDiTPipeline

    first = train(parse(flags(tmp_path, tmp_path / "a", max_train_steps=1)))
    result = train(
        parse(flags(tmp_path, tmp_path / "b", max_train_steps=40, report_to="tensorboard"))
    )
    assert result.steps == 40 and result.final_loss < first.final_loss
    assert any(name.startswith("events.") for _, _, files in os.walk(tmp_path / "b" / "logs")
               for name in files)  # fmt: skip
    pipe = MDiTPipeline.from_pretrained(result.pipeline_dir)
    assert pipe.scheduler.config.prediction_type == "sample"
    images = pipe(class_labels=[3], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 8, 8) and torch.isfinite(images).all()


def test_a_run_killed_at_an_arbitrary_step_resumes_to_identical_weights(tmp_path):
    reference = train(parse(flags(tmp_path, tmp_path / "reference")))
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *flags(tmp_path, killed, max_train_steps=10_000)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (killed / "checkpoint-6").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "checkpoint-6").exists()
    resumed = train(parse(flags(tmp_path, killed, resume_from_checkpoint="latest")))
    assert resumed.steps == reference.steps == 12
    expected, actual = weights(reference.pipeline_dir), weights(resumed.pipeline_dir)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_resolution_not_divisible_by_the_patching_is_reported(tmp_path):
    model = {**TINY_MDIT, "core_patch_size": 3}  # size multiple 6; the digits come at 8
    with pytest.raises(ValueError, match="multiple of 6"):
        train(parse(flags(tmp_path, tmp_path / "bad", model=model, max_train_steps=1)))


def test_missing_dataset_folder_is_reported(tmp_path):
    argv = flags(tmp_path, tmp_path / "bad", train_data_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="does not exist"):
        train(parse(argv))


def test_max_train_samples_trains_on_the_first_n_training_digits_and_never_the_held_out(tmp_path):
    from diffusers_mdit.data import DigitsDataset, digits_split
    from diffusers_mdit.training.trainer import build_dataset

    train_part, held = digits_split(0.2)
    args = parse(flags(tmp_path, tmp_path / "x", max_train_samples=10, held_out_fraction=0.2))
    dataset, classes = build_dataset(args, min_length=8)
    expected = DigitsDataset(resolution=8, channels=3, indices=train_part[:10])
    assert classes == 10 and torch.equal(dataset.images, expected.images)
    assert torch.equal(dataset.labels, expected.labels)
    # A subset smaller than the global batch is repeated whole.
    repeated, _ = build_dataset(args, min_length=16)
    assert torch.equal(repeated.images, expected.images.repeat(2, 1, 1, 1))
    # Without a size limit: the whole training part, none of the held-out images.
    everything, _ = build_dataset(parse(flags(tmp_path, tmp_path / "x", held_out_fraction=0.2)))
    assert len(everything) == len(train_part)
    own = DigitsDataset(resolution=8, channels=3, indices=train_part).images
    assert torch.equal(everything.images, own)
    held_images = DigitsDataset(resolution=8, channels=3, indices=held).images.flatten(1)
    assert torch.cdist(everything.images.flatten(1), held_images).min() > 0  # no image repeats
    # A 5-image run with batches of 8 trains.
    result = train(
        parse(flags(tmp_path, tmp_path / "five", max_train_samples=5, max_train_steps=2))
    )
    assert result.steps == 2


@pytest.mark.parametrize(
    "extra, match",
    [
        (dict(held_out_fraction=0.2, train_data_dir="folder"), "digits only"),
        (dict(held_out_fraction=1.5), r"\(0, 1\)"),
        (dict(max_train_samples=0), ">= 1"),
    ],
)
def test_subset_flags_report_what_they_cannot_do(tmp_path, extra, match):
    from diffusers_mdit.training.trainer import build_dataset

    with pytest.raises(ValueError, match=match):
        build_dataset(parse(flags(tmp_path, tmp_path / "x", **extra)))


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    steps = dict(max_train_steps=6, checkpointing_steps=100)
    single = train(parse(flags(tmp_path, tmp_path / "one", train_batch_size=8, **steps)))
    # accelerate runs several CPU processes (gloo) when told to use the CPU through the
    # environment; its --cpu flag alone starts a single process.
    env = {
        **os.environ,
        "PYTHONPATH": os.path.join(ROOT, "src"),
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
    }
    two = tmp_path / "two"
    argv = flags(tmp_path, two, train_batch_size=4, **steps)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    done = subprocess.run(
        [*launcher, "--num_processes", "2", "--num_machines", "1", "--main_process_port",
         "29533", "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, *argv],
        env=env, check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    loss = float(done.stdout.split("loss ")[1].split(";")[0])
    assert loss == pytest.approx(single.final_loss, rel=1e-4)
    # All-reduced gradients equal the single-process ones up to rounding, which Adam's
    # normalisation magnifies a little: measured up to 2.5e-4 after 6 steps at lr 2e-3.
    expected, actual = weights(single.pipeline_dir), weights(two)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-2, atol=5e-4)


@pytest.mark.parametrize(
    "model",
    [
        dict(_class_name="DiffiTTransformer2DModel", hidden_size=32, num_layers=1,
             num_attention_heads=2),
        dict(_class_name="DiffiTUNet2DModel", block_out_channels=(16, 32), layers_per_level=(1, 1),
             window_size=2, attention_head_dim=8, norm_num_groups=4),
    ],
)  # fmt: skip
def test_diffit_trains_and_saves_a_diffit_pipeline(tmp_path, model):
    from diffusers_mdit import DiffiTPipeline

    argv = flags(tmp_path, tmp_path / "out", model=model, max_train_steps=3, use_ema=None)
    result = train(parse(argv))
    pipe = DiffiTPipeline.from_pretrained(result.pipeline_dir)
    assert type(pipe.transformer).__name__ == model["_class_name"]
    images = pipe(class_labels=[1], num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, 8, 8)


def test_patch_regularization_needs_an_mdit(tmp_path):
    model = dict(_class_name="DiffiTTransformer2DModel", hidden_size=32, num_layers=1,
                 num_attention_heads=2)  # fmt: skip
    argv = flags(tmp_path, tmp_path / "out", model=model, patch_regularization_weight=0.1)
    with pytest.raises(ValueError, match="needs an MDiT"):
        train(parse(argv))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "stopped"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    argv = flags(tmp_path, out, max_train_steps=10_000, checkpointing_steps=1_000)
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.time() + 240
    while not out.exists() and time.time() < deadline:  # the run has set up
        time.sleep(0.05)
    time.sleep(2.0)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=240)
    assert process.returncode == 0
    step = int(stdout.split("Stopped at step ")[1].split(" ")[0])
    assert 0 < step < 10_000
    assert (out / f"checkpoint-{step}" / "training_state.json").exists()
    assert not (out / "model_index.json").exists()  # unfinished runs save no pipeline


def test_save_grid_puts_image_i_at_row_i_div_cols_with_padding(tmp_path):
    import numpy as np
    import PIL.Image

    images = torch.arange(6, dtype=torch.float32).div(10).view(6, 1, 1, 1).expand(6, 1, 3, 4)
    save_grid(images, rows=2, path=str(tmp_path / "grid.png"), padding=1)
    grid = np.asarray(PIL.Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * 4 + 1, 3 * 5 + 1)
    for i in range(6):
        r, k = divmod(i, 3)
        cell = grid[1 + r * 4 : 1 + r * 4 + 3, 1 + k * 5 : 1 + k * 5 + 4]
        assert (cell == round(i / 10 * 255)).all()
    assert (grid[0] == 128).all() and (grid[:, 0] == 128).all()  # padding


def test_data_loader_workers_change_nothing_and_resume_exactly_after_sigkill(tmp_path):
    """0 workers, 2 workers, and 2 workers killed at an arbitrary step and resumed: the same
    weights, with random flips so that augmentation is covered too."""
    common = dict(max_train_steps=8, checkpointing_steps=2, random_flip=None)
    reference = train(parse(flags(tmp_path, tmp_path / "zero", **common)))
    workers = train(parse(flags(tmp_path, tmp_path / "two", dataloader_num_workers=2, **common)))
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    argv = flags(tmp_path, killed, **{**common, "max_train_steps": 10_000})
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *argv, "--dataloader_num_workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while not (killed / "checkpoint-4").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = train(parse(flags(tmp_path, killed, resume_from_checkpoint="latest",
                                dataloader_num_workers=2, **common)))  # fmt: skip
    assert resumed.steps == reference.steps == workers.steps == 8
    expected = weights(reference.pipeline_dir)
    for other in (workers, resumed):
        actual = weights(other.pipeline_dir)
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.equal(expected[name], actual[name]), name


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    steps = dict(max_train_steps=2, checkpointing_steps=2, use_ema=None)
    eager = train(parse(flags(tmp_path, tmp_path / "eager", **steps)))
    compiled = train(parse([*flags(tmp_path, tmp_path / "compiled", **steps), "--torch_compile"]))
    assert compiled.steps == 2
    assert compiled.final_loss == pytest.approx(eager.final_loss, rel=1e-4)
    expected, actual = weights(eager.pipeline_dir), weights(compiled.pipeline_dir)
    assert expected.keys() == actual.keys()  # saved without torch.compile's prefixes
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-3, atol=1e-4)

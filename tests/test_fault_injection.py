"""Fault injection: bad inputs, files and arguments get our messages, not library tracebacks
or silent garbage (issue 22)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers_mdit.data import ImageDataset
from diffusers_mdit.data.shards import INDEX_DTYPE, LatentShardDataset
from diffusers_mdit.lora import get_lora_metadata, get_lora_state_dict, lora_config
from diffusers_mdit.models import (
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    MDiTTransformer2DModel,
)
from diffusers_mdit.pipelines.pipeline_mdit import MDiTPipeline
from diffusers_mdit.pipelines.pipeline_mdit_text2img import MDiTTextToImagePipeline
from diffusers_mdit.testing import (
    TINY_DIFFIT,
    TINY_DIFFIT_UNET,
    TINY_MDIT,
    ddim_x0,
    tiny_mdit,
    tiny_text_encoder,
)
from diffusers_mdit.training import checkpointing
from diffusers_mdit.training.checkpointing import list_checkpoints
from diffusers_mdit.training.trainer import add_arguments, train

ONE_BLOCK_DIFFIT = {**TINY_DIFFIT, "num_layers": 1}

# ============================================================================================
# Points 5 and 7: images, data folders, shards, model inputs and configs, pipeline arguments,
# LoRA files, console scripts.
# ============================================================================================

# -- images and data folders ------------------------------------------------------------------


def test_16_bit_png_keeps_its_range(tmp_path):
    # PIL's convert("RGB") clips 16-bit values at 255: every non-black pixel came out white.
    values = np.array([0, 16384, 32768, 65535], dtype=np.uint16)
    Image.fromarray(np.tile(values, (4, 1))).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    pixels = ImageDataset(train_data_dir=str(tmp_path), resolution=4)[0]["pixel_values"]
    expected = torch.tensor(values / 65535 * 2 - 1, dtype=torch.float32)
    assert pixels.shape == (3, 4, 4)
    torch.testing.assert_close(pixels, expected.expand(3, 4, 4), atol=1e-5, rtol=0)


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    dataset = ImageDataset(train_data_dir=str(tmp_path), resolution=4)
    with pytest.raises(ValueError, match="cannot be read.*broken.png.*corrupt"):
        dataset[0]


@pytest.mark.parametrize("content", ["nothing", "no images"])
def test_data_folder_without_images(tmp_path, content):
    if content == "no images":
        (tmp_path / "class_a").mkdir()
        (tmp_path / "class_a" / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="holds no images.*Put image files"):
        ImageDataset(train_data_dir=str(tmp_path))


# -- latent shards ----------------------------------------------------------------------------


def _garbage_shards(folder, fault: str) -> str:
    (folder / "shard-000000.tar").write_bytes(b"garbage" * 200)
    metadata = {"shards": ["shard-000000.tar"], "latent_shape": [4, 2, 2], "flips": False}
    (folder / "metadata.json").write_text("{oops" if fault == "metadata" else json.dumps(metadata))
    index = np.zeros(1, INDEX_DTYPE)
    index["end"] = 1024
    np.save(folder / "index.npy", np.zeros(3) if fault == "index" else index)
    return str(folder / "metadata.json") if fault == "not a shard" else str(folder)


@pytest.mark.parametrize(
    "fault, message",
    [
        ("not a shard", "is not a .tar shard"),
        ("metadata", "metadata.json' is not valid JSON"),
        ("index", "is not an index of latent shards"),
        ("shard", "truncated or corrupt"),
    ],
)
def test_garbage_train_shards(tmp_path, fault, message):
    path = _garbage_shards(tmp_path, fault)
    with pytest.raises(ValueError, match=message):
        LatentShardDataset(path)[0]


# -- model inputs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_mdit():
    return tiny_mdit(num_classes=10, cross_attention_dim=16, use_aux_conditions=True)


def test_floating_inputs_are_cast_to_the_model_dtype_integers_refused(labelled_mdit):
    x = torch.randn(2, 4, 8, 8)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        expected = labelled_mdit(x.half().float(), 10, class_labels=labels).sample
        out = labelled_mdit(x.half(), 10, class_labels=labels).sample
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="floating point tensor, got torch.int64.*float()"):
        labelled_mdit(x.long(), 10, class_labels=labels)
    diffit = DiffiTTransformer2DModel(**ONE_BLOCK_DIFFIT).eval()
    assert diffit(x.half(), 10).sample.dtype == torch.float32
    with pytest.raises(ValueError, match="floating point tensor"):
        diffit((x * 100).to(torch.uint8), 10)


@pytest.mark.parametrize("labels", [torch.tensor([1.0, 2.0]), [1, 2]])
def test_float_or_list_class_labels_refused(labelled_mdit, labels):
    with pytest.raises(ValueError, match="class_labels must be an integer tensor"):
        labelled_mdit(torch.randn(2, 4, 8, 8), 10, class_labels=labels)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (dict(timestep=torch.tensor([1, 2, 3])), "timestep must be a scalar or hold one value"),
        (
            dict(encoder_hidden_states=torch.randn(3, 5, 16)),
            "encoder_hidden_states has shape .3, 5, 16. but hidden_states has a batch of 2",
        ),
        (
            dict(
                encoder_hidden_states=torch.randn(2, 5, 16), encoder_attention_mask=torch.ones(3, 5)
            ),
            r"encoder_attention_mask must be \(batch, tokens\) = \(2, 5\)",
        ),
        (dict(encoder_attention_mask=torch.ones(2, 5)), "without encoder_hidden_states"),
        (dict(image_scale=torch.ones(3)), r"image_scale must have shape \(2,\)"),
    ],
)
def test_mismatched_batch_sizes(labelled_mdit, inputs, message):
    inputs = {"timestep": 10, **inputs}
    with pytest.raises(ValueError, match=message):
        labelled_mdit(torch.randn(2, 4, 8, 8), **inputs)


# -- configs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, base, name, value",
    [
        (MDiTTransformer2DModel, TINY_MDIT, "attention_head_dim", 0),
        (MDiTTransformer2DModel, TINY_MDIT, "core_patch_size", 0),
        (MDiTTransformer2DModel, TINY_MDIT, "core_dim", 0),
        (MDiTTransformer2DModel, TINY_MDIT, "in_channels", -2),
        (MDiTTransformer2DModel, TINY_MDIT, "ffn_mult", 0),
        (DiffiTTransformer2DModel, ONE_BLOCK_DIFFIT, "sample_size", 0),
        (DiffiTTransformer2DModel, ONE_BLOCK_DIFFIT, "patch_size", 0),
        (DiffiTTransformer2DModel, ONE_BLOCK_DIFFIT, "hidden_size", 0),
        (DiffiTTransformer2DModel, ONE_BLOCK_DIFFIT, "window_size", 0),
        (DiffiTUNet2DModel, TINY_DIFFIT_UNET, "attention_head_dim", 0),
        (DiffiTUNet2DModel, TINY_DIFFIT_UNET, "norm_num_groups", 0),
        (DiffiTUNet2DModel, TINY_DIFFIT_UNET, "window_size", -4),
    ],
)
def test_zero_or_negative_config_sizes(cls, base, name, value):
    with pytest.raises(ValueError, match=rf"{name}(\[0\])? must be a (positive integer|finite)"):
        cls(**{**base, name: value})


def test_empty_or_negative_unet_levels():
    with pytest.raises(ValueError, match="block_out_channels is empty"):
        DiffiTUNet2DModel(**{**TINY_DIFFIT_UNET, "block_out_channels": (), "layers_per_level": ()})
    with pytest.raises(ValueError, match="layers_per_level entries must be >= 0"):
        DiffiTUNet2DModel(**{**TINY_DIFFIT_UNET, "layers_per_level": (1, -1)})


@pytest.mark.parametrize("name", ["outer_kernel_size", "core_kernel_size"])
@pytest.mark.parametrize("kernel", [4, 0, -3])
def test_even_zero_or_negative_kernels_refused_at_build(name, kernel):
    with pytest.raises(ValueError, match=f"{name} must be an odd positive kernel size"):
        MDiTTransformer2DModel(**{**TINY_MDIT, name: kernel})


def test_even_kernel_refused_when_switching_core_attention():
    with pytest.raises(ValueError, match="kernel_size must be an odd positive kernel size"):
        tiny_mdit().set_core_attention("neighborhood", 4)


# -- pipeline arguments -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_pipeline():
    pipe = MDiTPipeline(tiny_mdit(num_classes=10, in_channels=3), ddim_x0())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(num_inference_steps=2.5), "num_inference_steps must be an integer, got 2.5"),
        (dict(height=-8), "height must be a positive integer of pixels, got -8"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(batch_size=3), "Give class_labels or batch_size, not both"),
        (dict(class_labels=[1.5]), "class_labels must be integer class ids"),
        (dict(class_labels=[]), "class_labels is empty"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
        (dict(core_patch_schedule=1.5), r"core_patch_schedule .* must lie in \[0, 1\]"),
        (dict(core_patch_schedule=-0.5), r"core_patch_schedule .* must lie in \[0, 1\]"),
    ],
)
def test_pipeline_arguments(pixel_pipeline, arguments, message):
    arguments = {"class_labels": [1], "num_inference_steps": 1, "output_type": "np", **arguments}
    with pytest.raises(ValueError, match=message):
        pixel_pipeline(**arguments)


@pytest.mark.parametrize("prompt", [[], None, [1]])
def test_text_pipeline_prompts(prompt):
    encoder, tokenizer = tiny_text_encoder()
    model = tiny_mdit(cross_attention_dim=32, in_channels=3)
    pipe = MDiTTextToImagePipeline(model, ddim_x0(), encoder, tokenizer)
    with pytest.raises(ValueError, match="prompt must (be a string or a non-empty list|hold only)"):
        pipe(prompt=prompt, num_inference_steps=1, output_type="np")


# -- LoRA files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    pipe = MDiTPipeline(tiny_mdit(), ddim_x0())
    pipe.transformer.add_adapter(lora_config(rank=4))
    folder = tmp_path_factory.mktemp("lora")
    pipe.save_lora_weights(
        folder,
        transformer_lora_layers=get_lora_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=get_lora_metadata(pipe.transformer),
    )
    return folder


def test_lora_of_other_widths(lora_folder):
    pipe = MDiTPipeline(tiny_mdit(outer_dim=48, core_dim=96), ddim_x0())
    with pytest.raises(ValueError, match="LoRA weight .* has shape .* other widths"):
        pipe.load_lora_weights(lora_folder)


def test_truncated_lora_file(lora_folder, tmp_path):
    data = (lora_folder / "pytorch_lora_weights.safetensors").read_bytes()
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(data[: len(data) // 2])
    pipe = MDiTPipeline(tiny_mdit(), ddim_x0())
    with pytest.raises(ValueError, match="cannot be read .* truncated or corrupt"):
        pipe.load_lora_weights(tmp_path)


# -- console scripts --------------------------------------------------------------------------


def test_console_scripts_print_user_errors_without_traceback(tmp_path, capsys):
    from diffusers_mdit.cli import sizes
    from diffusers_mdit.evaluation.cli import main as evaluate
    from diffusers_mdit.explain.cli import main as explain

    assert sizes(["--preset", "MDiT-S", "--resolution", "18", "--no_table"]) == 2
    assert capsys.readouterr().err.startswith("mdit-sizes: error: Height and width must be")
    assert explain(["spectrum", str(tmp_path / "missing"), "--output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("mdit-explain: error: ")
    # A folder that is no model: the message must not name train_mdit.py's flag.
    argv = ["generate", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--num_samples", "1"]
    assert evaluate(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("mdit-eval generate: error: ") and "neither model_index.json" in error
    assert "--pretrained_model_name_or_path" not in error


# ============================================================================================


# ============================================================================================
# Points 1-4 and 6: no pickle in or from checkpoints, settings checked on resume, SIGTERM under
# accelerate launch, incomplete weights, full disks and atomic pruning / pipeline saves.
# ============================================================================================

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, "training", "train_mdit.py")


def run_flags(tmp_path, output, **extra) -> list[str]:
    config = tmp_path / "tiny-mdit.json"
    config.write_text(json.dumps(TINY_MDIT))
    values = dict(output_dir=output, model_config=config, resolution=8, train_batch_size=8,
                  max_train_steps=3, checkpointing_steps=3, learning_rate=2e-3,
                  report_to="none", use_ema=None, ema_decay=0.9, seed=3)  # fmt: skip
    values.update(extra)
    argv = []
    for key, value in values.items():
        argv += [f"--{key}"] if value is None else [f"--{key}", str(value)]
    return argv


def run(tmp_path, output, **extra):
    import argparse

    return train(
        add_arguments(argparse.ArgumentParser()).parse_args(run_flags(tmp_path, output, **extra))
    )


class _Payload:
    """Unpickling this writes a marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_ema_checkpoints_hold_no_pickle_and_a_planted_pickle_is_refused(tmp_path):
    run(tmp_path, tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoint-3"
    files = sorted(os.listdir(checkpoint))
    assert all(name.endswith((".safetensors", ".json")) for name in files), files
    assert "ema.safetensors" in files  # the EMA is saved, as tensors
    marker = tmp_path / "code-ran"
    with open(checkpoint / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(ValueError, match=r"pickle files \(custom_checkpoint_0.pkl\)"):
        run(tmp_path, tmp_path / "run", max_train_steps=4, resume_from_checkpoint="latest")
    assert not marker.exists()


@pytest.mark.parametrize(
    "changed, flag",
    [
        (dict(train_batch_size=4), "global batch"),
        (dict(prediction_type="epsilon"), "--prediction_type 'x0' -> 'epsilon'"),
        (dict(resolution=16), "--resolution 8 -> 16"),
        (dict(seed=4), "--seed 3 -> 4"),
    ],
)
def test_resume_refuses_settings_that_break_exactness(tmp_path, changed, flag):
    run(tmp_path, tmp_path / "run")
    with pytest.raises(
        ValueError, match=f"Cannot resume .* {flag}".replace("(", r"\(").replace(")", r"\)")
    ):
        run(
            tmp_path,
            tmp_path / "run",
            max_train_steps=4,
            resume_from_checkpoint="latest",
            **changed,
        )


def _optimizer_learning_rate(checkpoint) -> float:
    tree = json.loads((checkpoint / "optimizer.json").read_text())
    state = checkpointing._decode(tree, load_file(checkpoint / "optimizer.safetensors"))
    return state["param_groups"][0]["lr"]


def test_resume_applies_and_logs_a_new_learning_rate(tmp_path, capsys):
    run(tmp_path, tmp_path / "run", max_train_steps=3)
    assert _optimizer_learning_rate(tmp_path / "run" / "checkpoint-3") == 2e-3
    result = run(tmp_path, tmp_path / "run", max_train_steps=5, checkpointing_steps=5,
                 learning_rate=5e-4, resume_from_checkpoint="latest")  # fmt: skip
    assert result.steps == 5
    assert _optimizer_learning_rate(tmp_path / "run" / "checkpoint-5") == 5e-4
    assert "--learning_rate 0.0005 (the checkpoint's run had 0.002)" in capsys.readouterr().out
    settings = json.loads((tmp_path / "run" / "checkpoint-5" / "training_state.json").read_text())
    assert settings["settings"]["learning_rate"] == 5e-4


def _processes_with(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigterm_to_accelerate_launch_saves_a_checkpoint(tmp_path):
    out = tmp_path / "launched"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1"}
    argv = run_flags(tmp_path, out, max_train_steps=100_000, checkpointing_steps=100_000)
    log = tmp_path / "log.txt"
    with open(log, "w") as stderr:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             TRAIN_SCRIPT, *argv],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    deadline = time.time() + 300
    while "it/s" not in log.read_text() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # until the trainer has set up (its progress bar appears)
    assert launcher.poll() is None, log.read_text()[-3000:]
    trainer = [pid for pid in _processes_with(str(out)) if pid != launcher.pid]
    assert trainer, "the trainer is not running"
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=60)  # accelerate's launcher itself dies of the signal
    while _processes_with(str(out)) and time.time() < deadline:  # the trainer saves and exits
        time.sleep(0.1)
    assert not _processes_with(str(out)), "the trainer kept running after its launcher died"
    checkpoints = list_checkpoints(str(out))
    assert len(checkpoints) == 1 and checkpoints[0][0] > 0
    assert not (out / "model_index.json").exists()


@pytest.mark.slow
def test_sigterm_to_a_two_process_launch_stops_both_after_the_same_step_and_saves(tmp_path):
    """torchrun (accelerate launch --multi_gpu) forwards SIGTERM to every process; the stop is
    all-reduced, so both leave the loop after the same step and write one checkpoint together."""
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}  # fmt: skip
    argv = run_flags(tmp_path, out, train_batch_size=4, max_train_steps=100_000,
                     checkpointing_steps=100_000)  # fmt: skip
    log = tmp_path / "log.txt"
    with open(log, "w") as stderr:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
             "--num_processes", "2", "--num_machines", "1", "--main_process_port", "29541",
             "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN_SCRIPT, *argv],
            env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
    deadline = time.time() + 300
    while "it/s" not in log.read_text() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.2)  # until training runs (the progress bar appears)
    time.sleep(2.0)
    assert launcher.poll() is None, log.read_text()[-3000:]
    launcher.send_signal(signal.SIGTERM)
    stdout, _ = launcher.communicate(timeout=120)
    assert stdout.count("Stopped at step") == 2, (stdout, log.read_text()[-3000:])
    steps = {int(line.split("Stopped at step ")[1].split(" ")[0])
             for line in stdout.splitlines() if "Stopped at step" in line}  # fmt: skip
    assert len(steps) == 1  # both processes stopped after the same step
    checkpoints = list_checkpoints(str(out))
    assert [step for step, _ in checkpoints] == list(steps)
    assert sorted(os.listdir(checkpoints[0][1])) == sorted(
        ["model.safetensors", "optimizer.json", "optimizer.safetensors", "lr_scheduler.json",
         "lr_scheduler.safetensors", "ema.json", "ema.safetensors", "rng-0.json",
         "rng-0.safetensors", "rng-1.json", "rng-1.safetensors", "training_state.json"]
    )  # fmt: skip


def test_sigterm_to_the_whole_process_group_with_loader_workers_saves_and_exits_0(tmp_path):
    """Schedulers that signal every process of the job (``scancel``, ``kill -TERM -<pgid>``)
    also hit the DataLoader workers; they must leave the stop to the trainer."""
    out = tmp_path / "group"
    argv = run_flags(tmp_path, out, max_train_steps=100_000, checkpointing_steps=100_000)
    log = tmp_path / "log.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, TRAIN_SCRIPT, *argv, "--dataloader_num_workers", "2"],
            env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")},
            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
        )  # fmt: skip
    deadline = time.time() + 300
    while "it/s" not in log.read_text() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3.0)  # a few steps, with the workers prefetching
    assert process.poll() is None, log.read_text()[-3000:]
    os.killpg(process.pid, signal.SIGTERM)
    stdout, _ = process.communicate(timeout=240)
    assert process.returncode == 0, log.read_text()[-3000:]
    step = int(stdout.split("Stopped at step ")[1].split(" ")[0])
    assert [s for s, _ in list_checkpoints(str(out))] == [step]


@pytest.mark.parametrize("damage", ["missing", "mis-shaped"])
def test_from_pretrained_refuses_incomplete_weights(tmp_path, damage):
    from diffusers_mdit import MDiTTransformer2DModel

    tiny_mdit().save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[3]
    if damage == "missing":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(tensors[name].numel() + 1)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{damage} \\(1\\): {name}"):
        MDiTTransformer2DModel.from_pretrained(
            tmp_path, low_cpu_mem_usage=False, ignore_mismatched_sizes=True
        )
    if damage == "missing":  # diffusers' default path too (it leaves the tensor on meta)
        with pytest.raises(ValueError, match=name):
            MDiTTransformer2DModel.from_pretrained(tmp_path)


@pytest.fixture
def saved_once(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    objects = dict(model=model, optimizer=optimizer)
    checkpointing.save_checkpoint(accelerator, str(tmp_path), 1, objects)
    return accelerator, objects


def test_a_full_disk_is_reported_before_writing(tmp_path, saved_once, monkeypatch):
    accelerator, objects = saved_once
    usage = checkpointing.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda _: usage._replace(free=2**20))
    with pytest.raises(OSError, match="Not enough disk space for checkpoint-2"):
        checkpointing.save_checkpoint(accelerator, str(tmp_path), 2, objects)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]


def test_a_write_failing_with_enospc_removes_its_folder(tmp_path, saved_once, monkeypatch):
    accelerator, objects = saved_once

    def disk_full(tensors, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "save_file", disk_full)
    with pytest.raises(OSError, match="Could not write checkpoint-2 .*No space left on device"):
        checkpointing.save_checkpoint(accelerator, str(tmp_path), 2, objects)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(
    tmp_path, saved_once, monkeypatch
):
    accelerator, objects = saved_once
    real_rmtree = checkpointing.shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        # Delete everything but the state file, then die: what a SIGKILL during rmtree leaves.
        for name in os.listdir(path):
            if name != checkpointing.STATE_FILE:
                os.remove(os.path.join(path, name))
        raise KeyboardInterrupt("killed while pruning")

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(accelerator, str(tmp_path), 2, objects, total_limit=1)
    monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2]
    checkpointing.load_checkpoint(accelerator, str(tmp_path / "checkpoint-2"), objects)


def test_a_failed_pipeline_save_leaves_no_partial_pipeline(tmp_path, monkeypatch):
    from diffusers import DDIMScheduler

    from diffusers_mdit import MDiTPipeline
    from diffusers_mdit.training.trainer import save_final

    pipe = MDiTPipeline(transformer=tiny_mdit(), scheduler=DDIMScheduler())
    real = type(pipe.transformer).save_pretrained

    def disk_full(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)  # the weights are written, then the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(pipe.transformer), "save_pretrained", disk_full)
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(OSError, match="Could not save the pipeline .*No space left on device"):
        save_final(pipe, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3"]
    monkeypatch.undo()
    save_final(pipe, str(tmp_path))
    assert MDiTPipeline.from_pretrained(tmp_path).transformer is not None


def test_an_odd_resolution_on_an_image_folder_names_the_flag_not_shards(tmp_path):
    folder = tmp_path / "images" / "cat"
    folder.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match=r"^--resolution 18 must be a multiple of") as error:
        run(tmp_path, tmp_path / "run", train_data_dir=tmp_path / "images", resolution=18,
            train_batch_size=2)  # fmt: skip
    assert "shard" not in str(error.value)


def test_the_training_script_reports_user_errors_without_a_traceback(tmp_path):
    argv = run_flags(tmp_path, tmp_path / "run", train_data_dir=tmp_path / "missing")
    done = subprocess.run(
        [sys.executable, TRAIN_SCRIPT, *argv],
        env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert "error: " in done.stderr and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr

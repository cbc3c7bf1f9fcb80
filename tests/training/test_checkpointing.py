"""Atomic checkpoints, retention, resume resolution, deterministic batches."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from diffusers_mdit.training.checkpointing import (
    batch_indices,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    step_generator,
)


def build():
    """An accelerator-prepared model with an optimizer, a warm-up schedule and an EMA."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    schedule = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=5)
    ema = EMAModel(model.parameters(), decay=0.9)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    return accelerator, dict(model=model, optimizer=optimizer, lr_scheduler=schedule, ema=ema)


@pytest.fixture
def setup():
    """An accelerator-prepared model and optimizer, no schedule (the rate stays 0.1)."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def objects(model, optimizer):
    return {"model": model, "optimizer": optimizer}


def train_step(model, optimizer):
    loss = model(torch.ones(4, 3)).square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_load_round_trip_and_retention(setup, tmp_path):
    accelerator, model, optimizer = setup
    for step in (1, 2, 3):
        train_step(model, optimizer)
        save_checkpoint(
            accelerator, str(tmp_path), step, objects(model, optimizer), {"epoch": 0}, 2
        )
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 3]
    weights = model.weight.detach().clone()
    train_step(model, optimizer)
    assert not torch.equal(model.weight, weights)
    latest = resolve_checkpoint(str(tmp_path), "latest")
    state = load_checkpoint(accelerator, latest, objects(model, optimizer))
    assert state["step"] == 3 and state["epoch"] == 0
    assert torch.equal(model.weight, weights)
    assert sorted(os.listdir(latest)) == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "rng-0.json",
        "rng-0.safetensors", "training_state.json",
    ]  # fmt: skip


def test_checkpoint_state_round_trips_exactly(tmp_path):
    """Optimizer, schedule and EMA come back identical (tensors bit for bit, the rest equal)."""
    accelerator, saved = build()
    for _ in range(2):
        saved["model"](torch.ones(4, 3)).square().mean().backward()
        saved["optimizer"].step()
        saved["lr_scheduler"].step()
        saved["ema"].step(saved["model"].parameters())
    torch.manual_seed(5)
    save_checkpoint(accelerator, str(tmp_path), 2, saved)
    expected_draw = torch.rand(3)
    _, loaded = build()
    load_checkpoint(accelerator, str(tmp_path / "checkpoint-2"), loaded)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG state came back
    a, b = saved["optimizer"].state_dict(), loaded["optimizer"].state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index in a["state"]:
        for key, value in a["state"][index].items():
            assert torch.equal(value, b["state"][index][key])
    assert saved["lr_scheduler"].state_dict() == loaded["lr_scheduler"].state_dict()
    ema_a, ema_b = saved["ema"].state_dict(), loaded["ema"].state_dict()
    for x, y in zip(ema_a.pop("shadow_params"), ema_b.pop("shadow_params"), strict=True):
        assert torch.equal(x, y)
    assert ema_a == ema_b


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
    from diffusers_mdit.training import checkpointing

    accelerator, model, optimizer = setup
    save_checkpoint(accelerator, str(tmp_path), 1, objects(model, optimizer))

    def crash(tensors, path, *args, **kwargs):
        with open(path, "w") as f:
            f.write("half a file")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpointing, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, str(tmp_path), 2, objects(model, optimizer))
    assert resolve_checkpoint(str(tmp_path), "latest").endswith("checkpoint-1")
    assert not os.path.exists(tmp_path / "checkpoint-2.tmp")  # an interrupted save cleans up
    monkeypatch.undo()
    # What a SIGKILL leaves (no chance to clean up) is removed by the next save.
    os.makedirs(tmp_path / "checkpoint-2.tmp")
    os.makedirs(tmp_path / "checkpoint-0.deleting")
    save_checkpoint(accelerator, str(tmp_path), 3, objects(model, optimizer))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-3"]


def test_resolve_checkpoint(tmp_path):
    assert resolve_checkpoint(str(tmp_path), None) is None
    assert resolve_checkpoint(str(tmp_path), "latest") is None  # fresh run
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_checkpoint(str(tmp_path), str(tmp_path / "checkpoint-7"))


def test_batches_are_a_function_of_the_step_and_cover_each_epoch_once():
    epoch = [batch_indices(10, 3, step, seed=1) for step in range(3)]
    flat = [i for batch in epoch for i in batch]
    assert len(set(flat)) == 9  # 10 // 3 batches, the incomplete one dropped
    assert batch_indices(10, 3, 1, seed=1) == epoch[1]
    assert batch_indices(10, 3, 3, seed=1) != batch_indices(10, 3, 0, seed=1)  # next epoch
    with pytest.raises(ValueError, match="larger than the dataset"):
        batch_indices(2, 3, 0, 1)


def test_step_generators_are_independent_of_history():
    a = torch.randn(3, generator=step_generator(0, 5))
    step_generator(0, 4).manual_seed(123)
    assert torch.equal(a, torch.randn(3, generator=step_generator(0, 5)))
    assert not torch.equal(a, torch.randn(3, generator=step_generator(0, 5, process_index=1)))

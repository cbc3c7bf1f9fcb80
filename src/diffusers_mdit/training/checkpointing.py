"""Never lose work: atomic checkpoints with a retention limit, and batches that are a pure
function of the step, so a resumed run sees exactly the data and noise it would have seen.

A checkpoint is ``output_dir/checkpoint-<step>/``: accelerate's ``save_state`` (model,
optimizer, LR scheduler, registered objects such as the EMA, RNG states) plus
``training_state.json`` (step and anything else the script adds). It is written into
``checkpoint-<step>.tmp`` and renamed into place only when complete: a crash while saving
leaves the previous checkpoint as the latest one, and leftover ``.tmp`` folders are ignored
and cleaned up by the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch

STATE_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint folder to resume from: ``"latest"`` (``None`` if there is none yet, so
    a fresh run can always pass it), or an explicit path, which must exist."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    if not os.path.isfile(os.path.join(resume_from_checkpoint, STATE_FILE)):
        raise ValueError(
            f"{resume_from_checkpoint!r} is not a complete checkpoint (no {STATE_FILE}); pass a "
            "checkpoint-<step> folder or 'latest'."
        )
    return resume_from_checkpoint


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    state: dict[str, Any] | None = None,
    total_limit: int | None = None,
) -> str:
    """Write checkpoint ``step`` atomically and keep at most ``total_limit`` checkpoints.

    Every process must call it (accelerate gathers sharded states); only the main process
    renames and prunes.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    if accelerator.is_main_process:
        with open(os.path.join(partial, STATE_FILE), "w") as f:
            json.dump({"step": step, **(state or {})}, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        for name in os.listdir(output_dir):
            if name.endswith(".tmp") and name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        if total_limit is not None and total_limit > 0:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str) -> dict[str, Any]:
    """Restore accelerate's state from ``path``; returns its ``training_state.json``."""
    accelerator.load_state(path)
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def step_generator(seed: int, step: int, process_index: int = 0) -> torch.Generator:
    """The generator of one training step on one process: noise, timesteps and dropout drawn
    from it depend only on (seed, step, process), never on what ran before."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + process_index)


def batch_indices(dataset_size: int, global_batch_size: int, step: int, seed: int) -> list[int]:
    """Dataset indices of global batch ``step``.

    Epoch ``e`` is a permutation drawn from ``seed`` and ``e``; incomplete last batches are
    dropped. In distributed training every process computes the same global batch and loads
    its own slice of it.
    """
    if global_batch_size > dataset_size:
        raise ValueError(
            f"The global batch ({global_batch_size}) is larger than the dataset "
            f"({dataset_size} items); lower --train_batch_size."
        )
    per_epoch = dataset_size // global_batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * global_batch_size : (position + 1) * global_batch_size].tolist()

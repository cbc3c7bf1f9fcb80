"""Never lose work, never run a checkpoint's code: atomic pickle-free checkpoints with a
retention limit, checked settings on resume, and batches that are a pure function of the step,
so a resumed run sees exactly the data and noise it would have seen.

A checkpoint is ``output_dir/checkpoint-<step>/``:

- ``<name>.safetensors`` for every module handed to :func:`save_checkpoint` (the model);
- ``<name>.safetensors`` + ``<name>.json`` for every other object with ``state_dict()`` (the
  optimizer, LR scheduler, EMA, gradient scaler): its tensors, and the rest of its state as
  JSON with references to them;
- ``rng-<process>.safetensors`` + ``rng-<process>.json``: torch (CPU, CUDA), Python and NumPy
  random states of each process;
- ``training_state.json``, written last: the step, the run's settings and anything the script
  adds. A folder without it is not a checkpoint.

Why not accelerate's ``save_state``: it pickles the optimizer, scheduler, RNG states and
registered objects, and ``load_state`` unpickles them with ``weights_only=False``, so a
checkpoint folder from anywhere could run code when resumed. Nothing here unpickles: a
checkpoint holding a pickle file (``.pkl``, ``.bin``, ...) is refused.

Writes go to ``checkpoint-<step>.tmp``, renamed into place only when complete; the free disk
space is checked first, and a failed write removes its folder. Old checkpoints are pruned by
renaming them to ``checkpoint-<step>.deleting`` (atomic) before deleting, so a kill during
pruning never leaves a half-deleted folder that counts as a checkpoint. Leftover ``.tmp`` and
``.deleting`` folders (from a SIGKILL) are removed by the next save.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "training_state.json"
FORMAT_VERSION = 2  # 1: accelerate's pickled save_state (refused)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_LEFTOVER = re.compile(r"^checkpoint-\d+\.(tmp|deleting)$")
# Room beyond the tensors themselves: JSON files, safetensors headers, filesystem blocks.
_DISK_MARGIN = 1.05
_DISK_SLACK = 16 * 2**20

# Settings that may change when a run is resumed: the learning rate (applied from the resumed
# step on, e.g. to recover from a non-finite loss), the length of the run, and bookkeeping that
# does not touch what a step computes. Every other recorded setting must match.
RESUMABLE_SETTINGS = frozenset(
    {
        "learning_rate",
        "max_train_steps",
        "train_batch_size",  # with the same global batch (its own, checked setting)
        "checkpointing_steps",
        "checkpoints_total_limit",
        "resume_from_checkpoint",
        "output_dir",
        "validation_steps",
        "num_validation_steps",
        "validation_prompts",
        "report_to",
        "push_to_hub",
        "hub_model_id",
        "dataloader_num_workers",
    }
)


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed as asked (refused file, changed settings, damage)."""


# -- listing ------------------------------------------------------------------------------------


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


def remove_leftovers(output_dir: str) -> None:
    """Delete the ``.tmp`` and ``.deleting`` folders a killed save or prune left behind."""
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if _LEFTOVER.match(name):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def _delete_atomically(path: str) -> None:
    """Take ``path`` out of the checkpoint list in one rename, then delete it."""
    doomed = path + ".deleting"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


# -- state trees: JSON with tensors on the side ------------------------------------------------


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """``value`` as JSON, its tensors moved to ``tensors`` under their path in the tree."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        items = [[_encode(k, tensors, f"{path}/key"), _encode(v, tensors, f"{path}/{k}")]
                 for k, v in value.items()]  # fmt: skip
        return {"__items__": items}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"Cannot checkpoint {type(value).__name__} at {path!r}: only tensors, numbers, strings, "
        "lists, tuples and dicts are stored (safetensors + JSON, never pickle)."
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return value


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path} is missing or not valid JSON ({error}): the checkpoint is damaged; resume "
            "from an earlier checkpoint-<step> folder."
        ) from error


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def _payload(accelerator, objects: dict[str, Any]) -> dict[str, tuple[Any, dict]]:
    """What each object writes: ``name -> (json tree or None, tensors)``."""
    out = {}
    for name, obj in objects.items():
        if isinstance(obj, torch.nn.Module):
            out[name] = (None, dict(accelerator.unwrap_model(obj).state_dict()))
        else:
            tensors: dict[str, torch.Tensor] = {}
            out[name] = (_encode(obj.state_dict(), tensors, name), tensors)
    return out


def _state_bytes(accelerator, objects: dict[str, Any]) -> int:
    """Bytes of the tensors a checkpoint of ``objects`` holds, counted without copying."""

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return sum(
        walk((accelerator.unwrap_model(o) if isinstance(o, torch.nn.Module) else o).state_dict())
        for o in objects.values()
    )


def check_disk_space(folder: str, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes into ``folder`` when the disk cannot hold them."""
    free = shutil.disk_usage(folder).free
    if free < needed * _DISK_MARGIN + _DISK_SLACK:
        raise OSError(
            f"Not enough disk space for {what}: it needs about {needed / 2**20:.0f} MiB and "
            f"{free / 2**20:.0f} MiB are free in {folder}. Free some space (or lower "
            "--checkpoints_total_limit, or choose another --output_dir) and resume with "
            "--resume_from_checkpoint latest; the last complete checkpoint is kept."
        )


def _check_distribution(accelerator) -> None:
    kind = str(getattr(accelerator, "distributed_type", "")).upper()
    if "FSDP" in kind or "DEEPSPEED" in kind:
        raise NotImplementedError(
            "The trainer's checkpoints hold full (unsharded) states; FSDP and DeepSpeed are not "
            "supported. Train with DDP (accelerate launch --multi_gpu)."
        )


# -- save / load --------------------------------------------------------------------------------


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    objects: dict[str, Any],
    state: dict[str, Any] | None = None,
    total_limit: int | None = None,
) -> str:
    """Write checkpoint ``step`` atomically and keep at most ``total_limit`` checkpoints.

    ``objects``: name -> module or object with ``state_dict()`` (the model, optimizer, LR
    scheduler, EMA); accelerate's gradient scaler is added when mixed precision uses one.
    ``state``: JSON-able values stored in ``training_state.json`` (the run's settings, ...).
    Every process must call it: each writes its RNG state; the main process writes the rest,
    renames and prunes. Raises ``OSError`` before writing anything when the disk is too full.
    """
    _check_distribution(accelerator)
    objects = dict(objects)
    if getattr(accelerator, "scaler", None) is not None:
        objects["grad_scaler"] = accelerator.scaler
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".tmp"
    main = accelerator.is_main_process
    if main:
        os.makedirs(output_dir, exist_ok=True)
        remove_leftovers(output_dir)
    accelerator.wait_for_everyone()
    # Every process checks (one shared disk), so all fail together instead of some waiting.
    check_disk_space(output_dir, _state_bytes(accelerator, objects), f"checkpoint-{step}")
    payload = _payload(accelerator, objects) if main else {}
    rng_tensors: dict[str, torch.Tensor] = {}
    rng_tree = _encode(_rng_state(), rng_tensors, "rng")
    try:
        if main:
            os.makedirs(partial)
        accelerator.wait_for_everyone()
        rank = accelerator.process_index
        save_file(rng_tensors, os.path.join(partial, f"rng-{rank}.safetensors"))
        _write_json(os.path.join(partial, f"rng-{rank}.json"), rng_tree)
        if main:
            for name, (tree, tensors) in payload.items():
                save_file(tensors, os.path.join(partial, f"{name}.safetensors"))
                if tree is not None:
                    _write_json(os.path.join(partial, f"{name}.json"), tree)
        accelerator.wait_for_everyone()
        if main:
            record = {"step": step, "format": FORMAT_VERSION, "objects": sorted(objects)}
            _write_json(os.path.join(partial, STATE_FILE), {**record, **(state or {})})
    except BaseException as error:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            raise OSError(
                f"Could not write checkpoint-{step} in {output_dir} ({error.strerror or error}); "
                "its partial folder was removed and the last complete checkpoint is kept. Fix "
                "the cause (disk space, permissions) and resume with --resume_from_checkpoint "
                "latest."
            ) from error
        raise
    if main:
        if os.path.isdir(final):
            _delete_atomically(final)
        os.replace(partial, final)
        if total_limit is not None and total_limit > 0:
            for _, path in list_checkpoints(output_dir)[:-total_limit]:
                _delete_atomically(path)
    accelerator.wait_for_everyone()
    return final


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{path} is missing or not a readable safetensors file ({error}): the checkpoint "
            "is damaged; resume from an earlier checkpoint-<step> folder."
        ) from error


def load_checkpoint(accelerator, path: str, objects: dict[str, Any]) -> dict[str, Any]:
    """Restore ``objects`` (as given to :func:`save_checkpoint`) and this process's random
    states from ``path``; returns its ``training_state.json``. Refuses folders with pickle
    files, checkpoints of another format and modules whose tensors do not match."""
    _check_distribution(accelerator)
    pickles = sorted(n for n in os.listdir(path) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{path} holds pickle files ({', '.join(pickles)}), which can run arbitrary code "
            "when loaded; diffusers-mdit never unpickles checkpoint files. Checkpoints of "
            "diffusers-mdit are safetensors + JSON (accelerate's pickled save_state format of "
            "older versions is not resumable): start a new run, or delete the pickle files if "
            "you wrote them yourself and the folder is otherwise complete."
        )
    state = _read_json(os.path.join(path, STATE_FILE))
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state.get('format', 1)}; this version reads format "
            f"{FORMAT_VERSION} only. Start a new run (in another --output_dir)."
        )
    objects = dict(objects)
    if getattr(accelerator, "scaler", None) is not None:
        objects["grad_scaler"] = accelerator.scaler
    stored = set(state.get("objects", []))
    if stored != set(objects):
        raise CheckpointError(
            f"{path} holds {sorted(stored)} but this run has {sorted(objects)} (a changed "
            "--use_ema or --mixed_precision?). Resume with the original settings."
        )
    for name, obj in objects.items():
        tensors = _load_tensors(os.path.join(path, f"{name}.safetensors"))
        if isinstance(obj, torch.nn.Module):
            module = accelerator.unwrap_model(obj)
            expected = module.state_dict()
            missing = sorted(expected.keys() - tensors.keys())
            unknown = sorted(tensors.keys() - expected.keys())
            shaped = [k for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
            if missing or unknown or shaped:
                raise CheckpointError(
                    f"{path}/{name}.safetensors does not match the model: missing {missing[:5]}, "
                    f"unknown {unknown[:5]}, mis-shaped {shaped[:5]}. Resume with the model "
                    "settings of the original run."
                )
            module.load_state_dict(tensors)
        else:
            tree = _read_json(os.path.join(path, f"{name}.json"))
            obj.load_state_dict(_decode(tree, tensors))
    rank = accelerator.process_index
    rng_file = os.path.join(path, f"rng-{rank}.safetensors")
    if os.path.isfile(rng_file):  # absent when resuming on more processes than were saved
        rng = _decode(_read_json(os.path.join(path, f"rng-{rank}.json")), _load_tensors(rng_file))
        _set_rng_state(rng)
    return state


# -- settings on resume -------------------------------------------------------------------------


def check_resume_settings(saved: dict[str, Any] | None, current: dict[str, Any], path: str):
    """Compare the settings a checkpoint was written with to this run's.

    Returns ``{name: (old, new)}`` of the changed :data:`RESUMABLE_SETTINGS` (the caller
    applies and logs them); raises :class:`CheckpointError` naming every other changed
    setting, because it would change what the remaining steps compute and the run would no
    longer match an uninterrupted one.
    """
    if saved is None:
        return {}
    changed = {
        key: (saved[key], current[key])
        for key in sorted(saved.keys() & current.keys())
        if saved[key] != current[key]
    }
    refused = {k: v for k, v in changed.items() if k not in RESUMABLE_SETTINGS}
    if refused:
        listed = "; ".join(f"{_flag(k)} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise CheckpointError(
            f"Cannot resume {path} with changed settings: {listed}. They change what the "
            "remaining steps compute, so the run would no longer be the one that was "
            "checkpointed. Resume with the original values, or start a new run in another "
            f"--output_dir. Only {', '.join(sorted(RESUMABLE_SETTINGS))} may change on resume."
        )
    return {k: v for k, v in changed.items() if k in RESUMABLE_SETTINGS}


def _flag(key: str) -> str:
    return key if " " in key else f"--{key}"


def set_learning_rate(optimizer, lr_scheduler, learning_rate: float) -> None:
    """Make ``learning_rate`` the base rate of a resumed ``LambdaLR`` schedule: the current
    rate becomes ``learning_rate * lambda(step)``, and later steps follow the same schedule."""
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise TypeError(f"Changing the learning rate of a {type(scheduler).__name__} on resume.")
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# -- deterministic batches ----------------------------------------------------------------------


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
    order = _epoch_order(dataset_size, seed + epoch)
    return order[position * global_batch_size : (position + 1) * global_batch_size].tolist()


@functools.lru_cache(maxsize=2)
def _epoch_order(dataset_size: int, seed: int) -> torch.Tensor:
    """One epoch's permutation, drawn once (ImageNet: 1.3M items) instead of every step."""
    return torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))

"""The training data loader: ``torch.utils.data.DataLoader`` workers, pinned memory and
prefetching, with batches that are a function of (seed, step) alone.

Exact resumption needs every step's samples, and their augmentation, to depend on nothing but
the seed and the step: :class:`StepBatchSampler` yields, for step ``s``, this process's share of
global batch ``s`` (:func:`.checkpointing.batch_indices`) together with each sample's flip, drawn
from a generator of (seed, step). Workers only decode and stack what the sampler names, so a run
with 2 workers loads exactly what a run with 0 workers loads, and a run resumed at step ``s``
starts its sampler at ``s``.

Distributed training: every process computes the same global batch and loads only its own slice
(``share``), so the DataLoader is not passed through ``accelerator.prepare`` (which would shard
a sampler of its own and lose the step-to-batch mapping).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpointing import batch_indices, step_generator

# The step generators of the processes use streams 0, 1, ...; augmentation draws its own
# stream so that flips never correlate with the noise of the same step.
AUGMENTATION_STREAM = -1


def draw_flips(seed: int, step: int, count: int) -> list[bool]:
    """Horizontal flips of the ``count`` samples of global batch ``step``."""
    generator = step_generator(seed, step, AUGMENTATION_STREAM)
    return (torch.rand(count, generator=generator) < 0.5).tolist()


class StepBatchSampler(Sampler):
    """This process's ``(index, flip)`` pairs of global batches ``start, ..., stop - 1``.

    Args:
        dataset_size: Items in the dataset.
        global_batch_size: Samples per global (micro-)batch, over all processes.
        seed: The run's seed (epoch permutations and flips).
        start, stop: The first and one-past-last (micro-)batch index.
        share: This process's slice of every global batch.
        random_flip: Draw a flip for every sample (else all ``False``).
    """

    def __init__(
        self,
        dataset_size: int,
        global_batch_size: int,
        seed: int,
        start: int,
        stop: int,
        share: slice,
        random_flip: bool = False,
    ):
        self.dataset_size, self.global_batch_size = dataset_size, global_batch_size
        self.seed, self.start, self.stop = seed, start, stop
        self.share, self.random_flip = share, random_flip

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        for step in range(self.start, self.stop):
            ids = batch_indices(self.dataset_size, self.global_batch_size, step, self.seed)
            flips = (
                draw_flips(self.seed, step, len(ids)) if self.random_flip else [False] * len(ids)
            )
            yield list(zip(ids[self.share], flips[self.share], strict=True))


class FlippableItems(Dataset):
    """Items of ``dataset`` addressed by ``(index, flip)``: latent shards take the stored latent
    of the flipped image, pixel datasets flip the pixels. Each item carries its ``index``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> dict:
        index, flip = key
        if flip and hasattr(self.dataset, "item"):
            item = dict(self.dataset.item(index, True))
        else:
            item = dict(self.dataset[index])
            if flip:
                item["pixel_values"] = item["pixel_values"].flip(-1)
        item["index"] = index
        return item


def _worker_init(worker_id: int) -> None:
    """Workers leave SIGTERM / SIGINT to the training process: a scheduler that signals the
    whole process group (``scancel``, ``kill -TERM -<pgid>``, Ctrl-C) must not kill them before
    the trainer has finished its step and saved (a dead worker fails the next batch). The main
    process shuts its workers down itself; they also exit when it dies."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_STACKED = ("latents", "pixel_values", "encoder_hidden_states", "encoder_attention_mask")


def collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the tensors the trainer uses; ``index``: the dataset indices, in batch order."""
    batch = {key: torch.stack([item[key] for item in items]) for key in _STACKED if key in items[0]}
    batch["index"] = torch.tensor([item["index"] for item in items])
    return batch


def training_loader(
    dataset: Dataset,
    global_batch_size: int,
    seed: int,
    start: int,
    stop: int,
    share: slice,
    random_flip: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> DataLoader:
    """Batches ``start, ..., stop - 1`` of this process (see :class:`StepBatchSampler`),
    decoded by ``num_workers`` processes (0: in the main process), ``prefetch_factor`` batches
    ahead per worker, in pinned memory when ``pin_memory`` (for CUDA)."""
    if num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {num_workers}.")
    sampler = StepBatchSampler(
        len(dataset), global_batch_size, seed, start, stop, share, random_flip
    )
    return DataLoader(
        FlippableItems(dataset),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers else None,
        worker_init_fn=_worker_init if num_workers else None,
    )

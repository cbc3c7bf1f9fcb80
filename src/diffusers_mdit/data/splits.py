"""The one stratified split of the package, and training subsets.

The digits' training / held-out split (:func:`.digits.digits_split`), the MLP probe's split and
the classifiers' splits are all :func:`stratified_split`, so an image held out of training is
never in the training set of the probe or classifier that scores it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def stratified_split(
    labels: torch.Tensor, train_fraction: float = 0.8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded train / held-out indices with ``train_fraction`` of each class in the training
    part (at least one example of each class on each side when the class has two)."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        cut = int(round(train_fraction * len(members)))
        if len(members) >= 2:
            cut = min(max(cut, 1), len(members) - 1)
        train.append(members[:cut])
        test.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def subset_indices(
    indices: Sequence[int], max_samples: int | None = None, min_length: int = 1
) -> list[int]:
    """The first ``max_samples`` of ``indices`` (all of them when ``None`` or larger), the
    subset repeated whole as often as needed to hold at least ``min_length`` items (a training
    subset smaller than the batch then fills batches with copies of itself)."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}.")
    subset = [int(i) for i in indices][:max_samples]
    if not subset:
        raise ValueError("The subset is empty: there are no indices to take samples from.")
    return subset * -(-min_length // len(subset))

"""scikit-learn's bundled handwritten digits (no download): the demo's and the experiments'
data, and their training / held-out split."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .splits import stratified_split

DIGITS_CLASSES = 10
DIGITS_IMAGES = 1797


def digits_split(held_out_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out indices of the 1,797 digits, each sorted: a seeded split
    stratified by class with ``held_out_fraction`` of every class held out:
    :func:`.splits.stratified_split` with training fraction ``1 - held_out_fraction``, the split
    the MLP probe and the digits classifier use too, so a model trained on the training part is
    probed and scored on images it never saw."""
    from sklearn.datasets import load_digits

    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}.")
    labels = torch.from_numpy(load_digits().target.astype(np.int64))
    return stratified_split(labels, 1 - held_out_fraction, seed)


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grey images of 10 classes
    (no download), bilinearly upsampled to ``resolution`` and repeated to ``channels``.

    Args:
        resolution: Output size (8 keeps the originals; 16 or 32 for the demo models).
        channels: 1 (grey) or 3 (grey repeated, for models built for RGB).
        indices: Optional subset of the 1,797 images (e.g. a train/held-out split).
    """

    def __init__(self, resolution: int = 16, channels: int = 3, indices=None):
        from sklearn.datasets import load_digits

        if channels not in (1, 3):
            raise ValueError(
                f"The digits are grey images: channels must be 1 or 3, got {channels}."
            )
        if resolution < 8 or resolution % 8:
            raise ValueError(f"Digits resolution must be a multiple of 8, got {resolution}.")
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)  # [0, 1]
        labels = torch.from_numpy(digits.target.astype(np.int64))
        if indices is not None:
            images, labels = images[indices], labels[indices]
        images = images[:, None]
        if resolution != 8:
            images = F.interpolate(images, size=resolution, mode="bilinear", align_corners=False)
        self.images = (images * 2 - 1).clamp(-1, 1).repeat(1, channels, 1, 1)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        return {"pixel_values": self.images[index], "class_labels": self.label(index)}

    def label(self, index: int) -> int:
        return int(self.labels[index])

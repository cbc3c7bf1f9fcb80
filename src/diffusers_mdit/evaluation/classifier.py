"""The offline metric: a small CNN trained on the real labelled reference images.

InceptionV3, DINOv2 and CLIP need downloaded weights; this classifier needs none. It is
trained in seconds on a CPU on the reference set (scikit-learn's 1,797 bundled 8x8 digits by
default, or any labelled image folder) and gives two metrics in the API of the others:

- ``fd_classifier``: the Frechet distance (:func:`~.metrics.frechet_distance`) between the
  samples and the real images in the space of its penultimate layer (128 features). Like FID
  it sees both fidelity and diversity, but in a feature space that knows only this data set.
- ``accuracy``: the fraction of class-conditional samples classified as the class they were
  asked for (the conditional accuracy).

Training is deterministic for a seed: a stratified 75/25 split, weights initialised and
batches shuffled from that seed (20 epochs of Adam, about 3 s on one CPU core);
``heldout_accuracy`` is measured on the held-out quarter (98.4% on the digits for seed 0).
Images of any size are reduced the same way for training and scoring: averaged to grey when
the classifier is grey, area-downsampled to ``resolution`` (8 for the digits, the resolution of
the digits' originals), and scaled to [-1, 1].
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.splits import stratified_split


@contextlib.contextmanager
def single_thread():
    """Run torch on one CPU thread. The classifier is so small that its operations are
    faster on one thread, and far faster on a busy machine, where OpenMP threads wait for
    each other at every operation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images in [0, 255] or float images in [-1, 1] -> float in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255
    return ((images.float() + 1) / 2).clamp(0, 1)


class ReferenceClassifier(nn.Module):
    """Two 3x3 convolutions, average pooling to 4x4, a 128-wide feature layer, a linear head.

    Args:
        num_classes: Number of classes of the reference set.
        channels: 1 (grey: colour inputs are averaged) or 3.
        resolution: Inputs are area-downsampled to this size.
        width: Channels of the first convolution (twice that in the second).
        feature_dim: Width of the penultimate layer, the feature space of ``fd_classifier``.
    """

    def __init__(
        self,
        num_classes: int,
        channels: int = 1,
        resolution: int = 8,
        width: int = 16,
        feature_dim: int = 128,
    ):
        super().__init__()
        self.num_classes, self.channels, self.resolution = num_classes, channels, resolution
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)
        self.heldout_accuracy: float | None = None

    # -- training ----------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        images: torch.Tensor,
        labels,
        channels: int = 1,
        resolution: int = 8,
        seed: int = 0,
        epochs: int = 20,
        batch_size: int = 32,
        learning_rate: float = 2e-3,
    ) -> ReferenceClassifier:
        """Train on 80% of ``images`` ``(N, C, H, W)`` (uint8, or float in [-1, 1]) with their
        integer ``labels`` (:func:`diffusers_mdit.data.stratified_split` from ``seed``),
        measure ``heldout_accuracy`` on the other 20%."""
        labels = np.asarray(labels, dtype=np.int64)
        if labels.min() < 0:
            raise ValueError("The reference classifier needs labelled images (labels >= 0).")
        # The package's one split: on the digits in dataset order it is digits_split(0.2), so
        # digits held out of training are never in this classifier's training set either.
        train, test = (
            part.numpy() for part in stratified_split(torch.from_numpy(labels), 0.8, seed)
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(int(labels.max()) + 1, channels, resolution)
        inputs = model.prepare(images)
        targets = torch.from_numpy(labels)
        train_inputs, train_targets = inputs[train], targets[train]
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        generator = torch.Generator().manual_seed(seed)
        with single_thread():
            for _ in range(epochs):
                for batch in torch.randperm(len(train), generator=generator).split(batch_size):
                    logits = model.head(model.body(train_inputs[batch]))
                    loss = F.cross_entropy(logits, train_targets[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        model.eval().requires_grad_(False)
        predictions = model.head(model.body(inputs[test])).argmax(1)
        model.heldout_accuracy = float((predictions == targets[test]).double().mean())
        return model

    @classmethod
    def from_digits(cls, seed: int = 0) -> ReferenceClassifier:
        """Trained on scikit-learn's bundled digits (grey, 8x8), no download."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images[:, None].astype(np.float32) / 8 - 1)
        return cls.fit(images, digits.target, channels=1, resolution=8, seed=seed)

    # -- inference ---------------------------------------------------------------------------

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` uint8 or [-1, 1] images -> the network's ``(N, channels,
        resolution, resolution)`` inputs in [-1, 1]."""
        x = to_unit_range(images)
        if self.channels == 1:
            x = x.mean(1, keepdim=True)
        elif x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.adaptive_avg_pool2d(x, self.resolution)
        return x * 2 - 1

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """``(N, feature_dim)`` penultimate features."""
        with single_thread():
            return self.body(self.prepare(images)).double().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> np.ndarray:
        """``(N,)`` predicted classes."""
        with single_thread():
            return self.head(self.body(self.prepare(images))).argmax(1).numpy()

    def accuracy(self, images: torch.Tensor, labels) -> float:
        """Fraction of ``images`` classified as their ``labels``."""
        return float((self.predict(images) == np.asarray(labels)).mean())

"""Is a generated digit the digit it was asked to be? An SVC trained on the real 8x8 digits.

Trained on the training part of the package's digits split (:func:`diffusers_mdit.data.
digits_split`, 80% of every class, seed 0), it classifies the held-out 20% with 99.4% accuracy
(``heldout_accuracy``; SVC with gamma 0.001, C 10). Generated samples
of any size are averaged to grey, area-downsampled to 8x8 and put on the digits' 0-16 scale.
This is the demo's recogniser; ``mdit-eval``'s offline metrics use
:class:`~.classifier.ReferenceClassifier`, a CNN whose features also give a Frechet distance.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data import digits_split

# The digits' one held-out split: what ``--held_out_fraction 0.2`` keeps out of training is
# exactly what this classifier never trained on.
DIGITS_HELD_OUT_FRACTION = 0.2


class DigitsClassifier:
    """SVC on the real digits; :meth:`accuracy` scores samples against intended labels."""

    def __init__(self, seed: int = 0, held_out_fraction: float = DIGITS_HELD_OUT_FRACTION):
        from sklearn.datasets import load_digits
        from sklearn.svm import SVC

        digits = load_digits()
        features = digits.images.reshape(len(digits.images), -1)
        train, test = (part.numpy() for part in digits_split(held_out_fraction, seed))
        self.classifier = SVC(gamma=0.001, C=10).fit(features[train], digits.target[train])
        self.heldout_accuracy = float(self.classifier.score(features[test], digits.target[test]))

    @staticmethod
    def features(images: torch.Tensor) -> np.ndarray:
        """``(N, C, H, W)`` images in [-1, 1] -> ``(N, 64)`` features on the 0-16 scale."""
        grey = images.float().mean(1, keepdim=True)
        small = F.adaptive_avg_pool2d(grey, 8)
        return ((small.clamp(-1, 1) + 1) * 8).reshape(len(images), -1).cpu().numpy()

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.classifier.predict(self.features(images))

    def accuracy(self, images: torch.Tensor, labels) -> float:
        """Fraction of ``images`` classified as their ``labels``."""
        return float((self.predict(images) == np.asarray(labels)).mean())

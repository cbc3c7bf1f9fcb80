"""The digits classifier that scores the demo's samples."""

from __future__ import annotations

import torch

from diffusers_mdit.data import DigitsDataset
from diffusers_mdit.evaluation import DigitsClassifier


def test_classifier_recognises_real_digits_at_the_demo_resolutions():
    classifier = DigitsClassifier()
    assert classifier.heldout_accuracy > 0.98
    for resolution in (16, 32):
        data = DigitsDataset(resolution=resolution, channels=3)
        assert classifier.accuracy(data.images, data.labels.numpy()) > 0.98


def test_noise_is_not_recognised():
    classifier = DigitsClassifier()
    noise = torch.rand(500, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(500) % 10
    assert classifier.accuracy(noise, labels.numpy()) < 0.3

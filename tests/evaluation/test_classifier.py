"""The offline metric: the reference classifier's accuracy and its Frechet distance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_mdit.data import DigitsDataset
from diffusers_mdit.evaluation import ImageSet, ReferenceClassifier, evaluate


@pytest.fixture(scope="module")
def classifier():
    return ReferenceClassifier.from_digits(seed=0)


def test_classifies_held_out_real_digits(classifier):
    print(f"reference classifier held-out accuracy: {classifier.heldout_accuracy:.4f}")
    assert classifier.heldout_accuracy >= 0.95
    for resolution in (16, 32):  # the demo's sizes, area-downsampled to 8x8 like samples
        data = DigitsDataset(resolution=resolution, channels=3)
        assert classifier.accuracy(data.images, data.labels.numpy()) >= 0.95


def test_training_is_deterministic_for_a_seed():
    data = DigitsDataset(resolution=8, channels=1)
    images, labels = data.images[:240], data.labels[:240].numpy()

    def train(seed):
        return ReferenceClassifier.fit(images, labels, seed=seed, epochs=2).features(images)

    assert np.array_equal(train(0), train(0))
    assert not np.allclose(train(0), train(1))


def test_fd_small_between_real_halves_large_to_noise(classifier):
    data = DigitsDataset(resolution=16, channels=3)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    first, second = order[: len(order) // 2], order[len(order) // 2 :]
    real_a = ImageSet.from_tensor(data.images[first], data.labels[first])
    real_b = ImageSet.from_tensor(data.images[second], data.labels[second])
    noise = torch.rand(len(second), 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = ImageSet.from_tensor(noise, data.labels[second])

    metrics = ["fd_classifier", "accuracy"]
    real = evaluate(real_b, metrics, real_a, classifier=classifier)
    fake = evaluate(noise, metrics, real_a, classifier=classifier)
    print(f"fd_classifier real/real {real['fd_classifier']:.3f}", end=", ")
    print(f"noise/real {fake['fd_classifier']:.3f}")
    assert real["classifier_heldout_accuracy"] == classifier.heldout_accuracy
    assert real["fd_classifier"] < 0.05 * fake["fd_classifier"]
    assert real["accuracy"] >= 0.95 and fake["accuracy"] < 0.3


def test_fd_of_a_set_with_itself_is_zero(classifier):
    data = DigitsDataset(resolution=8, channels=3)
    real = ImageSet.from_tensor(data.images, data.labels)
    assert (
        abs(evaluate(real, ["fd_classifier"], real, classifier=classifier)["fd_classifier"]) < 1e-6
    )


def test_unlabelled_reference_is_a_clear_error():
    images = ImageSet.from_tensor(torch.zeros(20, 3, 8, 8, dtype=torch.uint8), name="folder")
    with pytest.raises(ValueError, match="must be labelled"):
        evaluate(images, ["fd_classifier"], images)
    with pytest.raises(ValueError, match="accuracy needs class labels"):
        evaluate(images, ["accuracy"], images)

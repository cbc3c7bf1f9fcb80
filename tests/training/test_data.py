"""Training datasets: the built-in digits and image folders."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from diffusers_mdit.data import DigitsDataset, ImageDataset


def test_digits_dataset_layout_and_range():
    data = DigitsDataset(resolution=16, channels=3)
    assert len(data) == 1797
    item = data[0]
    assert item["pixel_values"].shape == (3, 16, 16) and item["class_labels"] == 0
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert set(data.labels.tolist()) == set(range(10))
    assert DigitsDataset(resolution=8, channels=1, indices=range(5)).images.shape == (5, 1, 8, 8)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        DigitsDataset(channels=4)
    with pytest.raises(ValueError, match="multiple of 8"):
        DigitsDataset(resolution=12)


def test_image_folder_with_class_subfolders(tmp_path):
    for label, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / label).mkdir()
        for i in range(2):
            PIL.Image.new("RGB", (40, 30), colour).save(tmp_path / label / f"{i}.png")
    data = ImageDataset(train_data_dir=str(tmp_path), resolution=16)
    assert len(data) == 4
    item = data[0]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert sorted({data[i]["class_labels"] for i in range(4)}) == [0, 1]
    red = [data[i]["pixel_values"] for i in range(4) if data[i]["class_labels"] == 0][0]
    torch.testing.assert_close(red[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_missing_dataset_folder_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageDataset(train_data_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="exactly one"):
        ImageDataset()


def test_digits_split_is_stratified_disjoint_seeded_and_the_probe_split():
    from diffusers_mdit.data import digits_split, stratified_split

    train, held = digits_split(0.2)
    assert len(train) + len(held) == 1797 and not set(train.tolist()) & set(held.tolist())
    labels = DigitsDataset(resolution=8, channels=1).labels
    for digit in range(10):
        share = (labels[held] == digit).sum() / (labels == digit).sum()
        assert abs(share - 0.2) < 0.01
    probe_train, probe_held = stratified_split(labels, 0.8, seed=0)
    assert torch.equal(train, probe_train) and torch.equal(held, probe_held)
    assert not torch.equal(digits_split(0.2, seed=1)[1], held)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        digits_split(1.0)


def test_the_classifiers_hold_out_exactly_the_training_held_out_digits():
    """One split: the SVC never trains on a digit that ``--held_out_fraction 0.2`` holds out
    of training, and scores its held-out accuracy on exactly those."""
    from sklearn.datasets import load_digits

    from diffusers_mdit.data import digits_split, stratified_split
    from diffusers_mdit.evaluation import DigitsClassifier

    digits = load_digits()
    features = digits.images.reshape(len(digits.images), -1)
    train, held = digits_split(0.2)
    svc = DigitsClassifier()
    assert svc.heldout_accuracy == svc.classifier.score(features[held], digits.target[held])
    # The reference classifier splits any labelled set with stratified_split(labels, 0.8,
    # seed): on the digits in dataset order, the same held-out part.
    reference_train, reference_held = stratified_split(torch.from_numpy(digits.target), 0.8, 0)
    assert torch.equal(reference_held, held) and torch.equal(reference_train, train)


def test_subset_indices_takes_the_first_n_and_repeats_them_to_the_minimum_length():
    from diffusers_mdit.data import subset_indices

    assert subset_indices([5, 3, 9, 1], 2) == [5, 3]
    assert subset_indices([5, 3, 9, 1], None) == [5, 3, 9, 1]
    assert subset_indices([5, 3, 9, 1], 10) == [5, 3, 9, 1]
    assert subset_indices([5, 3, 9, 1], 3, min_length=7) == [5, 3, 9] * 3
    assert subset_indices(range(4), None, min_length=4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=">= 1"):
        subset_indices(range(4), 0)


def test_image_dataset_select_keeps_rows_and_labels_in_order(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            PIL.Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / label / f"{i}.png")
    data = ImageDataset(train_data_dir=str(tmp_path), resolution=8)
    subset = data.select([3, 0, 3])
    assert len(subset) == 3 and len(data) == 4
    assert [subset.label(i) for i in range(3)] == [data.label(3), data.label(0), data.label(3)]
    torch.testing.assert_close(subset[0]["pixel_values"], data[3]["pixel_values"])

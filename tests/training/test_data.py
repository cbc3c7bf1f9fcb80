"""Training datasets: the built-in digits and image folders."""

from __future__ import annotations

import PIL.Image
import pytest
import torch

from diffusers_mdit.training.data import DigitsDataset, ImageDataset


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

"""Image datasets through Hugging Face ``datasets`` (image folders and Hub datasets), and the
one resize / crop every image path uses.

Every dataset (these, and :class:`.digits.DigitsDataset`) yields ``{"pixel_values": (C, R, R)
float in [-1, 1], "class_labels": int}`` (``class_labels`` is -1 for unlabelled data), the
layout pixel-space training and VAE encoding both take. :class:`ImageDataset` items also carry
``original_size`` ``(width, height)``, from which latent preparation derives the auxiliary
scale and aspect conditions.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    """Images from a Hugging Face dataset name or an ``imagefolder`` directory, resized
    (shorter side), center-cropped to ``resolution`` and optionally flipped at random.

    Args:
        dataset_name: A dataset on the Hub or in the ``datasets`` cache.
        train_data_dir: A local folder (``imagefolder`` layout: class sub-folders give labels).
        resolution: Square output size.
        channels: 3 (RGB) or 1 (grey); images are converted.
        random_flip: Horizontal flips with probability 0.5.
        image_column, label_column: Column names; a missing label column means unlabelled.
        split: Dataset split.
    """

    def __init__(
        self,
        dataset_name: str | None = None,
        train_data_dir: str | None = None,
        resolution: int = 32,
        channels: int = 3,
        random_flip: bool = False,
        image_column: str = "image",
        label_column: str = "label",
        split: str = "train",
    ):
        import datasets

        if (dataset_name is None) == (train_data_dir is None):
            raise ValueError("Give exactly one of dataset_name and train_data_dir.")
        if train_data_dir is not None:
            if not os.path.isdir(train_data_dir):
                raise ValueError(
                    f"train_data_dir {train_data_dir!r} does not exist or is not a directory; "
                    "point it at a folder of images (class sub-folders for labels)."
                )
            try:
                data = datasets.load_dataset("imagefolder", data_dir=train_data_dir, split=split)
            except (FileNotFoundError, ValueError) as error:  # no data files / empty split
                raise ValueError(
                    f"train_data_dir {train_data_dir!r} holds no images for split {split!r} "
                    f"({type(error).__name__}: {error}). Put image files (.png, .jpg, ...) in "
                    "it, in class sub-folders for labels."
                ) from error
            if len(data) == 0:
                raise ValueError(
                    f"train_data_dir {train_data_dir!r} holds no images for split {split!r}; put "
                    "image files (.png, .jpg, ...) in it, in class sub-folders for labels."
                )
        else:
            try:
                data = datasets.load_dataset(dataset_name, split=split)
            except Exception as error:
                raise ValueError(
                    f"Could not load dataset {dataset_name!r} ({type(error).__name__}: {error}). "
                    "Check the name and your connection, or use --train_data_dir with a local "
                    "folder, or --dataset_name digits for the built-in digits."
                ) from error
        if image_column not in data.column_names:
            raise ValueError(
                f"Dataset has no image column {image_column!r}; columns: {data.column_names}."
            )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}.")
        self.data = data
        self.resolution = resolution
        self.mode = "RGB" if channels == 3 else "L"
        self.random_flip = random_flip
        self.image_column = image_column
        # Labels are read once: row access decodes the image too, and the trainer reads the
        # labels of a whole global batch on every process.
        self.labels = (
            [int(v) for v in data[label_column]] if label_column in data.column_names else None
        )

    def __len__(self) -> int:
        return len(self.data)

    def select(self, indices: Sequence[int]) -> ImageDataset:
        """A copy holding only the rows ``indices`` (in that order, repeats allowed)."""
        subset = copy.copy(self)
        subset.data = self.data.select(list(indices))
        if self.labels is not None:
            subset.labels = [self.labels[i] for i in indices]
        return subset

    def transform(self, image) -> torch.Tensor:
        """Resize the shorter side, center-crop, to ``(C, R, R)`` in [-1, 1]."""
        return resize_center_crop(image, self.resolution, self.mode)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int | tuple[int, int]]:
        try:  # decoding happens here, on row access
            image = self.data[index][self.image_column]
            pixels = self.transform(image)
        except OSError as error:  # PIL's UnidentifiedImageError, truncated files
            raise ValueError(
                f"Image {index} of the dataset cannot be read ({type(error).__name__}: {error}). "
                "The file is corrupt or not an image: delete or re-save it."
            ) from error
        if self.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        return {
            "pixel_values": pixels,
            "class_labels": self.label(index),
            "original_size": (image.width, image.height),
        }

    def label(self, index: int) -> int:
        """The class of item ``index`` without decoding its image (-1 when unlabelled)."""
        return self.labels[index] if self.labels is not None else -1


# Full scale of PIL's single-channel modes deeper than 8 bits ("I": a 16-bit PNG in older
# Pillow versions, and 32-bit integer images, read on the 16-bit scale), as :func:`as_8bit_scale`
# reads them.
HIGH_BIT_DEPTH_SCALES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def as_8bit_scale(image):
    """A single-channel image deeper than 8 bits (16-bit PNGs: modes ``I;16*``, ``I``; float
    images: ``F``) as a mode ``F`` image on the 8-bit scale ``[0, 255]``, or ``None`` for any
    other mode. PIL's ``convert("RGB")`` / ``convert("L")`` clips such images at 255 instead of
    scaling them, so a 16-bit image would come out white. Float images are read as ``[0, 1]``
    when their maximum is at most 1 and as PIL's ``[0, 255]`` otherwise."""
    from PIL import Image

    if image.mode not in HIGH_BIT_DEPTH_SCALES and image.mode != "F":
        return None
    array = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        scale = 1.0 if array.size and array.max() <= 1.0 else 255.0
    else:
        scale = HIGH_BIT_DEPTH_SCALES[image.mode]
    return Image.fromarray(np.clip(array * (255.0 / scale), 0.0, 255.0).astype(np.float32))


def resize_center_crop(image, resolution: int, mode: str = "RGB") -> torch.Tensor:
    """A PIL image converted to ``mode``, its shorter side resized (bicubic) to ``resolution``
    and center-cropped, as ``(C, R, R)`` in [-1, 1]. Images of more than 8 bits per channel
    keep their range (:func:`as_8bit_scale`)."""
    high_bit_depth = as_8bit_scale(image)
    image = image.convert(mode) if high_bit_depth is None else high_bit_depth
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)),
            max(resolution, round(image.height * scale)))  # fmt: skip
    image = image.resize(size, resample=3)  # bicubic
    left = (image.width - resolution) // 2
    top = (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.clip(np.asarray(image, dtype=np.float32), 0.0, 255.0) / 127.5 - 1.0
    array = array.reshape(resolution, resolution, -1)
    if high_bit_depth is not None:  # a grey image, repeated to the channels of ``mode``
        array = np.repeat(array, len(mode), axis=-1)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()

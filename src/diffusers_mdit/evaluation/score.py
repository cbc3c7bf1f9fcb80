"""Scoring a set of samples against a reference: image sets, metric names, :func:`evaluate`.

Metrics (``METRICS``), the feature space each uses, and what it needs:

============== ===================================== ===========================================
name           feature space                          needs
============== ===================================== ===========================================
fd_classifier  offline reference classifier (128)    a labelled reference (``digits`` default)
accuracy       offline reference classifier (class)  sample labels, a labelled reference
fid            InceptionV3 pool3 (2048)               torch-fidelity + weights, a reference
sfid           InceptionV3 mixed_6/conv[:7] (2023)    torch-fidelity + weights, a reference
is             InceptionV3 logits (1008)              torch-fidelity + weights
precision      InceptionV3 pool3, k = 3               torch-fidelity + weights, a reference
recall         InceptionV3 pool3, k = 3               torch-fidelity + weights, a reference
fd_dinov2      DINOv2 ViT-L/14 CLS (1024)             transformers weights, a reference
clip_score     CLIP ViT-L/14 image and text           transformers weights, sample captions
============== ===================================== ===========================================

Each extractor runs once over each image set, whatever the number of metrics using it. Image
sets are read in batches as ``(B, 3, H, W)`` uint8; a reference whose images have another size
than the samples is resized (shorter side, bicubic) and centre-cropped to the samples' size, as
when real images are prepared for training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import metrics as M
from .classifier import ReferenceClassifier
from .features import (
    CLIP_MODEL,
    DINOV2_MODEL,
    ClassifierFeatures,
    CLIPFeatures,
    DINOv2Features,
    InceptionV3Features,
)

METRICS = (
    "fd_classifier",
    "accuracy",
    "fid",
    "sfid",
    "is",
    "precision",
    "recall",
    "fd_dinov2",
    "clip_score",
)
INCEPTION_METRICS = ("fid", "sfid", "is", "precision", "recall")
REFERENCE_METRICS = ("fd_classifier", "accuracy", "fid", "sfid", "precision", "recall", "fd_dinov2")


class ImageSet:
    """Images read in batches of ``(B, 3, H, W)`` uint8, with optional ``labels`` ``(N,)``
    (-1 = unlabelled) and ``texts``.

    Args:
        load: ``load(indices) -> (B, 3, H, W)`` uint8.
        length: Number of images.
        size: ``(H, W)`` of every image.
        labels, texts: Per-image class labels and captions.
        name: Where the images came from, for reports.
    """

    def __init__(
        self,
        load: Callable[[range], torch.Tensor],
        length: int,
        size: tuple[int, int],
        labels: np.ndarray | None = None,
        texts: list[str] | None = None,
        name: str = "",
    ):
        self.load, self.length, self.size = load, length, size
        self.labels, self.texts, self.name = labels, texts, name

    def __len__(self) -> int:
        return self.length

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.length, batch_size):
            yield self.load(range(start, min(start + batch_size, self.length)))

    @classmethod
    def from_tensor(cls, images: torch.Tensor, labels=None, texts=None, name="tensor"):
        """``(N, C, H, W)`` uint8, or float in [-1, 1]; grey images are repeated to RGB."""
        if images.dtype != torch.uint8:
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        size = tuple(images.shape[-2:])
        return cls(lambda idx: images[idx.start : idx.stop], len(images), size, labels, texts, name)

    @classmethod
    def digits(cls, resolution: int = 8) -> ImageSet:
        """scikit-learn's 1,797 real digits, bilinearly upsampled to ``resolution`` as the
        training data of the demo."""
        from ..data import DigitsDataset

        data = DigitsDataset(resolution=resolution, channels=3)
        return cls.from_tensor(data.images, data.labels.numpy(), name="digits")

    @classmethod
    def from_folder(cls, path: str, resolution: tuple[int, int] | int | None = None) -> ImageSet:
        """An ``imagefolder`` (``datasets``): labels from ``metadata.jsonl`` or class
        sub-folders, captions from a ``text`` column. Images are resized and centre-cropped
        to ``resolution`` (square when an int) when given; otherwise all must have one size."""
        import datasets

        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path!r} is not a folder of images.")
        data = datasets.load_dataset("imagefolder", data_dir=path, split="train")
        columns = data.column_names
        labels = np.asarray(data["label"], dtype=np.int64) if "label" in columns else None
        texts = list(data["text"]) if "text" in columns else None
        first = data[0]["image"]
        if isinstance(resolution, int):
            resolution = (resolution, resolution)
        size = resolution or (first.height, first.width)

        def load(indices: range) -> torch.Tensor:
            images = []
            for image in data.select(indices)["image"]:
                image = image.convert("RGB")
                if (image.height, image.width) != size:
                    if resolution is None:
                        raise ValueError(
                            f"Images in {path!r} have different sizes ({image.height}x"
                            f"{image.width} vs {size[0]}x{size[1]}); give a resolution."
                        )
                    image = _resize_center_crop(image, size)
                images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
            return torch.stack(images)

        return cls(load, len(data), tuple(size), labels, texts, name=path)


def _resize_center_crop(image, size: tuple[int, int]):
    """Shorter side to fit ``size`` (bicubic), centre crop."""
    height, width = size
    scale = max(height / image.height, width / image.width)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        resample=3,
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def extract(extractor, images: ImageSet, batch_size: int = 64, desc: str = "") -> dict:
    """Run ``extractor`` over ``images``: ``{key: (N, D) array}``."""
    parts: dict[str, list[np.ndarray]] = {}
    total = (len(images) + batch_size - 1) // batch_size
    for batch in tqdm(images.batches(batch_size), total=total, desc=desc, disable=not desc):
        for key, value in extractor(batch).items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in parts.items()}


def parse_metrics(names: str | list[str]) -> list[str]:
    """``"fid,accuracy"`` or a list -> validated names in order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise ValueError(f"Unknown metrics {unknown}; choose from {', '.join(METRICS)}.")
    return list(dict.fromkeys(names))


def evaluate(
    samples: ImageSet,
    metrics: str | list[str],
    reference: ImageSet | None = None,
    classifier: ReferenceClassifier | None = None,
    inception_weights: str | None = None,
    dinov2_model: str = DINOV2_MODEL,
    clip_model: str = CLIP_MODEL,
    clip: CLIPFeatures | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Compute ``metrics`` (names from :data:`METRICS`) of ``samples`` against
    ``reference``. The offline classifier is trained on ``reference`` unless given; the
    result includes its ``classifier_heldout_accuracy``. ``is`` gives ``is`` and ``is_std``.
    Extractors whose library or weights are missing raise
    :class:`~.features.MetricUnavailableError` before any work."""
    names = parse_metrics(metrics)
    needing = [n for n in names if n in REFERENCE_METRICS]
    if needing and reference is None:
        raise ValueError(f"{', '.join(needing)} compare with real images: give a reference.")
    if "accuracy" in names and (samples.labels is None or (samples.labels < 0).any()):
        raise ValueError("accuracy needs class labels of the samples (metadata.jsonl 'label').")
    if "clip_score" in names and samples.texts is None:
        raise ValueError("clip_score needs the samples' captions (metadata.jsonl 'text').")

    # Load the pretrained networks first, so a missing one fails before any other work.
    extractors = {}
    inception = [n for n in names if n in INCEPTION_METRICS]
    if inception:
        extractors["inception"] = InceptionV3Features(
            inception_weights, device, ", ".join(inception)
        )
    if "fd_dinov2" in names:
        extractors["dinov2"] = DINOv2Features(dinov2_model, device)
    if "clip_score" in names:
        extractors["clip"] = clip or CLIPFeatures(clip_model, device)
    if {"fd_classifier", "accuracy"} & set(names):
        extractors["classifier"] = ClassifierFeatures(
            classifier or train_classifier(reference, seed)
        )
    needs_reference = {
        "classifier": "fd_classifier" in names,
        "inception": bool(set(inception) - {"is"}),
        "dinov2": True,
        "clip": False,
    }

    results: dict[str, float] = {}
    for name, extractor in extractors.items():
        fake = extract(extractor, samples, batch_size, f"{name}: samples" if progress else "")
        if needs_reference[name]:
            desc = f"{name}: reference" if progress else ""
            real = extract(extractor, reference, batch_size, desc)
        if name == "classifier":
            results["classifier_heldout_accuracy"] = extractor.classifier.heldout_accuracy
            if "fd_classifier" in names:
                results["fd_classifier"] = M.frechet_distance_from_features(
                    real["features"], fake["features"]
                )
            if "accuracy" in names:
                results["accuracy"] = float((fake["classes"] == samples.labels).mean())
        elif name == "inception":
            if "fid" in names:
                results["fid"] = M.frechet_distance_from_features(real["pool3"], fake["pool3"])
            if "sfid" in names:
                results["sfid"] = M.frechet_distance_from_features(real["spatial"], fake["spatial"])
            if "is" in names:
                results["is"], results["is_std"] = M.inception_score(fake["logits"])
            if "precision" in names or "recall" in names:
                precision, recall = M.precision_recall(real["pool3"], fake["pool3"])
                results.update(
                    {k: v for k, v in (("precision", precision), ("recall", recall)) if k in names}
                )
        elif name == "dinov2":
            results["fd_dinov2"] = M.frechet_distance_from_features(real["cls"], fake["cls"])
        elif name == "clip":
            texts = samples.texts
            text = np.concatenate(
                [
                    extractor.text(texts[i : i + batch_size])
                    for i in range(0, len(texts), batch_size)
                ]
            )
            results["clip_score"] = M.clip_score(fake["image"], text)
    return results


def train_classifier(reference: ImageSet, seed: int = 0) -> ReferenceClassifier:
    """The offline classifier for ``reference``: :meth:`ReferenceClassifier.from_digits` for
    the digits, otherwise trained on the reference's images, colour, area-downsampled to at
    most 32x32 (kept that small in memory while reading)."""
    if reference.name == "digits":
        return ReferenceClassifier.from_digits(seed)
    if reference.labels is None or (reference.labels < 0).any():
        raise ValueError(
            "fd_classifier and accuracy train a classifier on the reference, which must be "
            "labelled (class sub-folders or metadata.jsonl 'label'); or use --reference digits."
        )
    resolution = min(32, *reference.size)
    small = [
        F.adaptive_avg_pool2d(batch.float(), resolution).round().to(torch.uint8)
        for batch in reference.batches(256)
    ]
    return ReferenceClassifier.fit(
        torch.cat(small), reference.labels, channels=3, resolution=resolution, seed=seed
    )

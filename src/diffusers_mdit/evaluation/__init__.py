"""Sample-quality evaluation: sampling to image folders, standard metrics (FID, sFID, IS,
precision/recall, DINOv2-FID, CLIP score) through established feature extractors, and an
offline classifier metric that needs no download. The ``mdit-eval`` CLI wraps it."""

from .classifier import ReferenceClassifier
from .digits import DigitsClassifier
from .features import (
    ClassifierFeatures,
    CLIPFeatures,
    DINOv2Features,
    InceptionV3Features,
    MetricUnavailableError,
)
from .generate import GeneratedSamples, generate_samples, sample_seed
from .metrics import (
    clip_score,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    precision_recall,
)
from .score import METRICS, ImageSet, evaluate

__all__ = [
    "CLIPFeatures",
    "ClassifierFeatures",
    "DINOv2Features",
    "DigitsClassifier",
    "GeneratedSamples",
    "ImageSet",
    "InceptionV3Features",
    "METRICS",
    "MetricUnavailableError",
    "ReferenceClassifier",
    "clip_score",
    "evaluate",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "generate_samples",
    "inception_score",
    "precision_recall",
    "sample_seed",
]

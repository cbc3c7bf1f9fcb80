"""The metric formulas against analytic results and naive reference implementations."""

from __future__ import annotations

import numpy as np
import pytest

from diffusers_mdit.evaluation import (
    clip_score,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    precision_recall,
)


def rng(seed=0):
    return np.random.default_rng(seed)


def psd_sqrt(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_by_eigh(mu1, sigma1, mu2, sigma2):
    """Independent formula: tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), symmetric PSD."""
    root = psd_sqrt(sigma1)
    cross = psd_sqrt(root @ sigma2 @ root)
    return float(
        np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(cross)
    )


def exact_standard_normal(n, d, seed=0):
    """Samples whose sample mean is exactly 0 and unbiased sample covariance exactly I."""
    x = rng(seed).standard_normal((n, d))
    x -= x.mean(0)
    return x @ np.linalg.inv(np.linalg.cholesky(np.cov(x, rowvar=False))).T


# -- Frechet distance --------------------------------------------------------------------------


def test_identical_feature_sets_have_zero_distance():
    features = rng().standard_normal((500, 16)) @ rng(1).standard_normal((16, 16))
    assert abs(frechet_distance_from_features(features, features.copy())) < 1e-8


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_isotropic_gaussians_give_the_analytic_distance(scale):
    # N(0, I) vs N(mu, s^2 I): |mu|^2 + tr(I) + s^2 tr(I) - 2 s tr(I) = |mu|^2 + d (1 - s)^2.
    d = 8
    mu = np.arange(d) / d
    expected = mu @ mu + d * (1 - scale) ** 2
    exact = frechet_distance(np.zeros(d), np.eye(d), mu, scale**2 * np.eye(d))
    assert exact == pytest.approx(expected, abs=1e-9)
    # Through the feature path, with samples whose statistics are exactly those.
    x = exact_standard_normal(200, d)
    assert frechet_distance_from_features(x, mu + scale * x) == pytest.approx(expected, abs=1e-8)


def test_sampled_gaussians_approach_the_analytic_distance():
    d, mu, scale = 4, np.array([1.0, -2.0, 0.5, 0.0]), 1.5
    a = rng(0).standard_normal((20000, d))
    b = mu + scale * rng(1).standard_normal((20000, d))
    expected = mu @ mu + d * (1 - scale) ** 2  # 6.25
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, rel=0.03)


def test_general_covariances_match_an_independent_computation():
    generator = rng(3)
    d = 12
    a, b = generator.standard_normal((2, d, d))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = generator.standard_normal((2, d))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        frechet_by_eigh(mu1, sigma1, mu2, sigma2), rel=1e-9
    )


def test_singular_covariances_fewer_samples_than_dimensions():
    # 10 samples in 32 dimensions: rank-9 covariances, as FID on a small sample set.
    x, y = rng(0).standard_normal((10, 32)), rng(1).standard_normal((10, 32)) + 0.5
    # sqrtm of a singular matrix is accurate to a small fraction of its scale (tr S ~ 32).
    assert abs(frechet_distance_from_features(x, x)) < 1e-6 * np.trace(np.cov(x, rowvar=False))
    value = frechet_distance_from_features(x, y)
    assert np.isfinite(value)
    assert value == pytest.approx(
        frechet_by_eigh(*feature_statistics(x), *feature_statistics(y)), rel=1e-4
    )


def test_mismatched_feature_spaces_are_an_error():
    with pytest.raises(ValueError, match="different feature spaces"):
        frechet_distance_from_features(np.zeros((5, 3)), np.zeros((5, 4)))


# -- Inception Score ---------------------------------------------------------------------------


def test_uniform_predictions_score_one():
    mean, std = inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_confident_predictions_spread_evenly_over_c_classes_score_c(classes):
    labels = np.arange(10 * classes * 3) % classes  # every split sees every class 3 times
    logits = 1000.0 * np.eye(classes)[labels]
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_a_hand_computation():
    logits = rng(0).standard_normal((40, 5)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for chunk in np.split(p, 4):
        marginal = chunk.mean(0)
        scores.append(np.exp(np.mean(np.sum(chunk * (np.log(chunk) - np.log(marginal)), 1))))
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12)
    assert std == pytest.approx(np.std(scores), rel=1e-9)


# -- precision and recall ----------------------------------------------------------------------


def test_identical_sets_have_full_precision_and_recall():
    features = rng().standard_normal((300, 8))
    assert precision_recall(features, features.copy()) == (1.0, 1.0)


def test_far_apart_clusters_have_zero_precision_and_recall():
    real = rng(0).standard_normal((200, 8))
    fake = rng(1).standard_normal((200, 8)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_precision_recall_on_a_hand_checked_line():
    # k=1: every real point's ball has radius 1, so 0.5 is inside and 10 is not (precision
    # 1/2); the two fake points are 9.5 apart, so their balls cover every real point (recall 1).
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)


def test_precision_recall_match_a_naive_loop():
    real, fake = rng(0).standard_normal((60, 3)), rng(1).standard_normal((50, 3)) * 0.6 + 0.8

    def naive(a, b, k=3):  # fraction of b inside the k-NN balls of a
        radii = [sorted(np.linalg.norm(a - p, axis=1))[k] for p in a]
        return np.mean(
            [any(np.linalg.norm(q - p) <= r for p, r in zip(a, radii, strict=True)) for q in b]
        )

    precision, recall = precision_recall(real, fake, batch_size=7)
    assert precision == pytest.approx(naive(real, fake)) and recall == pytest.approx(
        naive(fake, real)
    )
    assert 0 < precision < 1 and 0 < recall < 1


# -- CLIP score --------------------------------------------------------------------------------


@pytest.mark.parametrize(("angle", "expected"), [(0, 100.0), (60, 50.0), (90, 0.0), (180, 0.0)])
def test_clip_score_is_100_times_the_clamped_mean_cosine(angle, expected):
    theta = np.deg2rad(angle)
    image = np.array([[3.0, 0.0, 0.0]] * 4)  # norms do not matter
    text = np.array([[np.cos(theta), np.sin(theta), 0.0]] * 4) * 0.2
    assert clip_score(image, text) == pytest.approx(expected, abs=1e-9)


def test_clip_score_clamps_the_mean_not_each_pair():
    # torchmetrics: max(mean, 0). Cosines +0.5 and -0.3 average to 0.1 -> 10 (not 25).
    image = np.array([[1.0, 0.0], [1.0, 0.0]])
    text = np.array([[0.5, np.sqrt(0.75)], [-0.3, np.sqrt(0.91)]])
    assert clip_score(image, text) == pytest.approx(10.0)

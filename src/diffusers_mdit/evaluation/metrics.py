"""The mathematics of the sample-quality metrics, on features from any extractor.

One implementation of each formula, shared by every feature space (InceptionV3, DINOv2, CLIP,
the offline reference classifier), and tested against analytic results:

- **Frechet distance** (Heusel et al. 2017, eq. 6) between Gaussians fitted to two feature
  sets: ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))``. Computed as pytorch-fid and
  the ADM evaluator (Dhariwal & Nichol 2021) compute it: float64 statistics with the unbiased
  covariance (``np.cov``), ``scipy.linalg.sqrtm`` of ``S_1 S_2``; when that square root is not
  finite (nearly singular covariances, e.g. fewer samples than dimensions) both covariances
  get ``eps`` on the diagonal; a complex square root whose diagonal has imaginary parts above
  1e-3 is an error, smaller ones are rounding and dropped. FID is this on InceptionV3 pool3
  features, sFID on the first 7 channels of its ``mixed_6/conv`` maps (Nash et al. 2021),
  DINOv2-FID (Stein et al. 2023) on DINOv2 CLS features.
- **Inception Score** (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` from classifier
  logits, averaged over ``splits`` consecutive chunks (10, as in the original code and
  torch-fidelity); returns the mean and the (population) standard deviation over chunks.
- **Precision and recall** (Kynkaanniemi et al. 2019): each set's manifold is the union of
  balls around its points with radius the distance to the ``k``-th nearest neighbour (k = 3) in
  the same set; precision is the fraction of generated points inside the real manifold, recall
  the fraction of real points inside the generated one.
- **CLIP score** as torchmetrics defines it: ``max(100 * mean_i cos(image_i, text_i), 0)``
  over image/caption pairs of CLIP embeddings.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# -- Frechet distance --------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of ``(N, D)`` features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"Need (N, D) features with N >= 2, got shape {features.shape}.")
    return features.mean(0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (see the module
    docstring for the handling of singular covariances and complex square roots)."""
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"Statistics of different feature spaces: means {mu1.shape} vs {mu2.shape}, "
            f"covariances {sigma1.shape} vs {sigma2.shape}."
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Singular products are expected (dead features, few samples) and handled below;
        # pytorch-fid silences the same warning with disp=False.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm(S1 S2) has imaginary parts up to {np.abs(covmean.imag).max():.3g}: "
                "the covariances are too ill-conditioned (too few samples?)."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_features(features1, features2) -> float:
    """:func:`frechet_distance` between Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


# -- Inception Score ---------------------------------------------------------------------------


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score from ``(N, C)`` class logits: mean and standard deviation over
    ``splits`` consecutive chunks."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(
            f"Need (N, C) logits with N >= splits={splits}, got {tuple(logits.shape)}."
        )
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for chunk in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(chunk, dim=0) - np.log(len(chunk))
        kl = (chunk.exp() * (chunk - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


# -- precision and recall ----------------------------------------------------------------------


def _knn_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each point to its ``k``-th nearest neighbour in the same set (the point
    itself, at distance 0, is the first)."""
    radii = [
        torch.cdist(batch, features).kthvalue(k + 1, dim=1).values
        for batch in features.split(batch_size)
    ]
    return torch.cat(radii)


def _fraction_inside(
    points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int
) -> float:
    """Fraction of ``points`` inside at least one ball ``(centres[j], radii[j])``."""
    inside = [(torch.cdist(batch, centres) <= radii).any(1) for batch in points.split(batch_size)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` against ``real``
    ``(N, D)`` features."""
    real = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    fake = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"Precision/recall with k={k} needs more than {k} samples per set.")
    precision = _fraction_inside(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _fraction_inside(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


# -- CLIP score --------------------------------------------------------------------------------


def clip_score(image_embeds, text_embeds) -> float:
    """``max(100 * mean_i cos(image_i, text_i), 0)`` over paired ``(N, D)`` embeddings."""
    image = torch.as_tensor(np.asarray(image_embeds), dtype=torch.float64)
    text = torch.as_tensor(np.asarray(text_embeds), dtype=torch.float64)
    if image.shape != text.shape:
        raise ValueError(f"Unpaired embeddings: {tuple(image.shape)} vs {tuple(text.shape)}.")
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return max(float(100 * (image * text).sum(-1).mean()), 0.0)

"""Conditioning embeddings: timestep and auxiliary features, the mapping network (MDiT G.2, G.4).

The timestep, and optionally the image scale and aspect ratio (SDXL-style micro-conditioning),
are turned into sinusoidal features, concatenated (384 + 256 + 256 = 896 channels in the paper)
and mapped by a two-layer GeGLU network to one global condition vector. That vector modulates
the outer and aggregate blocks (eq. 6) and becomes the time token of the core cross-attention
(eq. 5).
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


def reduce_gradient_flow(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Scale the gradient reaching ``x`` by ``scale`` without changing its value (G.4).

    The paper interpolates linearly between the active output and its detached copy instead of
    using a lower learning rate for the mapping network and the class embeddings.
    """
    if scale == 1.0:
        return x
    return torch.lerp(x.detach(), x, scale)


def fourier_features(
    values: torch.Tensor, num_channels: int, min_freq: float, max_freq: float
) -> torch.Tensor:
    """Sinusoidal features ``[cos(v f_j), sin(v f_j)]`` of a scalar per sample.

    Frequencies ``f_j`` are spaced geometrically from ``min_freq`` to ``max_freq`` (angular
    frequencies applied to the raw value). A value of exactly 0 marks a dropped condition (the
    paper's convention, figure 19) and gives all-zero features, a code no real value produces.
    """
    half = num_channels // 2
    freqs = torch.exp(
        torch.linspace(math.log(min_freq), math.log(max_freq), half, device=values.device)
    )
    values = values.float()
    angles = values[:, None] * freqs[None, :]
    features = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return features * (values != 0).float()[:, None]


class MappingNetwork(nn.Module):
    """Two-layer GeGLU MLP from the concatenated condition features to the global condition."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None):
        super().__init__()
        hidden_features = hidden_features or out_features
        self.ff = FeedForward(
            in_features, out_features, inner_dim=hidden_features, activation_fn="geglu", bias=False
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.ff(features)


class ConditionEmbedding(nn.Module):
    """Timestep (+ optional scale and aspect ratio) -> global condition vector ``(B, dim)``.

    Args:
        dim: Width of the global condition.
        timestep_channels: Sinusoidal timestep features (384 in the paper).
        use_aux_conditions: Add the image-scale and aspect-ratio features (ImageNet in the paper).
        aux_channels: Features per auxiliary condition (256 in the paper).
        scale_freq_range: Frequency range of the scale features. The paper gives only the maximum,
            1000; the minimum, 1, is our choice.
        aspect_ratio_freq_range: Frequency range of the aspect-ratio features (500 to 2000).
    """

    def __init__(
        self,
        dim: int,
        timestep_channels: int = 384,
        use_aux_conditions: bool = False,
        aux_channels: int = 256,
        scale_freq_range: tuple[float, float] = (1.0, 1000.0),
        aspect_ratio_freq_range: tuple[float, float] = (500.0, 2000.0),
    ):
        super().__init__()
        self.timestep_channels = timestep_channels
        self.use_aux_conditions = use_aux_conditions
        self.aux_channels = aux_channels
        self.scale_freq_range = tuple(scale_freq_range)
        self.aspect_ratio_freq_range = tuple(aspect_ratio_freq_range)
        in_features = timestep_channels + (2 * aux_channels if use_aux_conditions else 0)
        self.mapping = MappingNetwork(in_features, dim)

    def forward(
        self,
        timestep: torch.Tensor,
        image_scale: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
    ) -> torch.Tensor:
        features = [get_timestep_embedding(timestep, self.timestep_channels, flip_sin_to_cos=True)]
        if self.use_aux_conditions:
            zeros = torch.zeros_like(timestep, dtype=torch.float32)
            image_scale = zeros if image_scale is None else image_scale
            aspect_ratio = zeros if aspect_ratio is None else aspect_ratio
            features.append(
                fourier_features(image_scale, self.aux_channels, *self.scale_freq_range)
            )
            features.append(
                fourier_features(aspect_ratio, self.aux_channels, *self.aspect_ratio_freq_range)
            )
        features = torch.cat(features, dim=-1).to(self.mapping.ff.net[0].proj.weight.dtype)
        return self.mapping(features)

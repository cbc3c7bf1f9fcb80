"""Small layers shared by the models: token merge/split, modulated RMSNorm, GeGLU feed-forward.

All grids are channels-last ``(B, H, W, C)``.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import RMSNorm
from torch import nn

RMS_NORM_EPS = 1e-6


def merge_tokens(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``(B, H, W, C) -> (B, H/f, W/f, C f²)``: each f x f group of tokens becomes one token.

    This is the MDiT paper's "pixel shuffle" down (listing 2, ``b (h p) (w q) c -> b h w (c p q)``);
    PyTorch calls the same operation ``pixel_unshuffle``.
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, h // factor, w // factor, c * factor * factor)


def split_tokens(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Inverse of :func:`merge_tokens`: ``(B, H, W, C f²) -> (B, H f, W f, C)``."""
    b, h, w, c = x.shape
    c //= factor * factor
    x = x.reshape(b, h, w, c, factor, factor)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, h * factor, w * factor, c)


def geglu_inner_dim(dim: int, mult: float, multiple_of: int = 64) -> int:
    """GeGLU hidden width: ``mult * dim`` rounded up to a multiple of ``multiple_of`` (LLaMA)."""
    return multiple_of * -(-int(round(dim * mult)) // multiple_of)


def geglu_feed_forward(dim: int, mult: float) -> FeedForward:
    """Bias-free GeGLU feed-forward (MDiT G.1), diffusers' ``FeedForward``."""
    return FeedForward(dim, inner_dim=geglu_inner_dim(dim, mult), activation_fn="geglu", bias=False)


class ModulatedRMSNorm(nn.Module):
    """``x~ = RMSNorm(x) * (1 + G(t) W_t)`` (MDiT eq. 6). ``W_t`` is zero-initialised.

    The caller passes the activated condition ``G(t)`` so the GELU is computed once per
    forward, not once per block.
    """

    def __init__(self, dim: int, condition_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, eps=RMS_NORM_EPS, elementwise_affine=False)
        self.linear = nn.Linear(condition_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        scale = 1 + self.linear(condition)
        return self.norm(x) * scale[:, None, None, :]


class PatchEmbed(nn.Module):
    """Merge ``patch_size`` x ``patch_size`` tokens and project.

    ``(B, H, W, in) -> (B, H/p, W/p, out)``.
    """

    def __init__(self, in_dim: int, out_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_dim * patch_size**2, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(merge_tokens(x, self.patch_size))


class Unpatch(nn.Module):
    """RMSNorm, project and split each token into ``patch_size`` x ``patch_size`` tokens."""

    def __init__(self, in_dim: int, out_dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.norm = RMSNorm(in_dim, eps=RMS_NORM_EPS)
        self.proj = nn.Linear(in_dim, out_dim * patch_size**2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_tokens(self.proj(self.norm(x)), self.patch_size)

"""Partial-head axial rotary position embedding (MDiT paper, sections 3.1 and 4.1).

A head of ``head_dim`` real channels is read as ``head_dim // 2`` complex pairs, pair ``i`` being
the channels ``(2i, 2i + 1)`` (GPT-J's interleaved convention). Of these pairs the first
``num_position_pairs`` carry position, split evenly between the two axes, and the rest carry none
(their rotation angle is zero):

    pairs [0, P/2)        rotate by  x * theta_j   (x = column index)
    pairs [P/2, P)        rotate by  y * theta_j   (y = row index)
    pairs [P, head_dim/2) untouched ("semantic" channels)

with ``theta_j = base ** (-j / (P/2))`` for ``j = 0 .. P/2 - 1``. For a 64-dimensional head the
paper uses ``P = head_dim / 4 = 16`` (its ``r_dim``) and a base frequency of 16.

Coordinates are integer token indices counted from the upper-left corner and are *not*
normalised to the grid size, so a model trained on one size and aspect ratio sees the same
relative phases on any other (appendix I).
"""

from __future__ import annotations

import torch
from torch import nn


class PartialAxialRoPE(nn.Module):
    """Rotates the position-carrying complex pairs of ``(B, H, W, heads, head_dim)`` tensors.

    Args:
        head_dim: Channels per attention head (even).
        num_position_pairs: Complex pairs that carry position (``r_dim``), even, at most
            ``head_dim // 2``. Half encode the column, half the row.
        base: Base frequency; ``theta_j = base ** (-j / (num_position_pairs / 2))``.
    """

    def __init__(self, head_dim: int, num_position_pairs: int = 16, base: float = 16.0):
        super().__init__()
        if head_dim % 2 or num_position_pairs % 2 or num_position_pairs > head_dim // 2:
            raise ValueError(
                f"PartialAxialRoPE needs an even head_dim and an even num_position_pairs <= "
                f"head_dim // 2, got head_dim={head_dim}, num_position_pairs={num_position_pairs}."
            )
        self.head_dim = head_dim
        self.num_position_pairs = num_position_pairs
        self.base = float(base)
        # Destructive tests (appendix M) switch one block's rotation off.
        self.enabled = True
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def frequencies(self) -> torch.Tensor:
        """The per-axis angular frequencies ``theta_j`` (float64, length ``P / 2``)."""
        per_axis = self.num_position_pairs // 2
        return self.base ** (-torch.arange(per_axis, dtype=torch.float64) / per_axis)

    def angles(self, height: int, width: int) -> torch.Tensor:
        """Rotation angles of every position pair at every token, ``(H, W, P)`` float64."""
        theta = self.frequencies()
        rows = torch.arange(height, dtype=torch.float64)
        cols = torch.arange(width, dtype=torch.float64)
        angle_x = cols[None, :, None] * theta
        angle_y = rows[:, None, None] * theta
        return torch.cat(
            [angle_x.expand(height, width, -1), angle_y.expand(height, width, -1)], dim=-1
        )

    def _cos_sin(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (height, width, device)
        if key not in self._cache:
            angles = self.angles(height, width)
            # (H, W, 1, P): broadcast over heads.
            cos = angles.cos().float().unsqueeze(2).to(device)
            sin = angles.sin().float().unsqueeze(2).to(device)
            self._cache[key] = (cos, sin)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the rotation to ``x`` of layout ``(B, H, W, heads, head_dim)``."""
        if not self.enabled or self.num_position_pairs == 0:
            return x
        height, width = x.shape[1], x.shape[2]
        cos, sin = self._cos_sin(height, width, x.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        rotated, rest = x.split(
            [2 * self.num_position_pairs, x.shape[-1] - 2 * self.num_position_pairs], -1
        )
        real, imag = rotated.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
        return torch.cat([rotated.flatten(-2), rest], dim=-1)

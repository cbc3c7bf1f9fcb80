"""Attention layers shared by the models: self-attention on a token grid and MDiT's
time-token cross-attention.

Conventions (MDiT paper G.1): no biases, no output gates, a LayerNorm *without* affine
parameters on every query and key head, and the attention math (normalisation, rotation,
softmax) in float32 even under bf16/fp16 autocast (the paper found bf16 attention made the loss
noisier). Tensors are channels-last: grids are ``(B, H, W, C)``, heads ``(B, H, W, heads, D)``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .neighborhood_attention import neighborhood_attention
from .rope import PartialAxialRoPE


def _head_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],))


def _no_autocast(device: torch.device):
    # Meta tensors (parameter and FLOP counting) have no autocast.
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


class GridSelfAttention(nn.Module):
    """Multi-head self-attention over a ``(B, H, W, dim)`` token grid.

    Queries and keys are LayerNorm-ed per head and rotated by partial-head axial RoPE. The
    attention is global, or neighborhood attention (NATTEN semantics) when ``kernel_size`` is
    set; ``kernel_size`` is a plain attribute so it can be switched at run time.

    Args:
        dim: Input and output channels. The aggregate blocks use ``4 * d`` (pixel-shuffled).
        num_heads: Attention heads; the inner width is ``num_heads * head_dim``, which need not
            equal ``dim`` (the aggregate blocks' Q/K/V/O are non-square, section 3.3).
        head_dim: Channels per head (64 in the paper).
        kernel_size: Neighborhood size, or ``None`` for global attention.
        rope_pairs: Complex pairs per head that carry position (``r_dim``).
        rope_base: RoPE base frequency.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int = 64,
        kernel_size: int | None = None,
        rope_pairs: int = 16,
        rope_base: float = 16.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.kernel_size = kernel_size
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.rope = PartialAxialRoPE(head_dim, rope_pairs, rope_base)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (normalised and rotated) and values, ``(B, H, W, heads, D)`` float32."""
        heads = (self.num_heads, self.head_dim)
        q = self.to_q(x).unflatten(-1, heads)
        k = self.to_k(x).unflatten(-1, heads)
        v = self.to_v(x).unflatten(-1, heads)
        with _no_autocast(x.device):
            q = self.rope(_head_norm(q.float()))
            k = self.rope(_head_norm(k.float()))
            return q, k, v.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.project(x)
        with _no_autocast(x.device):
            if self.kernel_size is None:
                out = F.scaled_dot_product_attention(
                    q.flatten(1, 2).transpose(1, 2),
                    k.flatten(1, 2).transpose(1, 2),
                    v.flatten(1, 2).transpose(1, 2),
                )
                out = out.transpose(1, 2).unflatten(1, x.shape[1:3])
            else:
                out = neighborhood_attention(q, k, v, self.kernel_size)
        return self.to_out(out.flatten(-2).to(x.dtype))


class TimeTokenCrossAttention(nn.Module):
    """Cross-attention over ``[null token, condition tokens, time token]`` (MDiT eq. 5).

        K = LN(n_K ⊕ c W_Kc ⊕ G(t) W_Kt),   V = n_V ⊕ c W_Vc ⊕ G(t) W_Vt

    The time token replaces adaptive-norm modulation in the core blocks, and the learned null
    token lets every query ignore both time and condition (eDiff-I). Queries are LayerNorm-ed
    like the keys.

    Args:
        dim: Query (residual stream) channels.
        num_heads: Attention heads of ``head_dim`` channels.
        time_dim: Width of the activated global condition ``G(t)``.
        condition_dim: Width of the condition tokens (class embedding or text encoder states),
            ``None`` for an unconditional model, which then attends to ``[null, time]`` only.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        time_dim: int,
        condition_dim: int | None = None,
        head_dim: int = 64,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k_time = nn.Linear(time_dim, inner, bias=False)
        self.to_v_time = nn.Linear(time_dim, inner, bias=False)
        if condition_dim is not None:
            self.to_k_cond = nn.Linear(condition_dim, inner, bias=False)
            self.to_v_cond = nn.Linear(condition_dim, inner, bias=False)
        self.null_key = nn.Parameter(torch.zeros(inner))
        self.null_value = nn.Parameter(torch.zeros(inner))
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        time_token: torch.Tensor,
        condition: torch.Tensor | None = None,
        condition_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: Queries ``(B, N, dim)``.
            time_token: ``G(t)``, ``(B, time_dim)``.
            condition: Condition tokens ``(B, S, condition_dim)`` or ``None``.
            condition_mask: ``(B, S)``, true (or 1) where a condition token is valid.
        """
        batch = x.shape[0]
        keys = [self.null_key.expand(batch, 1, -1)]
        values = [self.null_value.expand(batch, 1, -1)]
        if condition is not None:
            keys.append(self.to_k_cond(condition))
            values.append(self.to_v_cond(condition))
        keys.append(self.to_k_time(time_token)[:, None])
        values.append(self.to_v_time(time_token)[:, None])

        heads = (self.num_heads, self.head_dim)
        q = self.to_q(x).unflatten(-1, heads).transpose(1, 2)
        k = torch.cat([t.to(q.dtype) for t in keys], 1).unflatten(-1, heads).transpose(1, 2)
        v = torch.cat([t.to(q.dtype) for t in values], 1).unflatten(-1, heads).transpose(1, 2)
        mask = None
        if condition is not None and condition_mask is not None:
            ones = condition_mask.new_ones(batch, 1)
            mask = torch.cat([ones, condition_mask, ones], dim=1).bool()[:, None, None, :]
        with _no_autocast(x.device):
            out = F.scaled_dot_product_attention(
                _head_norm(q.float()), _head_norm(k.float()), v.float(), attn_mask=mask
            )
        return self.to_out(out.transpose(1, 2).flatten(-2).to(x.dtype))

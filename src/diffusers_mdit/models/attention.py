"""Attention layers shared by the models: self-attention on a token grid and MDiT's
time-token cross-attention.

Conventions (MDiT paper G.1): no biases, no output gates, a LayerNorm *without* affine
parameters on every query and key head, and the attention math (normalisation, rotation,
softmax) in float32 even under bf16/fp16 autocast (the paper found bf16 attention made the loss
noisier). Tensors are channels-last: grids are ``(B, H, W, C)``, heads ``(B, H, W, heads, D)``.

The modules follow diffusers' attention conventions where the roles match: ``to_q``, ``to_k``,
``to_v``, ``to_out.0``, a ``processor`` (diffusers' ``AttentionModuleMixin``: processors,
``fuse_projections``), and global attention through diffusers' dispatcher, so
``model.set_attention_backend("flash")`` etc. select the kernel. Without an explicitly chosen
backend the attention math stays float32 (the paper's rule); a chosen backend gets its inputs
in the compute dtype (the autocast dtype, else the model's), as fused kernels need.
Neighborhood attention is always ours (:mod:`.neighborhood_attention`), in float32.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    dispatch_attention_fn,
)
from diffusers.utils import USE_PEFT_BACKEND, logging, scale_lora_layers, unscale_lora_layers
from torch import nn
from torch.autograd.function import once_differentiable

from .layers import plain_linears
from .neighborhood_attention import neighborhood_attention
from .rope import PartialAxialRoPE

logger = logging.get_logger(__name__)


def _stacked_weight(*linears: nn.Module) -> torch.Tensor | None:
    """The weights of plain linears (:func:`.layers.plain_linears`) stacked into one, so their
    common input is projected by one matmul (``fuse_projections`` without changing the
    modules), or None when any layer is wrapped.

    One 384 -> 1152 matmul instead of three 384 -> 384 ones has more columns to block over, and
    its backward computes the input gradient in one matmul instead of three plus two sums. The
    stacking copies the weights on every call, so :meth:`GridSelfAttention.project` uses it only
    for inputs of at least twice as many tokens as channels, and only off the CPU or under
    autocast (on the CPU :class:`_QKVProjection` does better).
    """
    if not plain_linears(*linears):
        return None
    return torch.cat([linear.weight for linear in linears])


class _QKVProjection(torch.autograd.Function):
    """``x W_q^T, x W_k^T, x W_v^T`` as three separate tensors, for the CPU.

    Versus one stacked matmul (:func:`_stacked_weight`): no copy of the weights per call, and no
    output of three times the width, whose gradient autograd assembles with a ``cat`` in
    backward. At MDiT-B's outer level at batch 8 those are 36 MiB buffers, over glibc's largest
    mmap threshold (32 MiB), so each was mapped afresh and page-faulted in on every use. The
    input gradient is accumulated with ``addmm_`` (no sums of three temporaries).
    """

    @staticmethod
    def forward(ctx, x, *weights):
        ctx.save_for_backward(x, *weights)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no matmuls
        return tuple(torch.mm(x, w.t()) for w in weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            for grad, weight in zip(grads, weights, strict=True):
                if grad is None:
                    continue
                if grad_x is None:
                    grad_x = torch.mm(grad, weight)
                else:
                    grad_x.addmm_(grad, weight)
        grad_weights = [
            None if grad is None or not needed else torch.mm(grad.t(), x)
            for grad, needed in zip(grads, ctx.needs_input_grad[1:], strict=True)
        ]
        return grad_x, *grad_weights


def _head_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],))


def _no_autocast(device: torch.device):
    # Meta tensors (parameter and FLOP counting) have no autocast.
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def dispatch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    backend,
    dtype: torch.dtype,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` of float32 ``(B, S, heads, D)`` tensors through diffusers'
    dispatcher. No backend chosen (none on the processor, and diffusers' active backend is the
    default native one): float32 math with autocast off (G.1). A chosen backend (on the
    processor, or through ``attention_backend(...)`` / ``DIFFUSERS_ATTN_BACKEND``) computes in
    ``dtype``. Returns ``(B, S, heads, D)``."""
    if backend is None:
        backend = _AttentionBackendRegistry.get_active_backend()[0]
        if backend == AttentionBackendName.NATIVE:
            with _no_autocast(query.device):
                return dispatch_attention_fn(
                    query, key, value, attn_mask=attn_mask, backend=backend
                )
    query, key, value = (t.to(dtype) for t in (query, key, value))
    return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, backend=backend)


class GridAttnProcessor:
    """Default processor of :class:`GridSelfAttention`: global attention through diffusers'
    dispatcher, neighborhood attention (``attn.kernel_size`` set) through ours."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: GridSelfAttention, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = attn.project(hidden_states)
        if attn.kernel_size is None:
            grid = hidden_states.shape[1:3]
            flat = (t.flatten(1, 2) for t in (q, k, v))
            dtype = _compute_dtype(hidden_states)
            out = dispatch_attention(*flat, self._attention_backend, dtype).unflatten(1, grid)
        else:
            with _no_autocast(hidden_states.device):
                out = neighborhood_attention(q, k, v, attn.kernel_size)
        return attn.to_out[0](out.flatten(-2).to(hidden_states.dtype))


class GridSelfAttention(nn.Module, AttentionModuleMixin):
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

    _default_processor_cls = GridAttnProcessor
    _available_processors = [GridAttnProcessor]
    is_cross_attention = False
    use_bias = False

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
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])
        self.rope = PartialAxialRoPE(head_dim, rope_pairs, rope_base)
        self.set_processor(GridAttnProcessor())

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (normalised and rotated) and values, ``(B, H, W, heads, D)`` float32."""
        heads = (self.num_heads, self.head_dim)
        if self.fused_projections:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        elif (
            x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")
            and x.dtype == self.to_q.weight.dtype
            and plain_linears(self.to_q, self.to_k, self.to_v)
        ):
            flat = x.reshape(-1, x.shape[-1])
            weights = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
            q, k, v = (t.view(*x.shape[:-1], -1) for t in _QKVProjection.apply(flat, *weights))
        elif (
            x.numel() >= 2 * x.shape[-1] ** 2
            and (weight := _stacked_weight(self.to_q, self.to_k, self.to_v)) is not None
        ):
            q, k, v = F.linear(x, weight).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q, k, v = (t.unflatten(-1, heads) for t in (q, k, v))
        with _no_autocast(x.device):
            q = self.rope(_head_norm(q.float()))
            k = self.rope(_head_norm(k.float()))
            return q, k, v.float()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.processor(self, hidden_states)


class TimeTokenAttnProcessor:
    """Default processor of :class:`TimeTokenCrossAttention`, through diffusers' dispatcher."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: TimeTokenCrossAttention,
        hidden_states: torch.Tensor,
        time_token: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x, batch = hidden_states, hidden_states.shape[0]
        keys = [attn.null_key.expand(batch, 1, -1)]
        values = [attn.null_value.expand(batch, 1, -1)]
        if encoder_hidden_states is not None:
            if attn.fused_projections:
                key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
            else:
                key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            keys.append(key)
            values.append(value)
        keys.append(attn.to_k_time(time_token)[:, None])
        values.append(attn.to_v_time(time_token)[:, None])

        heads = (attn.num_heads, attn.head_dim)
        q = attn.to_q(x).unflatten(-1, heads)
        k = torch.cat([t.to(q.dtype) for t in keys], 1).unflatten(-1, heads)
        v = torch.cat([t.to(q.dtype) for t in values], 1).unflatten(-1, heads)
        mask = None
        if encoder_hidden_states is not None and encoder_attention_mask is not None:
            ones = encoder_attention_mask.new_ones(batch, 1)
            mask = torch.cat([ones, encoder_attention_mask, ones], dim=1)
            mask = mask.bool()[:, None, None, :]
        with _no_autocast(x.device):
            q, k = _head_norm(q.float()), _head_norm(k.float())
        out = dispatch_attention(
            q, k, v.float(), self._attention_backend, _compute_dtype(x), attn_mask=mask
        )
        return attn.to_out[0](out.flatten(-2).to(x.dtype))


class TimeTokenCrossAttention(nn.Module, AttentionModuleMixin):
    """Cross-attention over ``[null token, condition tokens, time token]`` (MDiT eq. 5).

        K = LN(n_K ⊕ c W_Kc ⊕ G(t) W_Kt),   V = n_V ⊕ c W_Vc ⊕ G(t) W_Vt

    The time token replaces adaptive-norm modulation in the core blocks, and the learned null
    token lets every query ignore both time and condition (eDiff-I). Queries are LayerNorm-ed
    like the keys. ``W_Kc`` / ``W_Vc`` are ``to_k`` / ``to_v``, the role diffusers' cross-attention
    gives them; ``W_Kt`` / ``W_Vt`` are ``to_k_time`` / ``to_v_time``.

    Args:
        dim: Query (residual stream) channels.
        num_heads: Attention heads of ``head_dim`` channels.
        time_dim: Width of the activated global condition ``G(t)``.
        condition_dim: Width of the condition tokens (class embedding or text encoder states),
            ``None`` for an unconditional model, which then attends to ``[null, time]`` only.
    """

    _default_processor_cls = TimeTokenAttnProcessor
    _available_processors = [TimeTokenAttnProcessor]
    is_cross_attention = True
    use_bias = False

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
        # Without condition tokens there are no to_k / to_v to fuse.
        self._supports_qkv_fusion = condition_dim is not None
        if condition_dim is not None:
            self.to_k = nn.Linear(condition_dim, inner, bias=False)
            self.to_v = nn.Linear(condition_dim, inner, bias=False)
        self.null_key = nn.Parameter(torch.zeros(inner))
        self.null_value = nn.Parameter(torch.zeros(inner))
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=False)])
        self.set_processor(TimeTokenAttnProcessor())

    def fuse_projections(self) -> None:
        # diffusers before 0.42 does not read _supports_qkv_fusion.
        if self._supports_qkv_fusion:
            super().fuse_projections()

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
        return self.processor(self, x, time_token, condition, condition_mask)


# --------------------------------------------------------------------------------------------
# Old checkpoints: module names before the diffusers naming
# --------------------------------------------------------------------------------------------

_RENAMED = (
    (re.compile(r"^(.*attn)\.to_out\.(weight|bias)$"), r"\1.to_out.0.\2"),
    (re.compile(r"^(.*cross_attn)\.to_(k|v)_cond\.weight$"), r"\1.to_\2.weight"),
)
_FUSED_QKV = re.compile(r"^(.*attn)\.to_qkv\.(weight|bias)$")


def convert_legacy_attention_keys(state_dict: dict[str, torch.Tensor]) -> None:
    """Rename, in place, the attention tensors of folders saved before the diffusers naming:
    ``to_out`` -> ``to_out.0``, MDiT's ``to_k_cond`` / ``to_v_cond`` -> ``to_k`` / ``to_v``,
    and DiffiT's fused ``to_qkv`` split into ``to_q``, ``to_k``, ``to_v`` (exact: its rows are
    the three projections stacked). Keys already in the new naming are left alone."""
    for old in list(state_dict):
        fused = _FUSED_QKV.match(old)
        if fused:
            prefix, kind = fused.groups()
            targets = [f"{prefix}.to_{name}.{kind}" for name in "qkv"]
            if not any(t in state_dict for t in targets):
                for target, part in zip(targets, state_dict.pop(old).chunk(3, dim=0), strict=True):
                    state_dict[target] = part
            continue
        for pattern, replacement in _RENAMED:
            new = pattern.sub(replacement, old)
            if new != old and new not in state_dict:
                state_dict[new] = state_dict.pop(old)


# --------------------------------------------------------------------------------------------
# Model level: processors, call-time LoRA scale, old checkpoints
# --------------------------------------------------------------------------------------------


class AttentionModelMixin(AttentionMixin):
    """For the models (before ``ModelMixin`` in the bases): diffusers' ``attn_processors``,
    ``set_attn_processor``, ``fuse_qkv_projections`` / ``unfuse_qkv_projections``, and the
    renaming of old checkpoints' attention tensors on load (:func:`convert_legacy_attention_keys`,
    applied where diffusers fixes keys: single-file weights)."""

    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        super()._fix_state_dict_keys_on_load(state_dict)
        convert_legacy_attention_keys(state_dict)


@contextlib.contextmanager
def lora_scale(model: nn.Module, attention_kwargs: dict | None):
    """diffusers' call-time LoRA scale: ``attention_kwargs["scale"]`` multiplies every PEFT LoRA
    layer of ``model`` for the duration of the call (``scale_lora_layers``)."""
    attention_kwargs = dict(attention_kwargs or {})
    scale = attention_kwargs.pop("scale", 1.0)
    if attention_kwargs:
        logger.warning(f"attention_kwargs {sorted(attention_kwargs)} are not used by this model.")
    if USE_PEFT_BACKEND:
        scale_lora_layers(model, scale)
    try:
        yield
    finally:
        if USE_PEFT_BACKEND:
            unscale_lora_layers(model, scale)

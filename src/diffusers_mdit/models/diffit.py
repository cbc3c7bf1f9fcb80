"""DiffiT: "Diffusion Vision Transformers for Image Generation" (Hatamizadeh et al.), section 3.2
and appendices H-I.

Both DiffiT models are built from one block, the DiffiT Transformer block (eq. 7-8), whose
self-attention is TMSA, time-dependent multi-head self-attention (eq. 3-6)::

    q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt
    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + B) V     B: relative position bias

- :class:`DiffiTTransformer2DModel`, latent DiffiT (3.2.1, H.2): a DiT-like isotropic ViT on
  VAE latents. Patch 2 with a fixed 2D sin-cos position embedding, DiffiT blocks, final
  LayerNorm -> SiLU -> zero-initialised linear.
- :class:`~diffusers_mdit.models.diffit_unet.DiffiTUNet2DModel`, image-space DiffiT (3.2.2),
  in its own file ``diffit_unet.py``; it reuses this file's block, TMSA and time token.

The time token ``x_t`` is a sinusoidal timestep embedding through an MLP with Swish; class
conditional models add a class embedding to it (label ``num_classes`` is the null label used
for classifier-free guidance). Grids are channels-last ``(B, H, W, C)`` inside the transformer
blocks; the models take and return ``(B, C, H, W)``.

Sections of this file: TMSA, blocks, latent model, presets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import PatchEmbed, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..hub import HubModelMixin
from .attention import AttentionModelMixin, lora_scale
from .conversion_diffit import FromOriginalDiffiTMixin
from .layers import split_tokens
from .presets import PresetMixin, register_presets
from .validation import (
    check_class_labels,
    check_positive_ratios,
    check_positive_sizes,
    check_sample,
    expand_timestep,
    null_labels_if_missing,
)

LAYER_NORM_EPS = 1e-6

# --------------------------------------------------------------------------------------------
# TMSA
# --------------------------------------------------------------------------------------------


class RelativePositionBias(nn.Module):
    """The learned relative position bias ``B`` of eq. 6, Swin style: one value per head and
    per offset ``(dy, dx)``, ``|dy| < h``, ``|dx| < w``, a ``((2h - 1)(2w - 1), heads)`` table.

    ``(h, w)`` is the attention window, or the whole token grid at the training size for global
    attention. On a larger grid (sampling or fine-tuning at a higher resolution) offsets beyond
    the table are clamped to its border: our choice, the paper trains and samples at one size.
    """

    def __init__(self, size: tuple[int, int], num_heads: int):
        super().__init__()
        self.size = tuple(size)
        height, width = self.size
        self.table = nn.Parameter(torch.zeros((2 * height - 1) * (2 * width - 1), num_heads))
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def index(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """``(N, N)`` table row of every (query, key) pair of a ``height x width`` grid."""
        key = (height, width, device)
        if key not in self._index_cache:
            table_h, table_w = self.size
            rows = torch.arange(height, device=device).repeat_interleave(width)
            cols = torch.arange(width, device=device).repeat(height)
            dy = (rows[:, None] - rows[None, :]).clamp(-(table_h - 1), table_h - 1)
            dx = (cols[:, None] - cols[None, :]).clamp(-(table_w - 1), table_w - 1)
            self._index_cache[key] = (dy + table_h - 1) * (2 * table_w - 1) + dx + table_w - 1
        return self._index_cache[key]

    def forward(self, height: int, width: int) -> torch.Tensor:
        """The bias ``(heads, N, N)`` of a ``height x width`` grid (``N = height * width``)."""
        return self.table[self.index(height, width, self.table.device)].permute(2, 0, 1)


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W, C) -> (B * windows, wh * ww, C)``, non-overlapping windows, row-major."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_merge(x: torch.Tensor, window: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * windows, wh * ww, C) -> (B, H, W, C)``."""
    wh, ww = window
    c = x.shape[-1]
    x = x.reshape(-1, height // wh, width // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


class TMSAProcessor:
    """Default processor of :class:`TimeDependentSelfAttention` (eq. 3-6): attention with the
    relative position bias through diffusers' dispatcher, in the model's dtype as the authors'
    code computes it (a chosen backend must accept an additive float mask)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: TimeDependentSelfAttention,
        hidden_states: torch.Tensor,
        time_token: torch.Tensor | None,
    ) -> torch.Tensor:
        x = hidden_states
        batch, height, width, dim = x.shape
        window = (height, width) if attn.window_size is None else (attn.window_size,) * 2
        if height % window[0] or width % window[1]:
            raise ValueError(
                f"A {height}x{width} token grid cannot be cut into {window[0]}x{window[1]} "
                "TMSA windows; the input size must make every level's grid a multiple of its "
                "window."
            )
        if attn.fused_projections:
            qkv = attn.to_qkv(x)
        else:
            qkv = torch.cat([attn.to_q(x), attn.to_k(x), attn.to_v(x)], dim=-1)
        if attn.time_to_qkv is not None:  # None: DiffiTAdaLNBlock conditions outside it
            qkv = qkv + attn.time_to_qkv(time_token)[:, None, None, :]
        qkv = window_partition(qkv, window)
        q, k, v = qkv.unflatten(-1, (3, attn.num_heads, -1)).unbind(2)  # (B', N, heads, D)
        bias = attn.relative_position_bias(*window).to(q.dtype)
        backend = self._attention_backend
        out = dispatch_attention_fn(q, k, v, attn_mask=bias[None], backend=backend)
        out = window_merge(out.flatten(2), window, height, width)
        return attn.to_out[0](out)


class TimeDependentSelfAttention(nn.Module, AttentionModuleMixin):
    """TMSA (eq. 3-6): the time token is projected to query, key and value and added to every
    spatial token's projections; attention with a relative position bias, globally or inside
    non-overlapping windows.

    The spatial projections ``W_qs``, ``W_ks``, ``W_vs`` are ``to_q``, ``to_k``, ``to_v`` and the
    output ``to_out.0`` (diffusers' names); the time projections ``W_qt``, ``W_kt``, ``W_vt``
    stay one fused ``time_to_qkv`` (a single ``(B, 3 dim)`` row per sample).

    Args:
        dim: Token channels.
        num_heads: Attention heads (``dim / num_heads`` channels each).
        time_dim: Width of the time token ``x_t``; ``None`` for attention without time
            projections (the adaLN ablation, :class:`DiffiTAdaLNBlock`, conditions outside it).
        window_size: Window side for local attention, ``None`` for global attention.
        bias_size: ``(h, w)`` extent of the relative position table: the window, or the token
            grid at the training size for global attention.
        qkv_bias: Bias on the spatial projections (as in DiT / ViT).
    """

    _default_processor_cls = TMSAProcessor
    _available_processors = [TMSAProcessor]
    is_cross_attention = False

    def __init__(
        self,
        dim: int,
        num_heads: int,
        time_dim: int | None,
        window_size: int | None,
        bias_size: tuple[int, int],
        qkv_bias: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.window_size = window_size
        self.use_bias = qkv_bias
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, dim, bias=qkv_bias)
        self.time_to_qkv = (  # W_qt, W_kt, W_vt
            None if time_dim is None else nn.Linear(time_dim, 3 * dim, bias=False)
        )
        self.relative_position_bias = RelativePositionBias(bias_size, num_heads)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.set_processor(TMSAProcessor())

    def forward(self, x: torch.Tensor, time_token: torch.Tensor | None) -> torch.Tensor:
        """``x``: ``(B, H, W, dim)``; ``time_token``: ``(B, time_dim)``."""
        return self.processor(self, x, time_token)


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


class DiffiTBlock(nn.Module):
    """DiffiT Transformer block (eq. 7-8): ``x = x + TMSA(LN(x), x_t)``,
    ``x = x + MLP(LN(x))``, MLP ratio 4 with tanh-GELU (as DiT and the authors' code)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        time_dim: int,
        window_size: int | None,
        bias_size: tuple[int, int],
        mlp_ratio: float = 4.0,
        norm_elementwise_affine: bool = False,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, LAYER_NORM_EPS, norm_elementwise_affine)
        self.attn = TimeDependentSelfAttention(
            dim, num_heads, time_dim, window_size, bias_size, qkv_bias
        )
        self.norm2 = nn.LayerNorm(dim, LAYER_NORM_EPS, norm_elementwise_affine)
        self.mlp = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        x = hidden_states + self.attn(self.norm1(hidden_states), time_token)
        return x + self.mlp(self.norm2(x))


class DiffiTAdaLNBlock(nn.Module):
    """The baseline of DiffiT's figure 7b: the block with DiT's adaLN-Zero time conditioning
    instead of TMSA's time projections. The attention has no time projections and both
    sub-layers are modulated, ``x = x + g1 * Attn(LN(x) (1 + s1) + b1)``, likewise the MLP,
    with ``(b, s, g)`` from a zero-initialised linear map of ``SiLU(x_t)`` (so every block
    starts as the identity). Chosen by ``time_conditioning="adaln"``; same arguments as
    :class:`DiffiTBlock`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        time_dim: int,
        window_size: int | None,
        bias_size: tuple[int, int],
        mlp_ratio: float = 4.0,
        norm_elementwise_affine: bool = False,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, LAYER_NORM_EPS, norm_elementwise_affine)
        self.attn = TimeDependentSelfAttention(
            dim, num_heads, None, window_size, bias_size, qkv_bias
        )
        self.norm2 = nn.LayerNorm(dim, LAYER_NORM_EPS, norm_elementwise_affine)
        self.mlp = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")
        self.modulation = nn.Linear(time_dim, 6 * dim)

    def forward(self, hidden_states: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        chunks = self.modulation(F.silu(time_token))[:, None, None].chunk(6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = chunks
        x = hidden_states
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, None)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


# ``time_conditioning`` -> block class.
TIME_CONDITIONING = {"tmsa": DiffiTBlock, "adaln": DiffiTAdaLNBlock}


class TimeToken(nn.Module):
    """``x_t``: sinusoidal timestep features through a Linear-Swish-Linear MLP (3.2, as DDPM),
    plus a class embedding for class-conditional models (label ``num_classes`` = null)."""

    def __init__(self, dim: int, frequency_dim: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.frequencies = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(frequency_dim, dim, act_fn="silu")
        if num_classes > 0:
            self.class_embedding = nn.Embedding(num_classes + 1, dim)

    def forward(
        self, timestep: torch.Tensor, class_labels: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """``x_t`` ``(B, dim)`` with the MLP computing in ``dtype``, the model's compute dtype
        (not the weights' storage dtype, which differs under layerwise casting)."""
        features = self.frequencies(timestep).to(dtype)
        token = self.mlp(features)
        if self.num_classes > 0:
            labels = null_labels_if_missing(
                class_labels, self.num_classes, timestep.shape[0], timestep.device
            )
            token = token + self.class_embedding(labels)
        return token


class _DiffiTModelMixin:
    """What both DiffiT models do alike: check the inputs, build the time token, run blocks
    (with gradient checkpointing when enabled)."""

    def _time_token(
        self, hidden_states: torch.Tensor, timestep, class_labels, why: str
    ) -> torch.Tensor:
        """Check ``hidden_states`` (``why``: where its size multiple comes from) and the
        labels; return the time token ``x_t``. Callers cast floating ``hidden_states`` to the
        model's dtype afterwards (integer ones are refused here)."""
        config = self.config
        check_sample(hidden_states, config.in_channels, self.size_multiple, why)
        batch = hidden_states.shape[0]
        check_class_labels(class_labels, config.num_classes, batch)
        timestep = expand_timestep(timestep, batch, hidden_states.device)
        return self.time_token(timestep, class_labels, self.dtype)

    def _run_block(self, block: nn.Module, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)


# --------------------------------------------------------------------------------------------
# Latent DiffiT
# --------------------------------------------------------------------------------------------


class DiffiTTransformer2DModel(
    HubModelMixin,
    AttentionModelMixin,
    CacheMixin,
    ModelMixin,
    ConfigMixin,
    PeftAdapterMixin,
    PresetMixin,
    FromOriginalDiffiTMixin,
    _DiffiTModelMixin,
):
    r"""Latent DiffiT (section 3.2.1, appendix H.2): an isotropic ViT of DiffiT blocks on VAE
    latents.

    From the paper: patch 2, width 1152, 16 heads, MLP ratio 4, TMSA with a relative position
    bias, class conditioning, 561M parameters. Its text says depth 30, but 561M parameters (and
    the authors' released configuration) correspond to depth 28, which the "DiffiT-XL" preset
    uses. From the authors' code, not the paper: the time token is the time plus class
    embedding, LayerNorms have no affine parameters, the MLP uses tanh-GELU, the position
    embedding is DiT's fixed 2D sin-cos one and the output head is LayerNorm -> SiLU -> linear,
    zero-initialised (so a fresh model predicts exactly 0).

    The model is agnostic to the prediction target: ``out_channels = in_channels`` for epsilon,
    x0 or velocity prediction, ``2 * in_channels`` for epsilon with a learned variance (DiT).

    NVIDIA's released checkpoints load with :meth:`from_single_file`
    (:mod:`~diffusers_mdit.models.conversion_diffit`).

    A diffusers ``CacheMixin`` for FirstBlockCache only (:meth:`enable_cache`): the isotropic
    ``blocks`` stack is what it expects, the first block's residual standing in for the rest.

    Parameters:
        sample_size (`int`, defaults to 32): Training latent size; sets the extent of the
            global relative position table (offsets beyond it are clamped at other sizes).
        in_channels (`int`, defaults to 4): Latent channels.
        out_channels (`int`, *optional*): Output channels; defaults to ``in_channels``.
        patch_size (`int`, defaults to 2): Patch size.
        hidden_size (`int`, defaults to 1152): Token width.
        num_layers (`int`, defaults to 28): Number of DiffiT blocks.
        num_attention_heads (`int`, defaults to 16): Heads per TMSA.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width over token width.
        window_size (`int`, *optional*): Local TMSA window in tokens; ``None`` (the paper's
            latent model) attends globally.
        num_classes (`int`, defaults to 0): Number of classes, 0 for an unconditional model.
            Label ``num_classes`` is the null label for classifier-free guidance.
        frequency_embedding_size (`int`, defaults to 256): Sinusoidal timestep features.
        qkv_bias (`bool`, defaults to True): Bias on the spatial Q/K/V projections.
        time_conditioning (`str`, defaults to "tmsa"): ``"tmsa"`` (the paper) or ``"adaln"``,
            DiT's adaLN-Zero modulation instead, the ablation of figure 7b. adaLN has ``3 d^2``
            more weights per block than TMSA's time projections; ``mlp_ratio=2.5`` instead of 4
            removes as many, matching the parameter count.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiffiTBlock", "DiffiTAdaLNBlock"]
    _repeated_blocks = ["DiffiTBlock", "DiffiTAdaLNBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 1152,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        window_size: int | None = None,
        num_classes: int = 0,
        frequency_embedding_size: int = 256,
        qkv_bias: bool = True,
        time_conditioning: str = "tmsa",
    ):
        super().__init__()
        check_positive_sizes(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=patch_size,
            hidden_size=hidden_size,
            window_size=window_size,
            frequency_embedding_size=frequency_embedding_size,
        )
        check_positive_ratios(mlp_ratio=mlp_ratio)
        _validate_common(hidden_size, num_attention_heads, num_classes, num_layers=num_layers)
        if sample_size % patch_size:
            raise ValueError(
                f"sample_size={sample_size} must be a multiple of patch_size={patch_size}."
            )
        out_channels = out_channels or in_channels
        grid = sample_size // patch_size
        self.gradient_checkpointing = False

        self.patch_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=hidden_size,
        )
        if time_conditioning not in TIME_CONDITIONING:
            raise ValueError(
                f"Unknown time_conditioning {time_conditioning!r}; use one of "
                f"{tuple(TIME_CONDITIONING)}."
            )
        block_class = TIME_CONDITIONING[time_conditioning]
        self.time_token = TimeToken(hidden_size, frequency_embedding_size, num_classes)
        self.blocks = nn.ModuleList(
            block_class(
                hidden_size,
                num_attention_heads,
                hidden_size,
                window_size,
                (window_size, window_size) if window_size else (grid, grid),
                mlp_ratio,
                qkv_bias=qkv_bias,
            )
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden_size, LAYER_NORM_EPS, elementwise_affine=False)
        self.proj_out = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's rule: Xavier-uniform linear layers with zero biases (the patch projection as a
        linear layer), N(0, 0.02) embeddings, timestep MLP and relative position tables, and a
        zero-initialised output projection."""
        _initialize_transformer_weights(self)
        proj = self.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        for block in self.blocks:
            if isinstance(block, DiffiTAdaLNBlock):  # adaLN-Zero: every block starts as identity
                nn.init.zeros_(block.modulation.weight)
                nn.init.zeros_(block.modulation.bias)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return self.config.patch_size * (self.config.window_size or 1)

    def enable_cache(self, config: Any) -> None:
        """``CacheMixin.enable_cache`` for a ``FirstBlockCacheConfig``, after registering the
        block classes in diffusers' block registry, which its hooks read (lazily: registering
        imports all of diffusers' transformers). The other techniques hook attention layers by
        diffusers' block names and timestep callbacks; untested here, so refused."""
        from diffusers.hooks import FirstBlockCacheConfig
        from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

        if not isinstance(config, FirstBlockCacheConfig):
            raise NotImplementedError(
                f"{type(self).__name__} supports FirstBlockCacheConfig only, got "
                f"{type(config).__name__}."
            )
        for block_class in TIME_CONDITIONING.values():
            metadata = TransformerBlockMetadata(return_hidden_states_index=0)
            TransformerBlockRegistry.register(block_class, metadata)
        super().enable_cache(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states: Noisy latents ``(B, in_channels, H, W)``, ``H`` and ``W`` multiples
                of :attr:`size_multiple`.
            timestep: Diffusion timestep(s), scalar or ``(B,)``, in the scheduler's units.
            class_labels: ``(B,)`` labels in ``[0, num_classes]``; ``num_classes`` (or
                ``None``) is the null label.
            attention_kwargs: ``{"scale": s}`` scales the LoRA layers for this call (diffusers'
                convention).
            return_dict: Return a ``Transformer2DModelOutput`` instead of a tuple.

        Returns:
            The prediction ``(B, out_channels, H, W)``.
        """
        config = self.config
        why = f"patch {config.patch_size}" + (
            f" x TMSA window {config.window_size}" if config.window_size else ""
        )
        time_token = self._time_token(hidden_states, timestep, class_labels, why)
        hidden_states = hidden_states.to(self.dtype)
        height, width = hidden_states.shape[-2:]

        grid = (height // config.patch_size, width // config.patch_size)
        with lora_scale(self, attention_kwargs):
            h = self.patch_embed(hidden_states).unflatten(1, grid)  # (B, h, w, C)
            for block in self.blocks:
                h = self._run_block(block, h, time_token)
            out = self.proj_out(F.silu(self.norm_out(h)))
        out = split_tokens(out, config.patch_size).permute(0, 3, 1, 2)

        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def _validate_common(dim: int, num_heads: int, num_classes: int, head_dim=None, num_layers=0):
    if num_heads < 1 or dim % num_heads or (head_dim and dim % head_dim):
        per_head = f"attention_head_dim={head_dim}" if head_dim else f"{num_heads} heads"
        raise ValueError(f"Width {dim} must be a positive multiple of {per_head}.")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}.")


def _initialize_transformer_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RelativePositionBias):
            nn.init.trunc_normal_(module.table, std=0.02)
    for module in model.modules():
        if isinstance(module, TimeToken):
            nn.init.normal_(module.mlp.linear_1.weight, std=0.02)
            nn.init.normal_(module.mlp.linear_2.weight, std=0.02)
            if module.num_classes > 0:
                nn.init.normal_(module.class_embedding.weight, std=0.02)
        elif isinstance(module, TimeDependentSelfAttention):
            # DiT's rule is Xavier on the fused (3 dim, dim) qkv matrix, not on its thirds.
            fused = torch.cat([module.to_q.weight, module.to_k.weight, module.to_v.weight])
            nn.init.xavier_uniform_(fused)
            projections = (module.to_q, module.to_k, module.to_v)
            for linear, part in zip(projections, fused.chunk(3), strict=True):
                linear.weight.data.copy_(part)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

DIFFIT_PRESETS: dict[str, dict[str, Any]] = {
    # Paper (H.2, table 9): ImageNet-256 latents, 561M parameters; depth 28, see the class
    # docstring.
    "DiffiT-XL": dict(hidden_size=1152, num_layers=28, num_attention_heads=16, num_classes=1000),
    # Ours: trains on a laptop CPU in minutes at 16x16 latents, like MDiT-S.
    "DiffiT-S": dict(
        sample_size=16, hidden_size=256, num_layers=6, num_attention_heads=4, num_classes=1000
    ),
}

register_presets(DiffiTTransformer2DModel, DIFFIT_PRESETS)

"""Image-space DiffiT (Hatamizadeh et al., "DiffiT: Diffusion Vision Transformers for Image
Generation", section 3.2.2, appendices H.1 and I.1, tables S.2/S.3): a U-shaped encoder/decoder
of DiffiT ResBlocks ``x = DiffiTBlock(Conv3x3(Swish(GN(x))), x_t) + x`` (eq. 9-10) with
windowed TMSA, convolutional down/up sampling and skip connections at every resolution.

The DiffiT Transformer block, TMSA and the time token are shared with the latent model in
:mod:`diffusers_mdit.models.diffit`. Sections: the ResBlock, the model, presets.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from ..hub import HubModelMixin
from .attention import AttentionModelMixin, lora_scale
from .diffit import (
    LAYER_NORM_EPS,
    DiffiTBlock,
    TimeToken,
    _DiffiTModelMixin,
    _initialize_transformer_weights,
    _validate_common,
)
from .presets import PresetMixin, register_presets
from .validation import check_positive_ratios, check_positive_sizes

# --------------------------------------------------------------------------------------------
# The ResBlock
# --------------------------------------------------------------------------------------------


class DiffiTResBlock(nn.Module):
    """Image-space residual cell (eq. 9-10): ``x^ = Conv3x3(Swish(GN(x)))``,
    ``x = DiffiTBlock(x^, x_t) + x``. Takes and returns ``(B, H, W, C)``; the convolution
    and group norm run on a channels-last view of the same memory."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        time_dim: int,
        window_size: int,
        mlp_ratio: float,
        norm_num_groups: int,
    ):
        super().__init__()
        self.norm = nn.GroupNorm(norm_num_groups, dim, eps=LAYER_NORM_EPS)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.transformer = DiffiTBlock(
            dim,
            num_heads,
            time_dim,
            window_size,
            (window_size, window_size),
            mlp_ratio,
            norm_elementwise_affine=True,
        )

    def forward(self, x: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        h = self.conv(F.silu(self.norm(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
        return self.transformer(h, time_token) + x


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class DiffiTUNet2DModel(
    HubModelMixin,
    AttentionModelMixin,
    ModelMixin,
    ConfigMixin,
    PeftAdapterMixin,
    PresetMixin,
    _DiffiTModelMixin,
):
    r"""Image-space DiffiT (section 3.2.2, appendices H.1 and I.1): a U-shaped encoder/decoder.

    Layout (tables S.2/S.3, ``n`` levels, level ``i`` at resolution ``H / 2^i``)::

        Tokenizer: Conv3x3 to block_out_channels[0]
        encoder level i: layers_per_level[i] DiffiT ResBlocks, then (i < n-1) a Conv3x3
            stride-2 downsampler to block_out_channels[i+1]
        decoder level i = n-2 .. 0: upsampler (nearest x2 + Conv3x3), concatenation with the
            encoder's level-i output (the skip), Conv1x1 to block_out_channels[i],
            layers_per_level[i] DiffiT ResBlocks
        Head: GroupNorm -> Swish -> Conv3x3 to out_channels (zero-initialised)

    From the paper: the ResBlock, windowed TMSA (window 4 at 32x32, 8 at 64x64 on every level),
    convolutional resampling, skips at every resolution, widths 128 then 256 (I.1: channels
    change only from the first to the second level), ``L_i = 4`` per level. Ours (the paper
    does not give them): the skip fusion (concatenation + 1x1 convolution, the
    "convolutional layer to match the number of feature maps" of 3.2.2), 64-channel heads,
    a time token of ``4 x block_out_channels[0]`` channels (DDPM's convention), 32 groups, and
    affine LayerNorms. Table S.2's "16x16x128" after the second downsampler contradicts I.1
    and the table's own next row (16x16x256); we follow I.1. Appendix I.1 also mentions
    "1, 2, 2, 2" and "2" blocks per stage; the presets follow H.1's ``L_i`` (4 per level).

    The decoder's last level has no ResBlocks of the bottom resolution: as in table S.3 the
    bottom level is visited once, by the encoder.

    Not a diffusers ``CacheMixin``: its caches take one block's output as a proxy for the rest
    of a stack of same-shape blocks, and a U-Net's blocks change resolution.

    Parameters:
        sample_size (`int`, defaults to 32): Training image size (a default for pipelines).
        in_channels (`int`, defaults to 3): Image channels.
        out_channels (`int`, *optional*): Output channels; defaults to ``in_channels``.
        block_out_channels (`tuple[int]`, defaults to (128, 256, 256)): Width of every level.
        layers_per_level (`tuple[int]`, defaults to (4, 4, 4)): DiffiT ResBlocks per level and
            path (``L_i``).
        window_size (`int` or `tuple[int]`, defaults to 4): TMSA window, one for all levels
            or one per level.
        attention_head_dim (`int`, defaults to 64): Channels per head.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width over block width.
        time_embedding_dim (`int`, *optional*): Time token width; defaults to
            ``4 * block_out_channels[0]``.
        frequency_embedding_size (`int`, defaults to 128): Sinusoidal timestep features.
        norm_num_groups (`int`, defaults to 32): GroupNorm groups.
        num_classes (`int`, defaults to 0): Number of classes, 0 for unconditional (the
            paper's image-space models are unconditional).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiffiTResBlock"]
    _repeated_blocks = ["DiffiTResBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels: tuple[int, ...] = (128, 256, 256),
        layers_per_level: tuple[int, ...] = (4, 4, 4),
        window_size: int | tuple[int, ...] = 4,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        time_embedding_dim: int | None = None,
        frequency_embedding_size: int = 128,
        norm_num_groups: int = 32,
        num_classes: int = 0,
    ):
        super().__init__()
        levels = len(block_out_channels)
        if levels == 0:
            raise ValueError(
                "block_out_channels is empty; give one width per level, e.g. (128, 256, 256)."
            )
        windows = _per_level(window_size, levels, "window_size")
        check_positive_sizes(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            attention_head_dim=attention_head_dim,
            time_embedding_dim=time_embedding_dim,
            frequency_embedding_size=frequency_embedding_size,
            norm_num_groups=norm_num_groups,
            **{f"window_size[{i}]": window for i, window in enumerate(windows)},
        )
        check_positive_ratios(mlp_ratio=mlp_ratio)
        if len(layers_per_level) != levels:
            raise ValueError(
                f"layers_per_level has {len(layers_per_level)} entries but block_out_channels "
                f"has {levels}; give one block count per level."
            )
        if min(layers_per_level) < 0:
            raise ValueError(
                f"layers_per_level entries must be >= 0, got {tuple(layers_per_level)}."
            )
        for width in block_out_channels:
            _validate_common(width, width // attention_head_dim, num_classes, attention_head_dim)
            if width % norm_num_groups:
                raise ValueError(
                    f"Every block_out_channels entry must be divisible by norm_num_groups="
                    f"{norm_num_groups}, got {width}."
                )
        out_channels = out_channels or in_channels
        time_dim = time_embedding_dim or 4 * block_out_channels[0]
        self.gradient_checkpointing = False

        def res_blocks(level: int) -> nn.ModuleList:
            width = block_out_channels[level]
            return nn.ModuleList(
                DiffiTResBlock(
                    width,
                    width // attention_head_dim,
                    time_dim,
                    windows[level],
                    mlp_ratio,
                    norm_num_groups,
                )
                for _ in range(layers_per_level[level])
            )

        self.time_token = TimeToken(time_dim, frequency_embedding_size, num_classes)
        self.tokenizer = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.encoder_levels = nn.ModuleList(res_blocks(i) for i in range(levels))
        self.downsamplers = nn.ModuleList(
            nn.Conv2d(block_out_channels[i], block_out_channels[i + 1], 3, stride=2, padding=1)
            for i in range(levels - 1)
        )
        self.upsamplers = nn.ModuleList(
            nn.Conv2d(block_out_channels[i + 1], block_out_channels[i + 1], 3, padding=1)
            for i in range(levels - 1)
        )
        self.skip_fusions = nn.ModuleList(
            nn.Conv2d(block_out_channels[i + 1] + block_out_channels[i], block_out_channels[i], 1)
            for i in range(levels - 1)
        )
        self.decoder_levels = nn.ModuleList(res_blocks(i) for i in range(levels - 1))
        self.norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=LAYER_NORM_EPS)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Transformer parts as the latent model; convolutions keep PyTorch's default; the
        output convolution is zero-initialised, so a fresh model predicts exactly 0."""
        _initialize_transformer_weights(self)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        windows = _per_level(self.config.window_size, len(self.config.block_out_channels), "")
        return math.lcm(*(2**level * window for level, window in enumerate(windows)))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """Arguments named as diffusers' U-Nets name them.

        Args:
            sample: Noisy images ``(B, in_channels, H, W)``, ``H`` and ``W`` multiples of
                :attr:`size_multiple`.
            timestep: Diffusion timestep(s) or noise levels, scalar or ``(B,)``.
            class_labels: ``(B,)`` labels in ``[0, num_classes]`` for class-conditional models.
            cross_attention_kwargs: ``{"scale": s}`` scales the LoRA layers for this call
                (diffusers' U-Net convention).
            return_dict: Return a ``UNet2DOutput`` instead of a tuple.

        Returns:
            The prediction ``(B, out_channels, H, W)``.
        """
        why = "2^(levels-1) downsamplings x each level's TMSA window"
        time_token = self._time_token(sample, timestep, class_labels, why)
        with lora_scale(self, cross_attention_kwargs):
            out = self._levels(sample.to(self.dtype).permute(0, 2, 3, 1), time_token)

        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)

    def _levels(self, h: torch.Tensor, time_token: torch.Tensor) -> torch.Tensor:
        """Tokenizer, encoder, decoder and head on a ``(B, H, W, C)`` image; ``(B, C, H, W)``
        out."""

        # (B, H, W, C) memory throughout; convolutions see channels-last NCHW views.
        def conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            return layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

        h = conv(self.tokenizer, h)
        skips = []
        for level, blocks in enumerate(self.encoder_levels):
            for block in blocks:
                h = self._run_block(block, h, time_token)
            if level < len(self.downsamplers):
                skips.append(h)
                h = conv(self.downsamplers[level], h)
        for level in reversed(range(len(self.decoder_levels))):
            h = F.interpolate(h.permute(0, 3, 1, 2), scale_factor=2.0, mode="nearest")
            h = conv(self.upsamplers[level], h.permute(0, 2, 3, 1))
            h = conv(self.skip_fusions[level], torch.cat([h, skips[level]], dim=-1))
            for block in self.decoder_levels[level]:
                h = self._run_block(block, h, time_token)
        return self.conv_out(F.silu(self.norm_out(h.permute(0, 3, 1, 2)))).contiguous()


def _per_level(value: int | tuple[int, ...], levels: int, name: str) -> tuple[int, ...]:
    values = (value,) * levels if isinstance(value, int) else tuple(value)
    if len(values) != levels:
        raise ValueError(f"{name} needs one value or one per level ({levels}), got {value!r}.")
    return values


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------

DIFFIT_UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Paper (H.1, I.1): unconditional CIFAR-10 32x32, 3 levels, window 4.
    "DiffiT-CIFAR10": dict(
        sample_size=32,
        block_out_channels=(128, 256, 256),
        layers_per_level=(4, 4, 4),
        window_size=4,
    ),
    # Paper (H.1, I.1, tables S.2/S.3): unconditional FFHQ 64x64, 4 levels, window 8.
    "DiffiT-FFHQ64": dict(
        sample_size=64,
        block_out_channels=(128, 256, 256, 256),
        layers_per_level=(4, 4, 4, 4),
        window_size=8,
    ),
}

register_presets(DiffiTUNet2DModel, DIFFIT_UNET_PRESETS)

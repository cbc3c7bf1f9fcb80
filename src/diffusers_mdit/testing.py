"""Tiny randomly initialised components for tests and examples (like diffusers'
``testing_utils``): nothing is downloaded, everything runs on a CPU in milliseconds."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from .models import (
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    DiTBaselineTransformer2DModel,
    MDiTTransformer2DModel,
)

# An MDiT with every kind of block: {M, N, K, L} = {1, 1, 2, 1}, widths 32 / 64, 16-wide heads.
TINY_MDIT = dict(
    sample_size=8,
    num_outer_in_blocks=1,
    num_outer_out_blocks=1,
    num_alternating_blocks=2,
    num_core_blocks=1,
    outer_dim=32,
    core_dim=64,
    attention_head_dim=16,
    outer_kernel_size=3,
    core_kernel_size=3,
)

# A two-level image-space DiffiT U-Net, 16x16, 4x4 windows.
TINY_DIFFIT_UNET = dict(
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_level=(1, 1),
    window_size=4,
    attention_head_dim=8,
    norm_num_groups=4,
)


# A two-block latent DiffiT on 8x8 latents with global TMSA, 16-wide heads.
TINY_DIFFIT = dict(sample_size=8, hidden_size=32, num_layers=2, num_attention_heads=2)

# A two-block original DiT (patch 2) on 8x8 latents, 8-wide heads.
TINY_DIT = dict(sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=8)


def randomize(
    model: torch.nn.Module, seed: int = 0, keep_unit_weights: bool = False
) -> torch.nn.Module:
    """Random weights everywhere, in eval mode: fresh models zero-initialise their output heads
    and would predict exactly 0. ``keep_unit_weights``: weights that are exactly 1 (norm
    scales) become ``1 + noise`` instead of ``noise``, so activations keep their scale through
    deep stacks."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            offset = (p == 1).to(p.dtype) if keep_unit_weights else 0.0
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + offset)
    return model.eval()


def tiny_mdit(seed: int = 0, **overrides) -> MDiTTransformer2DModel:
    """:data:`TINY_MDIT` with ``overrides``, randomised with ``seed``."""
    return randomize(MDiTTransformer2DModel(**{**TINY_MDIT, **overrides}), seed)


def tiny_diffit(seed: int = 0, **overrides) -> DiffiTTransformer2DModel:
    """:data:`TINY_DIFFIT` with ``overrides``, randomised with ``seed``."""
    return randomize(DiffiTTransformer2DModel(**{**TINY_DIFFIT, **overrides}), seed)


def tiny_diffit_unet(seed: int = 0, **overrides) -> DiffiTUNet2DModel:
    """:data:`TINY_DIFFIT_UNET` with ``overrides``, randomised with ``seed``."""
    return randomize(DiffiTUNet2DModel(**{**TINY_DIFFIT_UNET, **overrides}), seed)


def tiny_dit(seed: int = 0, **overrides) -> DiTBaselineTransformer2DModel:
    """:data:`TINY_DIT` with ``overrides``, randomised with ``seed``."""
    return randomize(DiTBaselineTransformer2DModel(**{**TINY_DIT, **overrides}), seed)


def ddim_x0() -> DDIMScheduler:
    """The MDiT paper's sampler for x0 models."""
    return DDIMScheduler(prediction_type="sample", clip_sample=False, timestep_spacing="trailing")


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A 2-level ``AutoencoderKL``: 3 channels <-> 4 latent channels, factor 2."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def tiny_text_encoder(seed: int = 0) -> tuple[T5EncoderModel, ByT5Tokenizer]:
    """A one-layer, 32-wide T5 encoder with ByT5's byte tokenizer (no vocabulary file)."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0
    )
    return T5EncoderModel(config).eval(), ByT5Tokenizer()

"""Tiny randomly initialised components for tests and examples (like diffusers'
``testing_utils``): nothing is downloaded, everything runs on a CPU in milliseconds."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from .models import MDiTTransformer2DModel

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


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere, in eval mode: fresh models zero-initialise their output heads
    and would predict exactly 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def tiny_mdit(seed: int = 0, **overrides) -> MDiTTransformer2DModel:
    """:data:`TINY_MDIT` with ``overrides``, randomised with ``seed``."""
    return randomize(MDiTTransformer2DModel(**{**TINY_MDIT, **overrides}), seed)


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

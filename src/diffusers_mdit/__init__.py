"""diffusers-mdit: MDiT and DiffiT diffusion transformers for Hugging Face diffusers."""

from .models import (
    MDIT_PRESETS,
    MDiTTransformer2DModel,
    PartialAxialRoPE,
    neighborhood_attention,
)

__version__ = "0.1.0"


def list_presets() -> list[str]:
    """Every model preset name accepted by a ``from_preset`` of this package."""
    return MDiTTransformer2DModel.list_presets()


__all__ = [
    "MDIT_PRESETS",
    "MDiTTransformer2DModel",
    "PartialAxialRoPE",
    "list_presets",
    "neighborhood_attention",
]

"""diffusers-mdit: MDiT and DiffiT diffusion transformers for Hugging Face diffusers."""

from .models import (
    DIFFIT_PRESETS,
    DIFFIT_UNET_PRESETS,
    DIT_PRESETS,
    MDIT_PRESETS,
    DiffiTTransformer2DModel,
    DiffiTUNet2DModel,
    DiTBaselineTransformer2DModel,
    MDiTTransformer2DModel,
    PartialAxialRoPE,
    from_preset,
    list_presets,
    neighborhood_attention,
)
from .pipelines import DiffiTPipeline, DiTBaselinePipeline, MDiTPipeline, MDiTTextToImagePipeline
from .version import __version__ as __version__

__all__ = [
    "DIFFIT_PRESETS",
    "DIFFIT_UNET_PRESETS",
    "DIT_PRESETS",
    "MDIT_PRESETS",
    "DiTBaselinePipeline",
    "DiTBaselineTransformer2DModel",
    "DiffiTPipeline",
    "DiffiTTransformer2DModel",
    "DiffiTUNet2DModel",
    "MDiTPipeline",
    "MDiTTextToImagePipeline",
    "MDiTTransformer2DModel",
    "PartialAxialRoPE",
    "from_preset",
    "list_presets",
    "neighborhood_attention",
]

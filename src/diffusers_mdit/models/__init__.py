from .diffit import (
    DIFFIT_PRESETS,
    DiffiTAdaLNBlock,
    DiffiTBlock,
    DiffiTTransformer2DModel,
    TimeDependentSelfAttention,
)
from .diffit_unet import DIFFIT_UNET_PRESETS, DiffiTResBlock, DiffiTUNet2DModel
from .dit import DIT_PRESETS, DiTBaselineTransformer2DModel, paper_parameter_count
from .mdit import MDIT_PRESETS, AggregateBlock, CoreBlock, MDiTTransformer2DModel, OuterBlock
from .neighborhood_attention import neighborhood_attention
from .presets import from_preset, list_presets
from .rope import PartialAxialRoPE

__all__ = [
    "DIFFIT_PRESETS",
    "DIFFIT_UNET_PRESETS",
    "DIT_PRESETS",
    "MDIT_PRESETS",
    "AggregateBlock",
    "CoreBlock",
    "DiffiTAdaLNBlock",
    "DiffiTBlock",
    "DiffiTResBlock",
    "DiffiTTransformer2DModel",
    "DiTBaselineTransformer2DModel",
    "DiffiTUNet2DModel",
    "MDiTTransformer2DModel",
    "OuterBlock",
    "PartialAxialRoPE",
    "TimeDependentSelfAttention",
    "from_preset",
    "list_presets",
    "neighborhood_attention",
    "paper_parameter_count",
]

from .mdit import MDIT_PRESETS, AggregateBlock, CoreBlock, MDiTTransformer2DModel, OuterBlock
from .neighborhood_attention import neighborhood_attention
from .rope import PartialAxialRoPE

__all__ = [
    "MDIT_PRESETS",
    "AggregateBlock",
    "CoreBlock",
    "MDiTTransformer2DModel",
    "OuterBlock",
    "PartialAxialRoPE",
    "neighborhood_attention",
]

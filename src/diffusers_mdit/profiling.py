"""Parameter and FLOP counting without allocating weights (models built on the meta device).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add,
matmuls and attention only). On the meta device neighborhood attention runs its reference
backend, whose matmuls have exactly the ideal neighborhood shapes, so the count is the model's
arithmetic, not that of a particular kernel. Papers in this field (DiT, MDiT) quote "GFLOPs" that
are multiply-accumulates as counted by fvcore; :class:`ModelCost` reports both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class ModelCost:
    """Size and forward cost of a model at one input shape."""

    parameters: int
    flops: int

    @property
    def gmacs(self) -> float:
        return self.flops / 2e9

    @property
    def gflops(self) -> float:
        return self.flops / 1e9


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: torch.nn.Module, *args, **kwargs) -> int:
    """FLOPs of one forward call ``model(*args, **kwargs)`` (2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.get_total_flops()


def preset_cost(
    name: str, height: int = 32, width: int = 32, batch_size: int = 1, **overrides
) -> ModelCost:
    """Parameters and forward FLOPs of an MDiT preset, built on the meta device."""
    from .models import MDiTTransformer2DModel

    with torch.device("meta"):
        model = MDiTTransformer2DModel.from_preset(name, **overrides)
        config = model.config
        latents = torch.zeros(batch_size, config.in_channels, height, width)
        timestep = torch.zeros(batch_size)
        labels = torch.zeros(batch_size, dtype=torch.long) if config.num_classes else None
        flops = forward_flops(model, latents, timestep, class_labels=labels)
    return ModelCost(count_parameters(model), flops)

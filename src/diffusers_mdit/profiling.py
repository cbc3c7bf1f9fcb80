"""Parameter and FLOP counting without allocating weights (models built on the meta device).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add,
matmuls and attention only). On the meta device neighborhood attention runs its reference
backend, whose matmuls have exactly the ideal neighborhood shapes, so the count is the model's
arithmetic, not that of a particular kernel. Papers in this field (DiT, MDiT) quote "GFLOPs" that
are multiply-accumulates as counted by fvcore; :class:`ModelCost` reports both.
"""

from __future__ import annotations

import platform
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


def config_cost(
    config, height: int = 32, width: int = 32, batch_size: int = 1, **overrides
) -> ModelCost:
    """Parameters and forward FLOPs of the model of ``config`` (a dict or FrozenDict; its
    ``_class_name`` picks a family of ``families.FAMILIES``, MDiT by default) with
    ``overrides``, built on the meta device so that every count is exact and nothing is
    allocated."""
    from .families import FAMILIES

    config = {**dict(config), **overrides}
    name = config.get("_class_name", "MDiTTransformer2DModel")
    if name not in FAMILIES:
        raise ValueError(f"config_cost counts {', '.join(FAMILIES)}; this config is {name!r}.")
    with torch.device("meta"):
        model = FAMILIES[name].model_class.from_config(config)
        return _meta_cost(model, height, width, batch_size)


def preset_cost(
    name: str,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    **overrides,
) -> ModelCost:
    """Parameters and forward FLOPs of any preset of the package (built on the meta device)
    on a ``height x width`` input, by default the preset's ``sample_size``."""
    from .models import from_preset

    with torch.device("meta"):
        model = from_preset(name, **overrides)
        size = model.config.sample_size
        return _meta_cost(model, height or size, width or size, batch_size)


def _meta_cost(model: torch.nn.Module, height: int, width: int, batch_size: int) -> ModelCost:
    config = model.config
    sample = torch.zeros(batch_size, config.in_channels, height, width, device="meta")
    timestep = torch.zeros(batch_size, device="meta")
    labels = (
        torch.zeros(batch_size, dtype=torch.long, device="meta") if config.num_classes else None
    )
    flops = forward_flops(model, sample, timestep, class_labels=labels)
    return ModelCost(count_parameters(model), flops // batch_size)


def cpu_name() -> str:
    """The CPU model, for benchmark headers (``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"

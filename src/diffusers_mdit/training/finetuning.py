"""Fine-tuning a trained MDiT to larger images (MDiT paper, appendix J), and LoRA.

Modes (``train_mdit.py --finetune``):

- ``full``: every parameter trains.
- ``aggregate`` (J.1): the core and aggregate self-attention switch to neighborhood attention
  (``kernel_size``, 15 in the paper), and only the aggregate blocks train (parameters whose name
  contains ``aggregate``).
- ``patch`` (J.2): the core patch grows by replication
  (:func:`expand_core_patch`, 2x2 -> 4x4 in the paper)
  and only the core patch embedding and un-patching projections train
  (``core_patch_embed.proj``, ``core_unpatch.proj``).
- ``lora``: PEFT LoRA adapters on the attention and feed-forward projections; only they train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import PatchEmbed, Unpatch, merge_tokens, split_tokens

if TYPE_CHECKING:
    from ..models import MDiTTransformer2DModel

FINETUNE_MODES = ("full", "aggregate", "patch", "lora")
PATCH_PROJECTIONS = ("core_patch_embed.proj.weight", "core_unpatch.proj.weight")


@dataclass
class FinetuneSummary:
    """Trainable and total parameters after :func:`prepare_finetuning`."""

    mode: str
    trainable: int
    total: int

    def __str__(self) -> str:
        return (
            f"fine-tuning mode {self.mode!r}: {self.trainable:,} trainable of {self.total:,} "
            f"parameters ({100 * self.trainable / self.total:.2f}%)"
        )


def prepare_finetuning(
    model: nn.Module,
    mode: str,
    kernel_size: int = 15,
    patch_factor: int = 2,
    lora_rank: int = 16,
    lora_alpha: float | None = None,
    lora_targets: list[str] | None = None,
) -> FinetuneSummary:
    """Set up ``model`` (an MDiT) for fine-tuning in ``mode`` (see the module docstring): change
    its structure where the mode asks and set ``requires_grad`` on exactly the parameters that
    train."""
    from ..models import MDiTTransformer2DModel

    if mode not in FINETUNE_MODES:
        raise ValueError(f"Unknown fine-tuning mode {mode!r}; choose one of {FINETUNE_MODES}.")
    if mode in ("aggregate", "patch") and not isinstance(model, MDiTTransformer2DModel):
        raise ValueError(
            f"--finetune {mode} needs an MDiT (appendix J), got {type(model).__name__}; use "
            "--finetune full or lora."
        )
    if mode == "aggregate":
        if not len(model.aggregate_blocks):
            raise ValueError(
                "--finetune aggregate needs aggregate blocks (num_alternating_blocks > 0); this "
                "model has none. Use --finetune patch, full or lora."
            )
        model.set_core_attention("neighborhood", kernel_size)
        trains = lambda name: "aggregate" in name  # noqa: E731
    elif mode == "patch":
        expand_core_patch(model, patch_factor)
        trains = lambda name: name in PATCH_PROJECTIONS  # noqa: E731
    elif mode == "lora":
        from ..lora import lora_config

        model.requires_grad_(False)
        config = lora_config(rank=lora_rank, alpha=lora_alpha, target_modules=lora_targets)
        model.add_adapter(config)
        trains = lambda name: "lora_" in name  # noqa: E731
    else:
        trains = lambda name: True  # noqa: E731
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trains(name))
    total = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return FinetuneSummary(mode=mode, trainable=trainable, total=total)


@torch.no_grad()
def expand_core_patch(model: MDiTTransformer2DModel, factor: int = 2) -> None:
    """Patch-only fine-tuning (appendix J.2): grow ``model``'s core patch from ``p`` to
    ``factor * p`` by replication, so the core keeps its grid size on ``factor``-times larger
    inputs.

    The new patch embedding averages each ``factor x factor`` group of outer tokens before
    applying the old one (average pooling on the way in); the new un-patching repeats each
    old output token ``factor x factor`` times (nearest-neighbour on the way out). On an
    input upsampled by ``factor`` the core therefore starts from exactly what it computed on
    the original input. The new patch size is written to the config, so the model saves and
    loads as it is.
    """
    if factor < 2:
        raise ValueError(f"expand_core_patch needs a factor >= 2, got {factor}.")
    old = model.config.core_patch_size
    new = old * factor
    embed, unpatch = model.core_patch_embed, model.core_unpatch
    channels_in = embed.proj.in_features // old**2
    channels_out = unpatch.proj.out_features // old**2
    device, dtype = embed.proj.weight.device, embed.proj.weight.dtype

    # Both maps are linear: read the new matrices off the responses to basis vectors.
    n = channels_in * new**2
    basis = split_tokens(torch.eye(n, device=device, dtype=dtype).view(n, 1, 1, n), new)
    pooled = F.avg_pool2d(basis.permute(0, 3, 1, 2), factor).permute(0, 2, 3, 1)
    embed_weight = embed.proj(merge_tokens(pooled, old)).view(n, -1).T
    m = unpatch.proj.in_features
    tokens = unpatch.proj(torch.eye(m, device=device, dtype=dtype).view(m, 1, 1, m))
    upsampled = split_tokens(tokens, old).repeat_interleave(factor, 1)
    upsampled = upsampled.repeat_interleave(factor, 2)
    unpatch_weight = merge_tokens(upsampled, new).view(m, -1).T

    model.core_patch_embed = PatchEmbed(channels_in, embed.proj.out_features, new)
    model.core_patch_embed.proj.weight.copy_(embed_weight)
    model.core_unpatch = Unpatch(m, channels_out, new)
    model.core_unpatch.norm.load_state_dict(unpatch.norm.state_dict())
    model.core_unpatch.proj.weight.copy_(unpatch_weight)
    model.core_patch_embed.to(device=device, dtype=dtype)
    model.core_unpatch.to(device=device, dtype=dtype)
    model.register_to_config(core_patch_size=new, sample_size=model.config.sample_size * factor)

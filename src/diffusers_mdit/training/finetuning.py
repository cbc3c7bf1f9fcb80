"""Fine-tuning a trained MDiT to larger images (MDiT paper, appendix J), and LoRA.

Modes (``train_mdit.py --finetune``):

- ``full``: every parameter trains.
- ``aggregate`` (J.1): the core and aggregate self-attention switch to neighborhood attention
  (``kernel_size``, 15 in the paper), and only the aggregate blocks train (parameters whose name
  contains ``aggregate``).
- ``patch`` (J.2): the core patch grows by replication
  (:meth:`~diffusers_mdit.MDiTTransformer2DModel.expand_core_patch`, 2x2 -> 4x4 in the paper)
  and only the core patch embedding and un-patching projections train
  (``core_patch_embed.proj``, ``core_unpatch.proj``).
- ``lora``: PEFT LoRA adapters on the attention and feed-forward projections; only they train.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

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
        model.expand_core_patch(patch_factor)
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

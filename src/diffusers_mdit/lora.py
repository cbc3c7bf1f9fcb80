"""LoRA through PEFT: adapter configs for MDiT and DiffiT, and the pipelines' LoRA loader.

The models are diffusers ``PeftAdapterMixin`` models, so an adapter is added with
``model.add_adapter(lora_config(...))`` and trained like any PEFT LoRA. Pipelines save and load
adapters the diffusers way (:class:`MDiTLoraLoaderMixin`: ``save_lora_weights``,
``load_lora_weights``, ``fuse_lora``, ``unfuse_lora``, ``set_adapters``...): one
``pytorch_lora_weights.safetensors`` whose keys start with ``transformer.`` and whose
safetensors metadata holds the ``LoraConfig`` (rank, alpha, target modules), so the scale
``alpha / rank`` survives the round trip.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.loaders import SanaLoraLoaderMixin
from diffusers.utils import logging
from peft import LoraConfig, get_peft_model_state_dict
from safetensors import SafetensorError
from torch import nn

from .hub import _refuse_pickle, _refuse_pickle_save

logger = logging.get_logger(__name__)

# Module-name suffixes of each group, for every model of the package. A suffix matches after a
# dot, so ``attn.to_q`` is the self-attention's and not ``cross_attn.to_q``.
LORA_TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    # Self-attention of every block: MDiT's outer, core and aggregate blocks (Q, K, V, O) and
    # DiffiT's TMSA (the spatial Q, K, V, the time token's fused QKV, O).
    "attention": (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.time_to_qkv",
    ),
    # MDiT core blocks' cross-attention over [null, condition tokens, time token] (eq. 5).
    "cross_attention": (
        "cross_attn.to_q",
        "cross_attn.to_k",
        "cross_attn.to_v",
        "cross_attn.to_k_time",
        "cross_attn.to_v_time",
        "cross_attn.to_out.0",
    ),
    # Input (GeGLU / GELU) and output projections of every block's feed-forward.
    "feed_forward": ("ff.net.0.proj", "ff.net.2", "mlp.net.0.proj", "mlp.net.2"),
}
DEFAULT_LORA_TARGETS = ("attention", "cross_attention", "feed_forward")

# MDiT's mapping network and DiffiT's time-token MLP carry feed-forward names but are not blocks:
# the groups leave the global conditioning as it is.
_OUTSIDE_BLOCKS = ("condition_embedding.", "time_token.")


def lora_target_modules(targets: str | Sequence[str] | None = None) -> str:
    """The PEFT ``target_modules`` regex (matched against whole module names) for ``targets``.

    Each target is a group of :data:`LORA_TARGET_GROUPS` or a module name, which matches that
    module and every module whose name ends with ``.<name>`` (PEFT's rule for lists), e.g.
    ``"proj_in"`` or ``"to_q"`` (self- and cross-attention queries). ``None``: all groups.
    """
    targets = DEFAULT_LORA_TARGETS if targets is None else targets
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError(f"No LoRA targets given; choose groups of {sorted(LORA_TARGET_GROUPS)}.")
    suffixes = [s for t in targets if t in LORA_TARGET_GROUPS for s in LORA_TARGET_GROUPS[t]]
    names = [t for t in targets if t not in LORA_TARGET_GROUPS]
    patterns = []
    if suffixes:
        outside = "|".join(map(re.escape, _OUTSIDE_BLOCKS))
        patterns.append(rf"(?!{outside}).*\.(?:{'|'.join(map(re.escape, suffixes))})")
    if names:
        patterns.append(rf"(?:.*\.)?(?:{'|'.join(map(re.escape, names))})")
    return "|".join(patterns)


def lora_config(
    rank: int = 16,
    alpha: float | None = None,
    target_modules: str | Sequence[str] | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> LoraConfig:
    """A ``peft.LoraConfig`` for ``model.add_adapter``.

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank``. Default: the rank (scale 1).
        target_modules: Groups of :data:`LORA_TARGET_GROUPS` and module names, see
            :func:`lora_target_modules`. Default: every block's self-attention,
            cross-attention and feed-forward projections.
        dropout: Dropout on the LoRA branch's input.
        kwargs: Further ``LoraConfig`` arguments (``use_dora``, ``init_lora_weights``...).

    PEFT initialises ``lora_B`` to zero, so an adapted model starts equal to its base.
    """
    return LoraConfig(
        r=rank,
        lora_alpha=rank if alpha is None else alpha,
        target_modules=lora_target_modules(target_modules),
        lora_dropout=dropout,
        **kwargs,
    )


def get_lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's LoRA weights with PEFT's keys (``core_blocks.0.attn.to_q.lora_A.weight``),
    for ``save_lora_weights(transformer_lora_layers=...)``."""
    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def get_lora_metadata(model: nn.Module, adapter_name: str = "default") -> dict[str, Any]:
    """The adapter's ``LoraConfig`` as a dict, for
    ``save_lora_weights(transformer_lora_adapter_metadata=...)``."""
    return model.peft_config[adapter_name].to_dict()


def check_lora_modules(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Raise if ``state_dict`` (LoRA weights with the model's module names) adapts modules that
    ``model`` lacks (diffusers only logs a warning and leaves those weights out), or modules of
    other widths (PEFT fails with a long list of size mismatches)."""
    modules = dict(model.named_modules())
    missing = sorted({key.split(".lora_")[0] for key in state_dict} - modules.keys())
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ValueError(
            f"The LoRA weights adapt {len(missing)} module(s) that this "
            f"{type(model).__name__} does not have: {shown}. They were trained for a model of "
            "another layout; load them into a pipeline with the base model they were trained on."
        )
    for key, weight in state_dict.items():
        name, _, part = key.partition(".lora_")
        module = modules[name]
        features = getattr(module, "in_features", None), getattr(module, "out_features", None)
        # lora_A maps the module's input down to the rank, lora_B the rank up to its output.
        axis, width = (1, features[0]) if part.startswith("A.") else (0, features[1])
        if width is not None and weight.ndim == 2 and weight.shape[axis] != width:
            raise ValueError(
                f"The LoRA weight {key} has shape {tuple(weight.shape)} but {name} of this "
                f"{type(model).__name__} maps {features[0]} -> {features[1]} features: the "
                "weights were trained for a model of other widths. Load them into a pipeline "
                "with the base model they were trained on."
            )


_LEGACY_LORA_NAMES = (
    (re.compile(r"^(.*attn)\.to_out\.(lora_.*)$"), r"\1.to_out.0.\2"),
    (re.compile(r"^(.*cross_attn)\.to_(k|v)_cond\.(lora_.*)$"), r"\1.to_\2.\3"),
)
_LEGACY_FUSED_QKV = re.compile(r"^(.*attn)\.to_qkv\.lora_(A|B)\.(weight|bias)$")


def convert_legacy_lora_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA weights saved before the diffusers attention naming, renamed as
    :func:`~diffusers_mdit.models.attention.convert_legacy_attention_keys` renames the models'
    (diffusers' loaders know only their own models' old names). A LoRA of DiffiT's fused
    ``to_qkv`` splits exactly: ``dW_qkv = B A`` stacks ``B_q A``, ``B_k A``, ``B_v A``, so each
    of ``to_q``, ``to_k``, ``to_v`` gets the shared ``lora_A`` and its third of ``lora_B``."""
    converted = {}
    for key, value in state_dict.items():
        fused = _LEGACY_FUSED_QKV.match(key)
        if fused:
            prefix, part, kind = fused.groups()
            pieces = (value,) * 3 if part == "A" else value.chunk(3, dim=0)
            for name, piece in zip("qkv", pieces, strict=True):
                converted[f"{prefix}.to_{name}.lora_{part}.{kind}"] = piece.contiguous()
            continue
        for pattern, replacement in _LEGACY_LORA_NAMES:
            key = pattern.sub(replacement, key)
        converted[key] = value
    return converted


class MDiTLoraLoaderMixin(SanaLoraLoaderMixin):
    """LoRA loading, saving and fusing for the pipelines of this package (their ``transformer``).

    diffusers' transformer-only loader (as for Sana) with what it lacks for our models on top:
    safetensors only, the attention layers' old names renamed, a clear error for LoRA weights of
    modules the model lacks, and a warning when saving without the adapter's config (then
    loading assumes ``alpha = rank``). ``load_lora_weights`` is diffusers' own.

    Example::

        pipe.transformer.add_adapter(lora_config(rank=8, alpha=16))
        ...  # train
        pipe.save_lora_weights(
            "my-lora",
            transformer_lora_layers=get_lora_state_dict(pipe.transformer),
            transformer_lora_adapter_metadata=get_lora_metadata(pipe.transformer),
        )
        base = MDiTPipeline.from_pretrained("base-pipeline")
        base.load_lora_weights("my-lora", adapter_name="style")
        base.fuse_lora()
    """

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor], **kwargs: Any
    ):
        """diffusers' ``lora_state_dict`` with safetensors forced (see ``load_lora_weights``)."""
        _refuse_pickle(kwargs)
        try:
            return super().lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        except SafetensorError as error:
            raise ValueError(
                f"The LoRA weights in {pretrained_model_name_or_path_or_dict!r} cannot be read "
                f"({error}): the file is truncated or corrupt. Save or download it again."
            ) from error

    @classmethod
    def load_lora_into_transformer(cls, state_dict, transformer, **kwargs: Any) -> None:
        """diffusers' loader after renaming the LoRA weights of the attention layers' old names
        (:func:`convert_legacy_lora_keys`) and checking them against the model. Rank and alpha
        come from the file's metadata; without it the alpha is taken to be the rank."""
        state_dict = convert_legacy_lora_keys(dict(state_dict))
        prefix = f"{cls.transformer_name}."
        check_lora_modules(
            {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)},
            transformer,
        )
        super().load_lora_into_transformer(state_dict, transformer, **kwargs)

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict[str, Any] | None = None,
    ) -> None:
        """Write ``pytorch_lora_weights.safetensors`` (or ``weight_name``) in
        ``save_directory``.

        Args:
            transformer_lora_layers: The LoRA weights, :func:`get_lora_state_dict`.
            transformer_lora_adapter_metadata: The adapter's config, :func:`get_lora_metadata`;
                stored in the safetensors metadata so rank and alpha survive.
            is_main_process, weight_name, save_function, safe_serialization: As in diffusers
                (safetensors only).
        """
        _refuse_pickle_save(safe_serialization)
        if transformer_lora_layers and transformer_lora_adapter_metadata is None:
            logger.warning(
                "Saving LoRA weights without transformer_lora_adapter_metadata: loading them will "
                "assume alpha = rank. Pass get_lora_metadata(transformer) to keep the alpha."
            )
        super().save_lora_weights(
            save_directory,
            transformer_lora_layers=transformer_lora_layers,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
            transformer_lora_adapter_metadata=transformer_lora_adapter_metadata,
        )

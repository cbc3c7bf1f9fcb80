"""The official NVIDIA DiffiT checkpoints (Hub ``nvidia/DiffiT``: ``diffit_256.safetensors``,
``diffit_512.safetensors``; network ``diffit/diffit.py`` of GitHub NVlabs/DiffiT, commit 9f6f0a5)
as :class:`~diffusers_mdit.DiffiTTransformer2DModel` weights, and the authors' sampling settings.

Their network is ours up to three conversions, each checked against the official code by
``tests/models/test_conversion_diffit.py`` (a fixture generated with it):

- key names (:data:`TOP_LEVEL_KEYS`, :data:`BLOCK_KEYS`); their fused ``qkv`` is split into our
  ``to_q``, ``to_k``, ``to_v`` (its rows are the three stacked);
- their time projection ``qkv_temb`` has a bias, ours (``time_to_qkv``, eq. 3-5) has none: both
  biases are added to every token's qkv, so theirs folds exactly into the q/k/v biases;
- their unpatchify reads the last linear's outputs as ``(p, q, c)``, ours as ``(c, p, q)``
  (:func:`~diffusers_mdit.models.layers.split_tokens`): ``proj_out``'s rows are permuted.

``pos_embed`` (fixed 2D sin-cos) and ``relative_position_index`` are not weights: ours are
recomputed, and the checkpoint's must equal them.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

# official name -> ours, outside the blocks
TOP_LEVEL_KEYS = {
    "x_embedder.proj.weight": "patch_embed.proj.weight",
    "x_embedder.proj.bias": "patch_embed.proj.bias",
    "t_embedder.mlp.0.weight": "time_token.mlp.linear_1.weight",
    "t_embedder.mlp.0.bias": "time_token.mlp.linear_1.bias",
    "t_embedder.mlp.2.weight": "time_token.mlp.linear_2.weight",
    "t_embedder.mlp.2.bias": "time_token.mlp.linear_2.bias",
    "y_embedder.embedding_table.weight": "time_token.class_embedding.weight",
    "final_layer.linear.weight": "proj_out.weight",
    "final_layer.linear.bias": "proj_out.bias",
}
# official name -> ours, inside ``blocks.<i>.``; a tuple: the rows split in equal parts
BLOCK_KEYS: dict[str, str | tuple[str, ...]] = {
    "attn.qkv.weight": ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"),
    "attn.qkv.bias": ("attn.to_q.bias", "attn.to_k.bias", "attn.to_v.bias"),
    "attn.qkv_temb.weight": "attn.time_to_qkv.weight",
    "attn.relative_position_bias_table": "attn.relative_position_bias.table",
    "attn.proj.weight": "attn.to_out.0.weight",
    "attn.proj.bias": "attn.to_out.0.bias",
    "mlp.fc1.weight": "mlp.net.0.proj.weight",
    "mlp.fc1.bias": "mlp.net.0.proj.bias",
    "mlp.fc2.weight": "mlp.net.2.weight",
    "mlp.fc2.bias": "mlp.net.2.bias",
}
FOLDED_BLOCK_KEY = "attn.qkv_temb.bias"  # added to attn.qkv.bias
RECOMPUTED_KEY = "pos_embed"
RECOMPUTED_BLOCK_KEY = "attn.relative_position_index"

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_HUB_PREFIXES = ("https://huggingface.co/", "https://hf.co/", "huggingface.co/", "hf.co/")

# The authors' sampling (their sample.py and slurm_sample_{256,512}.sh, with the diffusion of
# MDT's masked_diffusion package that sample.py copies): 250 respaced ancestral steps, guidance
# on the first three latent channels; at 256px scale 4.4 ramped with the power-cosine schedule
# of ``forward_with_cfg`` (power 4, from the timestep), at 512px a constant 1.49.
OFFICIAL_SAMPLING: dict[int, dict[str, Any]] = {
    256: dict(
        num_inference_steps=250,
        guidance_scale=4.4,
        guidance_schedule="power-cosine",
        guidance_power=4.0,
        guidance_channels=3,
    ),
    512: dict(
        num_inference_steps=250,
        guidance_scale=1.49,
        guidance_schedule="constant",
        guidance_channels=3,
    ),
}
OFFICIAL_FID = {256: "FID-50K 1.73, IS 276.49", 512: "FID-50K 2.67, IS 252.12"}
OFFICIAL_VAE = "stabilityai/sd-vae-ft-ema"
OFFICIAL_VAE_SCALING_FACTOR = 0.18215  # their sample.py decodes ``sample / 0.18215``


def official_image_size(sample_size: int) -> int:
    """Which official setting (256 or 512) a latent size samples with: their
    ``forward_with_cfg`` switches from the power-cosine ramp to a constant scale above
    32x32 latents."""
    return 256 if sample_size <= 32 else 512


def official_diffit_scheduler() -> DDPMScheduler:
    """guided-diffusion's respaced sampler as MDT's ``create_diffusion`` builds it for DiffiT:
    linear betas 1e-4..0.02 over 1000 steps, epsilon prediction, learned-range variance, no
    clipping. ``timestep_spacing="linspace"`` gives its ``space_timesteps(1000, "250")``."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        variance_type="learned_range",
        clip_sample=False,
        timestep_spacing="linspace",
    )


# -- reading a checkpoint ---------------------------------------------------------------------


def resolve_checkpoint(
    pretrained_model_link_or_path: str | os.PathLike, **download_kwargs: Any
) -> Path:
    """A local file, or a Hub file (``https://huggingface.co/<repo>/blob/<rev>/<file>``,
    ``hf.co/<repo>/<file>`` or ``<owner>/<repo>/<file>``) through huggingface_hub's cache;
    ``download_kwargs`` go to ``hf_hub_download`` (``revision``, ``cache_dir``, ``token``, ...)."""
    source = str(pretrained_model_link_or_path)
    if os.path.isfile(source):
        return Path(source)
    link = source
    for prefix in _HUB_PREFIXES:
        if link.startswith(prefix):
            link = link[len(prefix) :]
            break
    else:
        if "://" in link or link.startswith((".", "/")):
            raise ValueError(f"{source} is neither a local file nor a Hugging Face Hub file.")
    match = re.fullmatch(r"([^/]+)/([^/]+)/(?:(?:blob|resolve)/([^/]+)/)?(.+)", link)
    if match is None:
        raise ValueError(
            f"{source} is neither a local file nor a Hub file (<owner>/<repo>/<file> or its URL)."
        )
    owner, name, revision, filename = match.groups()
    if revision is not None and download_kwargs.get("revision") is None:
        download_kwargs["revision"] = revision
    return Path(hf_hub_download(f"{owner}/{name}", filename, **download_kwargs))


def load_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: safetensors, or a pickle read with
    ``torch.load(weights_only=True)`` (which refuses anything but tensors and plain containers,
    so a checkpoint cannot run code); anything else is refused."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: not a .safetensors (or {'/'.join(PICKLE_SUFFIXES)}) file.")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds objects other than tensors and is refused: loading it would run its "
            f"code. Convert the weights to safetensors where you trust the file. ({error})"
        ) from error
    if not isinstance(state_dict, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor)
        for key, value in state_dict.items()
    ):
        raise ValueError(f"{path} is not a flat state dict of tensors.")
    return state_dict


# -- the conversion ---------------------------------------------------------------------------


def _required(state_dict: dict[str, torch.Tensor], *keys: str) -> list[torch.Tensor]:
    missing = [key for key in keys if key not in state_dict]
    if missing:
        raise ValueError(f"Not an official DiffiT checkpoint: missing tensor(s) {missing}.")
    return [state_dict[key] for key in keys]


def infer_diffit_config(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The :class:`~diffusers_mdit.DiffiTTransformer2DModel` config of an official checkpoint,
    from its tensor shapes. The label table has ``num_classes + 1`` rows (the last is the null
    label: the official model trains with label dropout); global attention (their window is
    the whole token grid)."""
    patch, pos_embed, table, labels, final, frequency, fc1 = _required(
        state_dict,
        "x_embedder.proj.weight",
        RECOMPUTED_KEY,
        "blocks.0.attn.relative_position_bias_table",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight",
        "t_embedder.mlp.0.weight",
        "blocks.0.mlp.fc1.weight",
    )
    hidden_size, in_channels, patch_size, _ = patch.shape
    grid = math.isqrt(pos_embed.shape[1])
    if grid * grid != pos_embed.shape[1]:
        raise ValueError(f"pos_embed {tuple(pos_embed.shape)} is not a square token grid.")
    blocks = {int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))}
    # blocks.0 exists (above); gaps and extra blocks show as missing / unknown tensors later
    return dict(
        sample_size=grid * patch_size,
        in_channels=in_channels,
        out_channels=final.shape[0] // patch_size**2,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_layers=max(blocks) + 1,
        num_attention_heads=table.shape[1],
        mlp_ratio=fc1.shape[0] / hidden_size,
        window_size=None,
        num_classes=labels.shape[0] - 1,
        frequency_embedding_size=frequency.shape[1],
        qkv_bias=True,
    )


def expected_official_keys(num_layers: int) -> set[str]:
    """Every tensor name of an official checkpoint with ``num_layers`` blocks."""
    block_keys = [*BLOCK_KEYS, FOLDED_BLOCK_KEY, RECOMPUTED_BLOCK_KEY]
    return {
        *TOP_LEVEL_KEYS,
        RECOMPUTED_KEY,
        *(f"blocks.{i}.{key}" for i in range(num_layers) for key in block_keys),
    }


def output_rows_to_ours(tensor: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reorder the final linear's output rows (weight or bias) from the official unpatchify's
    ``(p, q, c)`` order to :func:`~diffusers_mdit.models.layers.split_tokens`' ``(c, p, q)``."""
    rows = tensor.shape[0]
    grouped = tensor.reshape(patch_size, patch_size, rows // patch_size**2, *tensor.shape[1:])
    return grouped.movedim(2, 0).reshape(tensor.shape)


def convert_diffit_state_dict(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Our state dict for ``model`` (a freshly built ``DiffiTTransformer2DModel`` of the
    checkpoint's config) from an official one. Refuses, naming them, unknown, missing and
    mis-shaped tensors, and a ``pos_embed`` / ``relative_position_index`` that differ from ours.
    """
    config = model.config
    expected = expected_official_keys(config.num_layers)
    unknown = sorted(set(state_dict) - expected)
    missing = sorted(expected - set(state_dict))
    if unknown or missing:
        raise ValueError(
            "Not an official DiffiT checkpoint of the inferred config "
            f"(num_layers={config.num_layers}): unknown tensor(s) {unknown}, missing tensor(s) "
            f"{missing}."
        )

    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    names: dict[str, tuple[str, ...]] = {k: (v,) for k, v in TOP_LEVEL_KEYS.items()}
    for i in range(config.num_layers):
        for official, target in BLOCK_KEYS.items():
            targets = (target,) if isinstance(target, str) else target
            names[f"blocks.{i}.{official}"] = tuple(f"blocks.{i}.{t}" for t in targets)
        names[f"blocks.{i}.{FOLDED_BLOCK_KEY}"] = names[f"blocks.{i}.attn.qkv.bias"]

    def expected_shape(targets: tuple[str, ...]) -> tuple[int, ...]:
        first, *rest = shapes[targets[0]]
        return (first * len(targets), *rest)

    mis_shaped = [
        f"{official} {tuple(state_dict[official].shape)} (expected {expected_shape(targets)})"
        for official, targets in names.items()
        if tuple(state_dict[official].shape) != expected_shape(targets)
    ]
    if mis_shaped:
        raise ValueError(f"Mis-shaped tensor(s) in the DiffiT checkpoint: {mis_shaped}.")

    converted = {}
    for official, targets in names.items():
        if official.endswith(FOLDED_BLOCK_KEY):
            continue
        value = state_dict[official]
        if official.endswith("attn.qkv.bias"):
            value = value + state_dict[official.replace("attn.qkv.bias", FOLDED_BLOCK_KEY)]
        for target, part in zip(targets, value.chunk(len(targets)), strict=True):
            converted[target] = part.contiguous()
    for name in ("weight", "bias"):
        converted[f"proj_out.{name}"] = output_rows_to_ours(
            converted[f"proj_out.{name}"], config.patch_size
        )
    _check_recomputed(state_dict, model)
    return converted


def _check_recomputed(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    config = model.config
    ours = model.patch_embed.pos_embed
    theirs = state_dict[RECOMPUTED_KEY]
    if theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours.float(), atol=1e-5):
        raise ValueError(
            f"{RECOMPUTED_KEY} {tuple(theirs.shape)} differs from the fixed 2D sin-cos embedding "
            "of the inferred config: not the official DiffiT network."
        )
    grid = config.sample_size // config.patch_size
    for i, block in enumerate(model.blocks):
        index = block.attn.relative_position_bias.index(grid, grid, torch.device("cpu"))
        key = f"blocks.{i}.{RECOMPUTED_BLOCK_KEY}"
        if not torch.equal(state_dict[key].to(index.dtype), index):
            raise ValueError(f"{key} differs from the Swin-style index of a {grid}x{grid} grid.")


class FromOriginalDiffiTMixin:
    """``from_single_file`` for the official DiffiT checkpoints, the diffusers convention for
    original (non-diffusers) weights."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike,
        *,
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **config_overrides: Any,
    ):
        """Load an official DiffiT checkpoint (local file, Hub URL or ``<owner>/<repo>/<file>``,
        e.g. ``nvidia/DiffiT/diffit_256.safetensors``): infer the config from the tensor shapes
        (``config_overrides`` replace inferred fields), convert, and load strictly.

        Raises:
            ValueError: for a file that is not an official DiffiT checkpoint (missing, unknown
                or mis-shaped tensors, named), or a pickle holding anything but tensors.
        """
        path = resolve_checkpoint(
            pretrained_model_link_or_path,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        state_dict = load_official_state_dict(path)
        config = {**infer_diffit_config(state_dict), **config_overrides}
        model = cls(**config)
        model.load_state_dict(convert_diffit_state_dict(state_dict, model), strict=True)
        model.register_to_config(_name_or_path=str(pretrained_model_link_or_path))
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()

"""MDiT: the multi-scale diffusion transformer of "Multi-Scale Image Diffusion Transformers:
Explainability Leads to Faster Training" (section 3, appendix G).

Layout ``{M, N, K, L}``::

    latent (B, C, H, W) -> channels-last (B, H, W, C)
      1x1 embedding to the outer width d
      M outer blocks            full resolution, neighborhood attention (k=7), modulated RMSNorm
      skip = h
      core patch 2x2 -> width 2d
        K/2 x [core block, aggregate block]
        L core blocks
      h = skip + unpatch(core)  ("macro block")
      N outer blocks
      RMSNorm -> linear to the output channels (zero-initialised)

Core block: self-attention + cross-attention over [null, condition tokens, time token] + FFN.
Aggregate block: attention on a further 2x2 merged grid with 1.5x heads, FFN at full scale.

``{0, 0, K, L}`` has no outer level: the core patch embedding reads the latent and its un-patch
writes the prediction, which with ``K = 0`` is the isotropic DiT analog the paper compares with.

Sections of this file: blocks, the model, presets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..hub import HubModelMixin
from .attention import (
    AttentionModelMixin,
    GridSelfAttention,
    TimeTokenCrossAttention,
    lora_scale,
)
from .embeddings import ConditionEmbedding, reduce_gradient_flow
from .layers import (
    RMS_NORM_EPS,
    FusedRMSNorm,
    ModulatedRMSNorm,
    PatchEmbed,
    Unpatch,
    geglu_feed_forward,
    merge_tokens,
    split_tokens,
)
from .presets import PresetMixin, register_presets
from .validation import (
    check_batch_size,
    check_class_labels,
    check_kernel_size,
    check_positive_ratios,
    check_positive_sizes,
    check_sample,
    expand_timestep,
    null_labels_if_missing,
)

# --------------------------------------------------------------------------------------------
# Blocks. Every block takes (x, G(t), condition tokens, condition mask) so the model can run,
# checkpoint and probe them uniformly; x is a (B, H, W, C) grid.
# --------------------------------------------------------------------------------------------


class OuterBlock(nn.Module):
    """Outer-level MDiT block at full latent resolution (section 3.2).

    Neighborhood self-attention (kernel 7 in the paper, chosen so two outer blocks cost about one
    core block) and a GeGLU feed-forward, each behind a modulated RMSNorm (eq. 6).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        condition_dim: int,
        kernel_size: int,
        ffn_mult: float,
        head_dim: int,
        rope_pairs: int,
        rope_base: float,
    ):
        super().__init__()
        self.norm1 = ModulatedRMSNorm(dim, condition_dim)
        self.attn = GridSelfAttention(dim, num_heads, head_dim, kernel_size, rope_pairs, rope_base)
        self.norm2 = ModulatedRMSNorm(dim, condition_dim)
        self.ff = geglu_feed_forward(dim, ffn_mult)

    def forward(self, x, time_condition, condition=None, condition_mask=None):
        x = x + self.attn(self.norm1(x, time_condition))
        return x + self.ff(self.norm2(x, time_condition))


class CoreBlock(nn.Module):
    """Core MDiT block (section 3.1, G.1-G.2): self-attention, time-token cross-attention, FFN.

    No modulation: time reaches these blocks only as the cross-attention time token. The
    self-attention is global unless ``kernel_size`` is set (neighborhood attention, k=15 in the
    paper's extrapolation and fine-tuning experiments).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        condition_dim: int,
        condition_token_dim: int | None,
        kernel_size: int | None,
        ffn_mult: float,
        head_dim: int,
        rope_pairs: int,
        rope_base: float,
    ):
        super().__init__()
        self.norm1 = FusedRMSNorm(dim, eps=RMS_NORM_EPS)
        self.attn = GridSelfAttention(dim, num_heads, head_dim, kernel_size, rope_pairs, rope_base)
        self.norm2 = FusedRMSNorm(dim, eps=RMS_NORM_EPS)
        self.cross_attn = TimeTokenCrossAttention(
            dim, num_heads, condition_dim, condition_token_dim, head_dim
        )
        self.norm3 = FusedRMSNorm(dim, eps=RMS_NORM_EPS)
        self.ff = geglu_feed_forward(dim, ffn_mult)

    def forward(self, x, time_condition, condition=None, condition_mask=None):
        x = x + self.attn(self.norm1(x))
        tokens = self.norm2(x).flatten(1, 2)
        x = x + self.cross_attn(tokens, time_condition, condition, condition_mask).view_as(x)
        return x + self.ff(self.norm3(x))


class AggregateBlock(nn.Module):
    """Aggregate block (section 3.3, eq. 1, listing 2).

    ``y = x + split(MHSA(merge(Norm(x))))``, ``h = y + FFN(Norm(y))``: the attention runs on a
    2x2-merged grid (4d channels in, 4d out) with 1.5x the core heads, so its Q/K/V/O are
    non-square (4d <-> 1.5d); the feed-forward stays at the core resolution. Both norms are
    modulated.
    """

    merge_factor = 2

    def __init__(
        self,
        dim: int,
        num_heads: int,
        condition_dim: int,
        kernel_size: int | None,
        ffn_mult: float,
        head_dim: int,
        rope_pairs: int,
        rope_base: float,
    ):
        super().__init__()
        merged = dim * self.merge_factor**2
        self.norm1 = ModulatedRMSNorm(dim, condition_dim)
        self.attn = GridSelfAttention(
            merged, num_heads, head_dim, kernel_size, rope_pairs, rope_base
        )
        self.norm2 = ModulatedRMSNorm(dim, condition_dim)
        self.ff = geglu_feed_forward(dim, ffn_mult)

    def forward(self, x, time_condition, condition=None, condition_mask=None):
        merged = merge_tokens(self.norm1(x, time_condition), self.merge_factor)
        x = x + split_tokens(self.attn(merged), self.merge_factor)
        return x + self.ff(self.norm2(x, time_condition))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class MDiTTransformer2DModel(
    HubModelMixin, AttentionModelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, PresetMixin
):
    r"""Multi-scale diffusion transformer (MDiT).

    Numbers from the paper: the ``{M, N, K, L}`` layouts and widths of MDiT-B and MDiT-L, head
    dim 64, 1.5x aggregate heads, outer kernel 7, core kernel 15, 2x2 core patch, RoPE on 16 of
    32 complex pairs with base 16, 384 + 256 + 256 condition features. Ours (the paper does not
    give them): GeGLU hidden width ``8/3 d`` rounded up to a multiple of 64 (it reproduces the
    paper's MDiT-L per-block FLOPs, 3.78 G aggregate vs 3.92 G core), the global-condition
    width (``core_dim``), the scale-feature minimum frequency, and everything about MDiT-XL
    except its layout.

    The model is agnostic to the prediction target: ``out_channels = in_channels`` for x0,
    epsilon or velocity (rectified flow) prediction, ``2 * in_channels`` for epsilon with a
    learned variance (DiT).

    Not a diffusers ``CacheMixin``: its hooks (FirstBlockCache, FasterCache, ...) assume one
    stack of identical blocks whose first block's residual predicts the rest; MDiT's blocks run
    at two resolutions with a skip around the core and alternating core / aggregate blocks, so
    neither the first-block proxy nor a per-block cache keyed on one list applies.

    Parameters:
        sample_size (`int`, defaults to 32): Training latent size (a default for pipelines; any
            size divisible by the patching works).
        in_channels (`int`, defaults to 4): Latent (or pixel) channels.
        out_channels (`int`, *optional*): Output channels; defaults to ``in_channels``.
        num_outer_in_blocks (`int`, defaults to 2): ``M``, outer blocks before the core.
        num_outer_out_blocks (`int`, defaults to 4): ``N``, outer blocks after the core.
        num_alternating_blocks (`int`, defaults to 4): ``K`` (even), core blocks alternating
            core MDiT block / aggregate block, so ``K/2`` aggregate blocks.
        num_core_blocks (`int`, defaults to 5): ``L``, core MDiT blocks after the alternation.
        outer_dim (`int`, defaults to 384): Outer width ``d`` (ignored when ``M = N = 0``).
        core_dim (`int`, defaults to 768): Core width (``2d`` in the paper's presets).
        attention_head_dim (`int`, defaults to 64): Channels per head, everywhere.
        num_aggregate_heads (`int`, *optional*): Aggregate attention heads; defaults to 1.5x the
            core heads.
        ffn_mult (`float`, defaults to 8/3): GeGLU hidden width over block width.
        outer_kernel_size (`int`, defaults to 7): Neighborhood size of the outer blocks.
        core_attention_type (`str`, defaults to `"global"`): ``"global"`` or
            ``"neighborhood"`` self-attention in the core and aggregate blocks; switch at run
            time with :meth:`set_core_attention`.
        core_kernel_size (`int`, defaults to 15): Neighborhood size used by the core when
            ``core_attention_type="neighborhood"``.
        core_kernel_sizes (`list`, *optional*): Per-block core self-attention, overriding the
            two settings above block by block: one entry per block of :meth:`core_sequence`
            (``K + L`` entries; ``L = num_core_blocks`` for the DiT analog ``{0, 0, 0, L}``),
            each an odd kernel size (neighborhood attention in that block) or ``None``/``0``
            (global attention). Local windows in chosen layers, e.g. ``[3, 3, None, ...]``
            (An et al. 2024, "On Inductive Biases That Enable Generalization of Diffusion
            Transformers"); switch at run time with :meth:`set_core_kernel_sizes`.
        core_patch_size (`int`, defaults to 2): Patch factor between outer level and core.
        rope_position_pairs (`int`, *optional*): Complex pairs per head carrying position
            (``r_dim``); defaults to ``attention_head_dim // 4``.
        rope_base (`float`, defaults to 16.0): RoPE base frequency.
        num_classes (`int`, defaults to 0): Number of classes, 0 for no class conditioning.
            Label ``num_classes`` is the null (dropped) label used for classifier-free guidance.
        cross_attention_dim (`int`, *optional*): Width of text-encoder states
            (``encoder_hidden_states``), e.g. 1024 for FLAN-T5-L; ``None`` for no text.
        timestep_embedding_dim (`int`, defaults to 384): Sinusoidal timestep features.
        use_aux_conditions (`bool`, defaults to False): Image-scale and aspect-ratio conditions
            (G.4, used for ImageNet in the paper).
        aux_embedding_dim (`int`, defaults to 256): Features per auxiliary condition.
        condition_dim (`int`, *optional*): Width of the global condition from the mapping
            network; defaults to ``core_dim``.
        gradient_flow_scale (`float`, defaults to 1.0): Gradient scale on the mapping network
            output and class embeddings (G.4's gradient-flow reduction; 1.0 = off).
        class_conditioning (`str`, defaults to `"cross_attention"`): How the class reaches the
            blocks. ``"cross_attention"`` (the paper): the class embedding is a condition token
            that the core's cross-attention attends to, beside the time token.
            ``"modulation"`` (DiT-style, for ablations): the class embedding is added to the
            global condition before its activation, ``G(t + y)``, so it reaches every block
            through the outer blocks' modulation and the core's time token; there are then
            no class tokens and no condition-token projections.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["OuterBlock", "CoreBlock", "AggregateBlock"]
    _repeated_blocks = ["OuterBlock", "CoreBlock", "AggregateBlock"]
    _skip_layerwise_casting_patterns = ["condition_embedding", "class_embedding", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_outer_in_blocks: int = 2,
        num_outer_out_blocks: int = 4,
        num_alternating_blocks: int = 4,
        num_core_blocks: int = 5,
        outer_dim: int = 384,
        core_dim: int = 768,
        attention_head_dim: int = 64,
        num_aggregate_heads: int | None = None,
        ffn_mult: float = 8 / 3,
        outer_kernel_size: int = 7,
        core_attention_type: str = "global",
        core_kernel_size: int = 15,
        core_kernel_sizes: list[int | None] | None = None,
        core_patch_size: int = 2,
        rope_position_pairs: int | None = None,
        rope_base: float = 16.0,
        num_classes: int = 0,
        cross_attention_dim: int | None = None,
        timestep_embedding_dim: int = 384,
        use_aux_conditions: bool = False,
        aux_embedding_dim: int = 256,
        condition_dim: int | None = None,
        gradient_flow_scale: float = 1.0,
        class_conditioning: str = "cross_attention",
    ):
        super().__init__()
        if class_conditioning not in ("cross_attention", "modulation"):
            raise ValueError(
                f"class_conditioning must be 'cross_attention' or 'modulation', got "
                f"{class_conditioning!r}."
            )
        check_positive_sizes(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            outer_dim=outer_dim,
            core_dim=core_dim,
            attention_head_dim=attention_head_dim,
            num_aggregate_heads=num_aggregate_heads,
            core_patch_size=core_patch_size,
            cross_attention_dim=cross_attention_dim,
            timestep_embedding_dim=timestep_embedding_dim,
            aux_embedding_dim=aux_embedding_dim,
            condition_dim=condition_dim,
        )
        check_positive_ratios(ffn_mult=ffn_mult, rope_base=rope_base)
        check_kernel_size("outer_kernel_size", outer_kernel_size)
        check_kernel_size("core_kernel_size", core_kernel_size)
        _validate_config(
            num_alternating_blocks=num_alternating_blocks,
            outer_dim=outer_dim,
            core_dim=core_dim,
            attention_head_dim=attention_head_dim,
            core_attention_type=core_attention_type,
            num_classes=num_classes,
            blocks=(num_outer_in_blocks, num_outer_out_blocks, num_core_blocks),
        )
        per_block_kernels = _per_block_kernels(
            core_kernel_sizes, num_alternating_blocks + num_core_blocks
        )
        out_channels = out_channels or in_channels
        head_dim = attention_head_dim
        rope_pairs = head_dim // 4 if rope_position_pairs is None else rope_position_pairs
        condition_dim = condition_dim or core_dim
        core_heads = core_dim // head_dim
        aggregate_heads = num_aggregate_heads or round(1.5 * core_heads)
        core_kernel = core_kernel_size if core_attention_type == "neighborhood" else None
        self.class_tokens = num_classes > 0 and class_conditioning == "cross_attention"
        has_condition_tokens = self.class_tokens or cross_attention_dim is not None
        condition_token_dim = (cross_attention_dim or core_dim) if has_condition_tokens else None
        self.has_outer_level = num_outer_in_blocks + num_outer_out_blocks > 0
        self.gradient_checkpointing = False

        self.condition_embedding = ConditionEmbedding(
            condition_dim, timestep_embedding_dim, use_aux_conditions, aux_embedding_dim
        )
        if num_classes > 0:
            width = condition_token_dim if self.class_tokens else condition_dim
            self.class_embedding = nn.Embedding(num_classes + 1, width)

        shared = dict(
            ffn_mult=ffn_mult, head_dim=head_dim, rope_pairs=rope_pairs, rope_base=rope_base
        )
        if self.has_outer_level:
            outer = dict(
                dim=outer_dim,
                num_heads=outer_dim // head_dim,
                condition_dim=condition_dim,
                kernel_size=outer_kernel_size,
                **shared,
            )
            self.proj_in = nn.Linear(in_channels, outer_dim, bias=False)
            self.outer_in_blocks = nn.ModuleList(
                OuterBlock(**outer) for _ in range(num_outer_in_blocks)
            )
            self.outer_out_blocks = nn.ModuleList(
                OuterBlock(**outer) for _ in range(num_outer_out_blocks)
            )
            self.norm_out = FusedRMSNorm(outer_dim, eps=RMS_NORM_EPS)
            self.proj_out = nn.Linear(outer_dim, out_channels, bias=False)
            patch_in, patch_out = outer_dim, outer_dim
        else:
            patch_in, patch_out = in_channels, out_channels

        self.core_patch_embed = PatchEmbed(patch_in, core_dim, core_patch_size)
        self.core_blocks = nn.ModuleList(
            CoreBlock(
                core_dim, core_heads, condition_dim, condition_token_dim, core_kernel, **shared
            )
            for _ in range(num_alternating_blocks // 2 + num_core_blocks)
        )
        self.aggregate_blocks = nn.ModuleList(
            AggregateBlock(core_dim, aggregate_heads, condition_dim, core_kernel, **shared)
            for _ in range(num_alternating_blocks // 2)
        )
        self.core_unpatch = Unpatch(core_dim, patch_out, core_patch_size)
        if per_block_kernels is not None:
            self._apply_core_kernels(per_block_kernels)
        self.initialize_weights()

    # -- structure -----------------------------------------------------------------------------

    def core_sequence(self) -> list[nn.Module]:
        """Core blocks in execution order: K/2 x (core, aggregate), then L core blocks."""
        sequence = []
        for index, block in enumerate(self.core_blocks):
            sequence.append(block)
            if index < len(self.aggregate_blocks):
                sequence.append(self.aggregate_blocks[index])
        return sequence

    def blocks_in_order(self) -> list[tuple[str, nn.Module]]:
        """Every block with its level (``"outer_in"``, ``"core"``, ``"aggregate"``,
        ``"outer_out"``) in execution order; the block IDs of the paper's figures."""
        outer_in = getattr(self, "outer_in_blocks", [])
        outer_out = getattr(self, "outer_out_blocks", [])
        core = [
            ("aggregate" if isinstance(b, AggregateBlock) else "core", b)
            for b in self.core_sequence()
        ]
        return [("outer_in", b) for b in outer_in] + core + [("outer_out", b) for b in outer_out]

    def set_core_attention(self, attention_type: str, kernel_size: int | None = None) -> None:
        """Switch the core and aggregate self-attention between ``"global"`` and
        ``"neighborhood"`` (kernel ``kernel_size``, default ``config.core_kernel_size``).

        The choice is written to the config, so a model saved afterwards loads the same way.
        It applies to every block, so it clears per-block ``core_kernel_sizes``.
        """
        if attention_type not in ("global", "neighborhood"):
            raise ValueError(
                f"Unknown core attention type {attention_type!r}; use 'global' or 'neighborhood'."
            )
        kernel_size = kernel_size or self.config.core_kernel_size
        check_kernel_size("kernel_size", kernel_size)
        kernel = kernel_size if attention_type == "neighborhood" else None
        self._apply_core_kernels([kernel] * len(self.core_sequence()))
        self.register_to_config(
            core_attention_type=attention_type, core_kernel_size=kernel_size, core_kernel_sizes=None
        )

    def set_core_kernel_sizes(self, kernel_sizes: list[int | None] | None) -> None:
        """Per-block core self-attention (see ``core_kernel_sizes`` in the class docstring):
        one odd kernel size, or ``None``/``0`` for global attention, per block of
        :meth:`core_sequence`. ``None`` returns every block to the uniform
        ``core_attention_type`` / ``core_kernel_size``. Written to the config like
        :meth:`set_core_attention`."""
        kernels = _per_block_kernels(kernel_sizes, len(self.core_sequence()))
        if kernels is None:
            neighborhood = self.config.core_attention_type == "neighborhood"
            uniform = self.config.core_kernel_size if neighborhood else None
            kernels = [uniform] * len(self.core_sequence())
        self._apply_core_kernels(kernels)
        self.register_to_config(
            core_kernel_sizes=None if kernel_sizes is None else list(kernel_sizes)
        )

    def _apply_core_kernels(self, kernels: list[int | None]) -> None:
        for block, kernel in zip(self.core_sequence(), kernels, strict=True):
            block.attn.kernel_size = kernel

    def initialize_weights(self) -> None:
        """Appendix G.3: every matrix, input embeddings included, from a truncated normal with
        std 0.02; every layer's output projection, the modulation projections ``W_t`` and the
        final projection zero-initialised, so a fresh model predicts exactly zero."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            elif isinstance(module, TimeTokenCrossAttention):
                nn.init.trunc_normal_(module.null_key, std=0.02, a=-0.04, b=0.04)
                nn.init.trunc_normal_(module.null_value, std=0.02, a=-0.04, b=0.04)
        for module in self.modules():
            if isinstance(module, (GridSelfAttention, TimeTokenCrossAttention)):
                nn.init.zeros_(module.to_out[0].weight)
            elif isinstance(module, ModulatedRMSNorm):
                nn.init.zeros_(module.linear.weight)
            elif isinstance(module, (OuterBlock, CoreBlock, AggregateBlock)):
                nn.init.zeros_(module.ff.net[-1].weight)
        nn.init.zeros_(self.core_unpatch.proj.weight)
        if self.has_outer_level:
            nn.init.zeros_(self.proj_out.weight)

    # -- inputs --------------------------------------------------------------------------------

    def _check_inputs(
        self,
        hidden_states,
        class_labels,
        encoder_hidden_states,
        encoder_attention_mask,
        image_scale,
        aspect_ratio,
    ):
        config = self.config
        why = f"core patch {config.core_patch_size}" + (
            " x aggregate merge 2" if self.aggregate_blocks else ""
        )
        check_sample(hidden_states, config.in_channels, self.size_multiple, why)
        batch = hidden_states.shape[0]
        check_class_labels(class_labels, config.num_classes, batch)
        if encoder_attention_mask is not None and encoder_hidden_states is None:
            raise ValueError(
                "encoder_attention_mask was given without encoder_hidden_states; pass the text "
                "states it masks, or drop it."
            )
        if encoder_hidden_states is not None:
            if config.cross_attention_dim is None:
                raise ValueError(
                    "encoder_hidden_states were given but the model has no text conditioning. "
                    "Build it with cross_attention_dim set to the text encoder width "
                    "(e.g. cross_attention_dim=1024 for FLAN-T5-L)."
                )
            if (
                encoder_hidden_states.ndim != 3
                or encoder_hidden_states.shape[-1] != config.cross_attention_dim
            ):
                raise ValueError(
                    f"encoder_hidden_states must be (batch, tokens, {config.cross_attention_dim}), "
                    f"got {tuple(encoder_hidden_states.shape)}."
                )
            check_batch_size("encoder_hidden_states", encoder_hidden_states, batch)
            tokens = tuple(encoder_hidden_states.shape[:2])
            if encoder_attention_mask is not None and encoder_attention_mask.shape != tokens:
                raise ValueError(
                    f"encoder_attention_mask must be (batch, tokens) = {tokens} like "
                    f"encoder_hidden_states, got {tuple(encoder_attention_mask.shape)}; give one "
                    "mask entry per text token."
                )
        if (image_scale is not None or aspect_ratio is not None) and not config.use_aux_conditions:
            raise ValueError(
                "image_scale / aspect_ratio were given but the model has no auxiliary "
                "conditions. Build it with use_aux_conditions=True or drop them."
            )
        for name, value in (("image_scale", image_scale), ("aspect_ratio", aspect_ratio)):
            if value is not None and value.shape != (batch,):
                raise ValueError(
                    f"{name} must have shape ({batch},), one value per sample, got "
                    f"{tuple(value.shape)}."
                )

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        aggregate = 2 if len(self.aggregate_blocks) else 1
        return self.config.core_patch_size * aggregate

    def _class_embedding(self, batch, class_labels):
        """``(B, width)`` class embeddings, the null label where ``class_labels`` is None."""
        labels = null_labels_if_missing(class_labels, self.config.num_classes, batch, self.device)
        embedding = self.class_embedding(labels)
        return reduce_gradient_flow(embedding, self.config.gradient_flow_scale)

    def _condition_tokens(self, batch, class_labels, encoder_hidden_states, encoder_attention_mask):
        tokens, masks = [], []
        if self.class_tokens:
            embedding = self._class_embedding(batch, class_labels)[:, None]
            tokens.append(embedding)
            masks.append(torch.ones(batch, 1, device=embedding.device, dtype=torch.bool))
        if encoder_hidden_states is not None:
            tokens.append(encoder_hidden_states)
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(
                    encoder_hidden_states.shape[:2], device=encoder_hidden_states.device
                )
            masks.append(encoder_attention_mask.bool())
        if not tokens:
            return None, None
        dtype = tokens[0].dtype
        return torch.cat([t.to(dtype) for t in tokens], 1), torch.cat(masks, 1)

    # -- forward -------------------------------------------------------------------------------

    def _run_block(self, block, h, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, h, *args)
        return block(h, *args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        image_scale: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states: Noisy latents ``(B, in_channels, H, W)``; ``H`` and ``W`` multiples
                of :attr:`size_multiple`, any aspect ratio. Floating point inputs are cast to
                the model's dtype (e.g. float16 latents into a float32 model); integer ones are
                refused.
            timestep: Diffusion timestep(s), scalar or ``(B,)``, in the scheduler's units
                (0..999 for DDPM/DDIM; flow-matching sigmas times 1000).
            class_labels: ``(B,)`` labels in ``[0, num_classes]``; ``num_classes`` (or ``None``)
                is the null label.
            encoder_hidden_states: Text encoder states ``(B, S, cross_attention_dim)``.
            encoder_attention_mask: ``(B, S)``, 1 for real tokens, 0 for padding.
            image_scale: ``(B,)`` image-scale condition in (0, 1]; 0 means dropped.
            aspect_ratio: ``(B,)`` aspect-ratio condition (width / height); 0 means dropped.
            attention_kwargs: ``{"scale": s}`` scales the LoRA layers for this call (diffusers'
                convention).
            return_dict: Return a ``Transformer2DModelOutput`` instead of a tuple.

        Returns:
            The prediction ``(B, out_channels, H, W)``.
        """
        # 1. Check inputs; floating ones are cast to the model's dtype.
        self._check_inputs(
            hidden_states,
            class_labels,
            encoder_hidden_states,
            encoder_attention_mask,
            image_scale,
            aspect_ratio,
        )
        hidden_states = hidden_states.to(self.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(self.dtype)
        batch = hidden_states.shape[0]
        timestep = expand_timestep(timestep, batch, hidden_states.device)
        condition = self.condition_embedding(timestep, image_scale, aspect_ratio)
        condition = reduce_gradient_flow(condition, self.config.gradient_flow_scale)
        if self.config.num_classes > 0 and not self.class_tokens:
            condition = condition + self._class_embedding(batch, class_labels).to(condition.dtype)
        time_condition = F.gelu(condition)
        tokens, mask = self._condition_tokens(
            batch, class_labels, encoder_hidden_states, encoder_attention_mask
        )
        args = (time_condition, tokens, mask)

        # 2. Blocks, with the call-time LoRA scale. The only layout conversion: (B, C, H, W) at
        # the diffusers boundary, channels-last inside.
        with lora_scale(self, attention_kwargs):
            out = self._blocks(hidden_states.permute(0, 2, 3, 1), args)
        out = out.permute(0, 3, 1, 2)

        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def _blocks(self, h: torch.Tensor, args: tuple) -> torch.Tensor:
        """The block stack on a ``(B, H, W, C)`` grid; ``args`` = (G(t), tokens, mask)."""
        if self.has_outer_level:
            h = self.proj_in(h)
            for block in self.outer_in_blocks:
                h = self._run_block(block, h, *args)
        core = self.core_patch_embed(h)
        for block in self.core_sequence():
            core = self._run_block(block, core, *args)
        core = self.core_unpatch(core)
        if self.has_outer_level:
            h = h + core
            for block in self.outer_out_blocks:
                h = self._run_block(block, h, *args)
            return self.proj_out(self.norm_out(h))
        return core


def _per_block_kernels(kernel_sizes, num_blocks: int) -> list[int | None] | None:
    """``core_kernel_sizes`` checked, with ``0`` read as ``None`` (global attention)."""
    if kernel_sizes is None:
        return None
    kernel_sizes = list(kernel_sizes)
    if len(kernel_sizes) != num_blocks:
        raise ValueError(
            f"core_kernel_sizes needs one entry per core block in execution order "
            f"({num_blocks} = num_alternating_blocks + num_core_blocks), got {len(kernel_sizes)}: "
            f"{kernel_sizes}. Give {num_blocks} entries (None for a global block)."
        )
    kernels = []
    for kernel in kernel_sizes:
        if kernel is None or kernel == 0:
            kernels.append(None)
        elif isinstance(kernel, int) and not isinstance(kernel, bool) and kernel > 0 and kernel % 2:
            kernels.append(kernel)
        else:
            raise ValueError(
                f"core_kernel_sizes entries must be odd positive kernel sizes or None/0 (global), "
                f"got {kernel!r} in {kernel_sizes}."
            )
    return kernels


def _validate_config(
    num_alternating_blocks,
    outer_dim,
    core_dim,
    attention_head_dim,
    core_attention_type,
    num_classes,
    blocks,
):
    if num_alternating_blocks % 2 or num_alternating_blocks < 0:
        raise ValueError(
            f"num_alternating_blocks (K) must be even and >= 0 (K/2 aggregate blocks alternate "
            f"with K/2 core blocks), got {num_alternating_blocks}. "
            f"Use K={max(num_alternating_blocks + 1, 0)}."
        )
    if min(blocks) < 0:
        raise ValueError(f"Block counts must be >= 0, got M, N, L = {blocks}.")
    for name, dim in (("outer_dim", outer_dim), ("core_dim", core_dim)):
        if dim % attention_head_dim:
            raise ValueError(
                f"{name}={dim} must be a multiple of attention_head_dim={attention_head_dim}."
            )
    if core_attention_type not in ("global", "neighborhood"):
        raise ValueError(
            f"core_attention_type must be 'global' or 'neighborhood', got {core_attention_type!r}."
        )
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}.")


# --------------------------------------------------------------------------------------------
# Presets. All default to the paper's ImageNet latent setting (4 channels, 1000 classes,
# 32x32 latents); override any config field, e.g. num_classes=0 for unconditional models.
# --------------------------------------------------------------------------------------------


def _mdit(m, n, k, l, outer_dim, core_dim, **extra):  # noqa: E741 (the paper's {M, N, K, L})
    return dict(
        num_outer_in_blocks=m,
        num_outer_out_blocks=n,
        num_alternating_blocks=k,
        num_core_blocks=l,
        outer_dim=outer_dim,
        core_dim=core_dim,
        num_classes=1000,
        **extra,
    )


def _dit_analog(depth, core_dim, **extra):
    return _mdit(0, 0, 0, depth, core_dim // 2, core_dim, **extra)


MDIT_PRESETS: dict[str, dict[str, Any]] = {
    # Ours: trains on a laptop CPU in minutes at 16x16.
    "MDiT-S": _mdit(1, 2, 2, 2, 128, 256, sample_size=16),
    # Paper, table 1.
    "MDiT-B": _mdit(2, 4, 4, 5, 384, 768),
    "MDiT-L": _mdit(4, 8, 8, 10, 512, 1024),
    # Paper gives only the layout {4, 9, 8, 12}; widths are ours: DiT-XL's 1152 in the core,
    # half of it outside, 1.5 x 18 = 27 aggregate heads.
    "MDiT-XL": _mdit(4, 9, 8, 12, 576, 1152),
    # DiT analogs {0, 0, 0, L}: MDiT's core blocks without the outer level, at the core width;
    # L is the depth whose class-conditional parameter count is closest to the MDiT preset's
    # (tests/models/test_mdit.py checks it). Not the original DiT: that is "DiT-B/2" etc.
    # (models/dit.py).
    "MDiT-analog-S": _dit_analog(6, 256, sample_size=16),
    "MDiT-analog-B": _dit_analog(12, 768),
    "MDiT-analog-L": _dit_analog(24, 1024),
    "MDiT-analog-XL": _dit_analog(27, 1152),
}

# The analogs' former names, which read as the original DiT.
MDIT_PRESET_ALIASES = {f"DiT-{size}": f"MDiT-analog-{size}" for size in ("S", "B", "L", "XL")}

register_presets(MDiTTransformer2DModel, MDIT_PRESETS, MDIT_PRESET_ALIASES)

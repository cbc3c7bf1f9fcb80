"""The original DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), the
baseline the MDiT paper measures its convergence against (section 5.1, figure 6).

The architecture is diffusers' :class:`~diffusers.DiTTransformer2DModel`, reused as it is (its
``PatchEmbed``, ``BasicTransformerBlock`` with ``AdaLayerNormZero`` and its ``forward``):
patchify with fixed 2D sin-cos positions (section 3.1), N adaLN-Zero blocks (self-attention
and a tanh-GELU MLP of ratio 4, each gated, figure 3), and the final adaLN layer with a linear
decoder to ``p x p x out_channels`` per token. :class:`DiTBaselineTransformer2DModel` is a thin
subclass that gives it the conventions of this package; it is a model class rather than only a
pipeline because the trainer, the pipelines, the profiling helpers and the Hub checks all
address a model through them:

- ``num_classes`` (diffusers: ``num_embeds_ada_norm``) with ``num_classes`` the null label, as
  our label dropout writes it; ``num_classes=0`` builds an unconditional model (diffusers' DiT
  always needs labels: there every sample gets the only, null, embedding);
- diffusers' own label dropout (``LabelEmbedding``, 10% whenever the module is in training
  mode, from the global random generator) is switched off: our trainer drops labels itself
  (``--label_dropout``, seeded), and two droppers would drop ~19% and break reproducibility;
- DiT's weight initialisation (``initialize_weights``), which diffusers' class lacks because it
  is meant for converted checkpoints: without it the "Zero" of adaLN-Zero is missing and blocks
  do not start as the identity;
- ``size_multiple``, input checks, checked safetensors loading and saving (``HubModelMixin``)
  and presets (``from_preset("DiT-B/2")``).

Module names are diffusers', so the transformer of a diffusers DiT checkpoint (e.g.
``facebook/DiT-XL-2-256``) loads with ``num_embeds_ada_norm`` renamed to ``num_classes``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models import DiTTransformer2DModel
from diffusers.models.attention import AttentionMixin, BasicTransformerBlock
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from torch import nn

from ..hub import HubModelMixin
from .presets import PresetMixin, register_presets
from .validation import (
    check_class_labels,
    check_positive_sizes,
    check_sample,
    expand_timestep,
    null_labels_if_missing,
)


class DiTBaselineTransformer2DModel(
    HubModelMixin, DiTTransformer2DModel, AttentionMixin, PeftAdapterMixin, PresetMixin
):
    r"""The original DiT (Peebles & Xie 2023) with this package's conventions (see the module
    docstring for why a subclass of diffusers' ``DiTTransformer2DModel``).

    Paper vs diffusers' model (checked in diffusers 0.42's source):

    - Every block owns its conditioning: ``AdaLayerNormZero`` builds its own
      ``CombinedTimestepLabelEmbeddings`` (a timestep MLP 256 -> d -> d and a label table of
      ``num_classes + 1`` rows), and the final layer reuses block 0's. The paper computes one
      condition ``c = t_emb + y_emb`` shared by all blocks. Each extra copy has
      ``256 d + d^2 + 2 d + (num_classes + 1) d`` parameters, per sample not per token, so it
      costs no measurable compute (0.04% of DiT-B/2's MACs) but adds parameters: measured at
      1000 classes, DiT-S/2 39.8M vs the paper's 32.9M (+21%), DiT-B/2 147.4M vs 130.3M
      (+13%), DiT-L/2 511.6M vs 457.8M (+12%), DiT-XL/2 749.8M vs 674.8M (+11%). It matters
      for comparisons at matched parameters (count as the paper does, without the copies:
      :func:`paper_parameter_count`), not at matched FLOPs. Trained from scratch the copies
      are initialised and updated independently, so they may learn different conditionings
      per block (slightly more capacity than the paper's model, at no compute); converted
      checkpoints carry identical copies and are exactly the paper's model.
    - The timestep features use frequencies ``10000^(-i / 127)`` (``downscale_freq_shift=1``)
      where DiT's code uses ``10000^(-i / 128)``; harmless when trained from scratch.
    - Non-square inputs are not supported (diffusers' unpatchify assumes a square grid).

    Everything else is the paper's: patch embedding with fixed sin-cos positions, adaLN-Zero
    (shift, scale and gate for attention and MLP), tanh-GELU MLP of ratio 4, LayerNorms without
    affine parameters (eps 1e-6), the final adaLN layer, ``out_channels = 2 * in_channels`` for
    a learned variance.

    Parameters:
        sample_size (`int`, defaults to 32): Training latent size (sets the sin-cos grid;
            other sizes recompute it).
        in_channels (`int`, defaults to 4): Input channels.
        out_channels (`int`, *optional*): Output channels; defaults to ``in_channels``
            (``2 * in_channels`` for epsilon with a learned variance).
        patch_size (`int`, defaults to 2): Patch size ``p``.
        num_layers (`int`, defaults to 28): Number of DiT blocks ``N``.
        num_attention_heads (`int`, defaults to 16): Attention heads.
        attention_head_dim (`int`, defaults to 72): Width of one head; the token width is
            ``num_attention_heads * attention_head_dim``.
        num_classes (`int`, defaults to 1000): Number of classes, 0 for an unconditional
            model. Label ``num_classes`` is the null label of classifier-free guidance.
        dropout (`float`, defaults to 0.0): Dropout in the blocks (the paper uses none).
        activation_fn (`str`, defaults to "gelu-approximate"): MLP activation (tanh-GELU).
        attention_bias (`bool`, defaults to True): Bias on the Q/K/V projections.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon (DiT's).
    """

    _skip_layerwise_casting_patterns = ["pos_embed", "norm"]
    _supports_gradient_checkpointing = True
    _supports_group_offloading = False
    _no_split_modules = ["BasicTransformerBlock"]
    _repeated_blocks = ["BasicTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        patch_size: int = 2,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        num_classes: int = 1000,
        dropout: float = 0.0,
        activation_fn: str = "gelu-approximate",
        attention_bias: bool = True,
        norm_eps: float = 1e-6,
    ):
        # diffusers' __init__ reads its own config names (num_embeds_ada_norm); the modules are
        # built here with its building blocks and its attribute names, so that its forward runs.
        ModelMixin.__init__(self)
        check_positive_sizes(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            patch_size=patch_size,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
        )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}.")
        if sample_size % patch_size:
            raise ValueError(
                f"sample_size={sample_size} must be a multiple of patch_size={patch_size}."
            )
        self.inner_dim = num_attention_heads * attention_head_dim
        self.attention_head_dim = attention_head_dim
        self.out_channels = out_channels or in_channels
        self.patch_size = patch_size
        self.height = self.width = sample_size
        self.gradient_checkpointing = False

        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=self.inner_dim,
        )
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                self.inner_dim,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                activation_fn=activation_fn,
                # An unconditional model keeps a table of one row, the null label 0.
                num_embeds_ada_norm=num_classes,
                attention_bias=attention_bias,
                norm_type="ada_norm_zero",
                norm_elementwise_affine=False,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )
        for block in self.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0  # the trainer drops labels
        self.norm_out = nn.LayerNorm(self.inner_dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(self.inner_dim, 2 * self.inner_dim)
        self.proj_out_2 = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's rule (``models.py``, ``initialize_weights``): Xavier-uniform linear layers with
        zero biases (Q/K/V as one fused ``(3d, d)`` matrix, the patch projection as a linear
        layer), N(0, 0.02) label tables and timestep-MLP weights, and zero adaLN modulations
        and output projection, so that every block starts as the identity (adaLN-Zero,
        section 3.2) and a fresh model predicts exactly 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = self.pos_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for block in self.transformer_blocks:
            attention = block.attn1
            fused = torch.cat([attention.to_q.weight, attention.to_k.weight, attention.to_v.weight])
            nn.init.xavier_uniform_(fused)
            for linear, part in zip(
                (attention.to_q, attention.to_k, attention.to_v), fused.chunk(3), strict=True
            ):
                linear.weight.data.copy_(part)
            embedding = block.norm1.emb
            nn.init.normal_(embedding.class_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(embedding.timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedding.timestep_embedder.linear_2.weight, std=0.02)
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for linear in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return self.config.patch_size

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        Args:
            hidden_states: Noisy latents or images ``(B, in_channels, H, H)``, ``H`` a multiple
                of ``patch_size``.
            timestep: Diffusion timestep(s), scalar or ``(B,)``, in the scheduler's units.
            class_labels: ``(B,)`` labels in ``[0, num_classes]``; ``num_classes`` (or
                ``None``) is the null label. Unconditional models take none.
            cross_attention_kwargs: Passed to diffusers' attention processors; ``scale``, the
                LoRA scale at call time (as diffusers' U-Nets take it).
            return_dict: Return a ``Transformer2DModelOutput`` instead of a tuple.

        Returns:
            The prediction ``(B, out_channels, H, H)``.
        """
        config = self.config
        check_sample(hidden_states, config.in_channels, self.size_multiple, "the patch size")
        height, width = hidden_states.shape[-2:]
        if height != width:
            raise ValueError(
                f"DiT samples square inputs only (diffusers' unpatchify), got {height}x{width}."
            )
        batch, device = hidden_states.shape[0], hidden_states.device
        check_class_labels(class_labels, config.num_classes, batch)
        class_labels = null_labels_if_missing(class_labels, config.num_classes, batch, device)
        kwargs = dict(cross_attention_kwargs or {})
        lora_scale = kwargs.pop("scale", 1.0)
        if USE_PEFT_BACKEND:
            scale_lora_layers(self, lora_scale)
        try:
            return super().forward(
                hidden_states.to(self.dtype),
                timestep=expand_timestep(timestep, batch, device),
                class_labels=class_labels,
                cross_attention_kwargs=kwargs or None,
                return_dict=return_dict,
            )
        finally:
            if USE_PEFT_BACKEND:
                unscale_lora_layers(self, lora_scale)

    def fuse_qkv_projections(self) -> None:
        """Fuse each attention's q, k, v projections into one matmul (diffusers' legacy
        ``Attention.fuse_projections`` with ``FusedAttnProcessor2_0``, as its U-Nets do:
        ``AttentionMixin``'s version only fuses the newer attention modules)."""
        from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

        self.original_attn_processors = self.attn_processors
        for module in self.modules():
            if isinstance(module, Attention):
                module.fuse_projections(fuse=True)
        self.set_attn_processor(FusedAttnProcessor2_0())

    def unfuse_qkv_projections(self) -> None:
        """Back to the separate projections (and the processors before fusing)."""
        if getattr(self, "original_attn_processors", None) is not None:
            self.set_attn_processor(self.original_attn_processors)
            self.original_attn_processors = None


def paper_parameter_count(model: DiTBaselineTransformer2DModel) -> int:
    """Parameters as the DiT paper counts them: one timestep and label embedding shared by
    every block, instead of diffusers' copy per block."""
    total = sum(p.numel() for p in model.parameters())
    copies = model.transformer_blocks[1:]
    return total - sum(p.numel() for block in copies for p in block.norm1.emb.parameters())


# --------------------------------------------------------------------------------------------
# Presets: the DiT paper's table 1 (width, depth, heads), patch 2, 1000 classes, 32x32 latents
# (256px ImageNet). Override any config field, e.g. num_classes=0 for unconditional models.
# --------------------------------------------------------------------------------------------


def _dit(depth: int, width: int, heads: int) -> dict[str, Any]:
    return dict(
        num_layers=depth,
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        patch_size=2,
        num_classes=1000,
    )


DIT_PRESETS: dict[str, dict[str, Any]] = {
    "DiT-S/2": _dit(12, 384, 6),
    "DiT-B/2": _dit(12, 768, 12),
    "DiT-L/2": _dit(24, 1024, 16),
    "DiT-XL/2": _dit(28, 1152, 16),
}

register_presets(DiTBaselineTransformer2DModel, DIT_PRESETS)

"""The model families of the package, in one place: each family's model class, the pipeline that
samples it, its model-card text and config summary, and one :func:`load_model` that every entry
point uses (training from a pre-trained folder, fine-tuning, explain, evaluation, the CLIs).
Adding a family means adding one :class:`ModelFamily` here (and its presets in
``models/presets.py``).

Families name their classes instead of importing them, so that any module (``hub.py``, which
the models import) can read the registry without an import cycle; the classes are resolved
on first use.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass

MDIT_CITATION = """@misc{mdit,
  title        = {Multi-Scale Image Diffusion Transformers: Explainability Leads to Faster
                  Training},
  howpublished = {OpenReview, ICLR 2025 submission},
  url          = {https://openreview.net/forum?id=leBbjaUxut}
}"""

DIT_CITATION = """@inproceedings{peebles2023dit,
  title     = {Scalable Diffusion Models with Transformers},
  author    = {Peebles, William and Xie, Saining},
  booktitle = {ICCV},
  year      = {2023}
}"""

DIFFIT_CITATION = """@article{hatamizadeh2023diffit,
  title   = {DiffiT: Diffusion Vision Transformers for Image Generation},
  author  = {Hatamizadeh, Ali and Song, Jiaming and Liu, Guilin and Kautz, Jan and
             Vahdat, Arash},
  journal = {arXiv preprint arXiv:2312.02139},
  year    = {2023}
}"""


@dataclass(frozen=True)
class ModelFamily:
    """One model family.

    Args:
        model_class_name: The ``ModelMixin`` class in ``diffusers_mdit.models``.
        pipeline_class_name: The pipeline in ``diffusers_mdit.pipelines`` that samples it (and
            that training saves).
        tag: The model-card tag (``mdit`` / ``diffit`` / ``dit``).
        architecture: The model card's description of the architecture.
        citation: BibTeX of the paper.
        config_summary: The config fields the model card lists.
        block_levels: The model lists its blocks by level (``blocks_in_order()``: outer_in,
            core, aggregate, outer_out), which the explain toolkit's per-block analyses read.
    """

    model_class_name: str
    pipeline_class_name: str
    tag: str
    architecture: str
    citation: str
    config_summary: tuple[str, ...]
    block_levels: bool = False

    @property
    def model_class(self) -> type:
        return getattr(importlib.import_module("diffusers_mdit.models"), self.model_class_name)

    @property
    def pipeline_class(self) -> type:
        module = importlib.import_module("diffusers_mdit.pipelines")
        return getattr(module, self.pipeline_class_name)


FAMILIES: dict[str, ModelFamily] = {
    family.model_class_name: family
    for family in (
        ModelFamily(
            "MDiTTransformer2DModel",
            "MDiTPipeline",
            "mdit",
            'MDiT, the multi-scale diffusion transformer of "Multi-Scale Image Diffusion '
            'Transformers: Explainability Leads to Faster Training": M outer blocks with '
            "neighborhood attention at full latent resolution, a 2x2-patched core of K blocks "
            "alternating core and aggregate blocks followed by L core blocks, then N outer "
            "blocks.",
            MDIT_CITATION,
            tuple(
                "sample_size in_channels out_channels outer_dim core_dim attention_head_dim "
                "outer_kernel_size core_attention_type core_kernel_sizes num_classes "
                "class_conditioning cross_attention_dim use_aux_conditions".split()
            ),
            block_levels=True,
        ),
        ModelFamily(
            "DiffiTTransformer2DModel",
            "DiffiTPipeline",
            "diffit",
            'Latent DiffiT (Hatamizadeh et al. 2023, "DiffiT: Diffusion Vision Transformers for '
            'Image Generation"): an isotropic ViT of DiffiT blocks with time-dependent '
            "multi-head self-attention (TMSA) on VAE latents.",
            DIFFIT_CITATION,
            tuple(
                "sample_size in_channels out_channels patch_size hidden_size num_layers "
                "num_attention_heads window_size num_classes".split()
            ),
        ),
        ModelFamily(
            "DiTBaselineTransformer2DModel",
            "DiTBaselinePipeline",
            "dit",
            'The original DiT (Peebles & Xie 2023, "Scalable Diffusion Models with '
            'Transformers"): a ViT of adaLN-Zero blocks (gated self-attention and GELU MLP) on '
            "patches with fixed sin-cos positions, built with diffusers' DiTTransformer2DModel.",
            DIT_CITATION,
            tuple(
                "sample_size in_channels out_channels patch_size num_layers "
                "num_attention_heads attention_head_dim num_classes".split()
            ),
        ),
        ModelFamily(
            "DiffiTUNet2DModel",
            "DiffiTPipeline",
            "diffit",
            'Image-space DiffiT (Hatamizadeh et al. 2023, "DiffiT: Diffusion Vision Transformers '
            'for Image Generation"): a U-shaped encoder/decoder of DiffiT ResBlocks with '
            "windowed time-dependent self-attention (TMSA).",
            DIFFIT_CITATION,
            tuple(
                "sample_size in_channels out_channels block_out_channels layers_per_level "
                "window_size attention_head_dim num_classes".split()
            ),
        ),
    )
}


def family_of(model_or_class) -> ModelFamily:
    """The family of a model instance, a model class or a class name."""
    if isinstance(model_or_class, str):
        name = model_or_class
    else:
        cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
        name = cls.__name__
    if name not in FAMILIES:
        raise ValueError(f"{name!r} is not a model of diffusers-mdit; known: {sorted(FAMILIES)}.")
    return FAMILIES[name]


def load_model(path: str):
    """The model of a saved pipeline folder (its ``transformer/``) or of a model folder, as
    the class its ``config.json`` names (``_class_name``)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        path = os.path.join(path, "transformer")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{path!r} has no config.json: point at a pipeline folder saved by train_mdit.py "
            "or save_pretrained (with model_index.json), or at its transformer/ folder."
        )
    with open(config_path) as f:
        name = json.load(f).get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"{config_path} configures {name!r}; known models: {sorted(FAMILIES)}.")
    return FAMILIES[name].model_class.from_pretrained(path)

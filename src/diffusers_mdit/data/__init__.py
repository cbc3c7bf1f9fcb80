"""Training data: the built-in digits and font glyphs, image folders and ``datasets`` names,
latent shards, the one resize / crop and the one stratified split of the package."""

from .digits import DIGITS_CLASSES, DIGITS_IMAGES, DigitsDataset, digits_split
from .glyphs import GlyphDataset, render_glyphs
from .images import ImageDataset, as_8bit_scale, resize_center_crop
from .shards import LatentShardDataset, LatentShardWriter, write_latent_shards
from .splits import stratified_split, subset_indices

__all__ = [
    "DIGITS_CLASSES",
    "DIGITS_IMAGES",
    "DigitsDataset",
    "GlyphDataset",
    "ImageDataset",
    "LatentShardDataset",
    "LatentShardWriter",
    "as_8bit_scale",
    "digits_split",
    "render_glyphs",
    "resize_center_crop",
    "stratified_split",
    "subset_indices",
    "write_latent_shards",
]

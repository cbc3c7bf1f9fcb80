"""diffusers_mdit.data.glyphs: deterministic, disjoint splits, and detail at full resolution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_mdit.data import DigitsDataset
from diffusers_mdit.data.glyphs import (
    GLYPH_CHARACTERS,
    GLYPH_FONTS,
    GlyphDataset,
    font_path,
    render_glyphs,
)


def test_every_font_ships_with_matplotlib():
    for face in GLYPH_FONTS:
        assert font_path(face).endswith(f"{face}.ttf")
    with pytest.raises(FileNotFoundError, match="ships no font"):
        font_path("NoSuchFont")


def test_renderings_are_deterministic_labelled_and_the_splits_share_no_image():
    images, labels = render_glyphs("train", per_font=2, resolution=16)
    n = len(GLYPH_FONTS) * len(GLYPH_CHARACTERS) * 2
    assert images.shape == (n, 1, 16, 16) and labels.shape == (n,)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.bincount(labels).tolist() == [len(GLYPH_FONTS) * 2] * len(GLYPH_CHARACTERS)
    render_glyphs.cache_clear()  # rendered again, not read from the cache
    again, _ = render_glyphs("train", per_font=2, resolution=16)
    assert torch.equal(images, again)
    held, held_labels = render_glyphs("held_out", per_font=2, resolution=16)
    assert torch.equal(labels, held_labels)
    # No held-out image equals any training image (the jitter draws differ).
    distances = torch.cdist(held.flatten(1), images.flatten(1))
    assert distances.min() > 0.5
    # Two renderings of one glyph in one font differ: the jitter moves them.
    assert (images[0] - images[1]).abs().mean() > 0.01


def test_glyphs_have_detail_below_the_core_patch_that_upsampled_digits_lack():
    """The fraction of image energy a 2x2 patch average cannot represent (the residual of
    average-pooling and nearest upsampling): what an MDiT's full-resolution level must model
    beyond its core. The digits at 16x16 are 8x8 originals upsampled, so little is left."""

    def fine_detail(images: torch.Tensor) -> float:
        x = (images + 1) / 2
        coarse = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
        return float((x - coarse).pow(2).sum() / x.pow(2).sum())

    glyphs = fine_detail(render_glyphs("train", per_font=2, resolution=16)[0])
    digits = fine_detail(DigitsDataset(resolution=16, channels=1).images)
    assert glyphs > 5 * digits  # measured: 0.29 vs 0.030


def test_dataset_interface_and_channels():
    data = GlyphDataset("held_out", per_font=1, resolution=16, channels=3)
    item = data[5]
    assert item["pixel_values"].shape == (3, 16, 16)
    assert torch.equal(item["pixel_values"][0], item["pixel_values"][2])
    assert item["class_labels"] == data.label(5) and data.num_classes == len(GLYPH_CHARACTERS)
    with pytest.raises(ValueError, match="split"):
        render_glyphs("test")
    with pytest.raises(ValueError, match="channels"):
        GlyphDataset(channels=2)

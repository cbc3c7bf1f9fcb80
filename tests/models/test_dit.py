"""The original DiT (models/dit.py): the DiT paper's sizes and costs, adaLN-Zero at
initialisation, labels and unconditional models, saving and loading, the analog presets'
names."""

from __future__ import annotations

import pytest
import torch
from diffusers.models import DiTTransformer2DModel

from diffusers_mdit import DiTBaselineTransformer2DModel, MDiTTransformer2DModel, from_preset
from diffusers_mdit.models import list_presets, paper_parameter_count
from diffusers_mdit.profiling import count_parameters, preset_cost
from diffusers_mdit.testing import randomize

TINY = dict(sample_size=8, in_channels=3, num_layers=2, num_attention_heads=2, attention_head_dim=8)

# DiT paper, table 1 / table 4: parameters (M, rounded) and Gflops per 256px forward (fvcore
# counts multiply-adds) on 4x32x32 latents, 1000 classes.
PAPER = {
    "DiT-S/2": (33, 6.06),
    "DiT-B/2": (130, 23.01),
    "DiT-L/2": (458, 80.71),
    "DiT-XL/2": (675, 118.64),
}


@pytest.mark.parametrize("name", list(PAPER))
def test_presets_match_the_dit_papers_parameters_and_macs(name):
    params, gmacs = PAPER[name]
    cost = preset_cost(name)  # on the meta device, as mdit-sizes counts
    assert abs(cost.gmacs / gmacs - 1) < 1e-3
    with torch.device("meta"):
        model = from_preset(name)
    assert type(model) is DiTBaselineTransformer2DModel
    # Counted as the paper does (one shared timestep and label embedding) it is the paper's
    # model, to the rounding of its table.
    assert abs(paper_parameter_count(model) / 1e6 - params) < 0.5
    # diffusers' copy of the embedding in every other block: 256 d + d^2 + 2 d + 1001 d each.
    d, depth = model.inner_dim, model.config.num_layers
    copies = (depth - 1) * (256 * d + d * d + 2 * d + 1001 * d)
    assert cost.parameters == count_parameters(model) == paper_parameter_count(model) + copies


def test_dit_b2_is_diffusers_dit_with_our_config_names():
    with torch.device("meta"):
        ours = from_preset("DiT-B/2")
        theirs = DiTTransformer2DModel(
            num_attention_heads=12, attention_head_dim=64, num_layers=12, norm_eps=1e-6
        )
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}


def test_a_fresh_model_predicts_zero_and_its_blocks_start_as_the_identity():
    model = DiTBaselineTransformer2DModel(**TINY, num_classes=10)
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.tensor([1, 900]), class_labels=torch.tensor([2, 10])).sample
    assert out.shape == (2, 3, 8, 8) and out.abs().max() == 0
    tokens = model.pos_embed(x)
    block = model.transformer_blocks[0]
    after = block(tokens, timestep=torch.tensor([1, 900]), class_labels=torch.tensor([2, 10]))
    torch.testing.assert_close(after, tokens)


def test_diffusers_label_dropout_is_off_so_training_mode_is_deterministic():
    model = randomize(DiTBaselineTransformer2DModel(**TINY, num_classes=10)).train()
    x, t, labels = torch.randn(16, 3, 8, 8), torch.full((16,), 500), torch.arange(16) % 10
    torch.manual_seed(0)
    first = model(x, t, class_labels=labels).sample
    torch.manual_seed(1)
    torch.testing.assert_close(model(x, t, class_labels=labels).sample, first)


def test_null_label_is_num_classes_and_the_default():
    model = randomize(DiTBaselineTransformer2DModel(**TINY, num_classes=10))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 10])
    null = model(x, t, class_labels=torch.tensor([10, 10])).sample
    torch.testing.assert_close(model(x, t).sample, null)
    assert not torch.allclose(model(x, t, class_labels=torch.tensor([0, 1])).sample, null)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        model(x, t, class_labels=torch.tensor([0, 11]))


def test_unconditional_model_takes_no_labels():
    model = randomize(DiTBaselineTransformer2DModel(**TINY, num_classes=0))
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == 1
    x = torch.randn(2, 3, 8, 8)
    assert torch.isfinite(model(x, 3).sample).all()  # a scalar timestep is expanded
    with pytest.raises(ValueError, match="unconditional"):
        model(x, 3, class_labels=torch.tensor([0, 0]))


def test_learned_variance_and_inputs_are_checked():
    model = DiTBaselineTransformer2DModel(**TINY, out_channels=6)
    assert model(torch.randn(1, 3, 8, 8), 1).sample.shape == (1, 6, 8, 8)
    assert model.size_multiple == 2
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(1, 3, 9, 9), 1)
    with pytest.raises(ValueError, match="square"):
        model(torch.randn(1, 3, 8, 12), 1)
    with pytest.raises(ValueError, match="num_classes"):
        DiTBaselineTransformer2DModel(**TINY, num_classes=-1)


def test_a_saved_dit_does_not_load_as_an_mdit(tmp_path):
    # Save/load exactness of every model: tests/test_contracts.py.
    randomize(DiTBaselineTransformer2DModel(**TINY, num_classes=10)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="MDiTTransformer2DModel"):
        MDiTTransformer2DModel.from_pretrained(tmp_path)


def test_the_analog_presets_have_names_that_say_what_they_are_and_keep_the_old_ones():
    names = list_presets()
    assert {"DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"} <= set(names)
    for size in ("S", "B", "L", "XL"):
        assert f"MDiT-analog-{size}" in names and f"DiT-{size}" not in names
        old = MDiTTransformer2DModel.preset_config(f"DiT-{size}")
        assert old == MDiTTransformer2DModel.preset_config(f"MDiT-analog-{size}")
        assert old["num_outer_in_blocks"] == old["num_outer_out_blocks"] == 0
    with torch.device("meta"):
        assert type(from_preset("DiT-B")) is MDiTTransformer2DModel
    with pytest.raises(ValueError, match="DiTBaselineTransformer2DModel"):
        MDiTTransformer2DModel.preset_config("DiT-B/2")

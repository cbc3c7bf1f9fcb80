"""DiffiT models: TMSA, blocks, both variants, presets, serialisation, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffusers_mdit import DiffiTTransformer2DModel, DiffiTUNet2DModel, from_preset
from diffusers_mdit.models.diffit import (
    RelativePositionBias,
    TimeDependentSelfAttention,
    window_merge,
    window_partition,
)
from diffusers_mdit.profiling import preset_cost
from diffusers_mdit.testing import randomize

TINY_LATENT = dict(hidden_size=64, num_layers=2, num_attention_heads=4)
TINY_UNET = dict(
    block_out_channels=(32, 64, 64),
    layers_per_level=(1, 1, 1),
    attention_head_dim=16,
    norm_num_groups=8,
)


def tiny_latent(**overrides) -> DiffiTTransformer2DModel:
    return DiffiTTransformer2DModel.from_preset("DiffiT-S", **{**TINY_LATENT, **overrides})


def tiny_unet(**overrides) -> DiffiTUNet2DModel:
    return DiffiTUNet2DModel.from_preset("DiffiT-CIFAR10", **{**TINY_UNET, **overrides})


def noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- TMSA -----------------------------------------------------------------------------------------


def naive_tmsa(attn: TimeDependentSelfAttention, x, time_token, window):
    """Eq. 3-6 written out token by token for one window grid, as an independent reference."""
    batch, height, width, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    projections = (attn.to_q, attn.to_k, attn.to_v)
    w_s = torch.cat([p.weight for p in projections])
    b_s = torch.cat([p.bias for p in projections])
    w_t = attn.time_to_qkv.weight
    table = attn.relative_position_bias.table
    table_h, table_w = attn.relative_position_bias.size
    out = torch.zeros_like(x)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                wi, wj = i // window[0] * window[0], j // window[1] * window[1]
                keys = [
                    (y, z) for y in range(wi, wi + window[0]) for z in range(wj, wj + window[1])
                ]
                q = (x[b, i, j] @ w_s.T + b_s + time_token[b] @ w_t.T)[:dim]
                rows = torch.stack([x[b, y, z] for y, z in keys]) @ w_s.T + b_s
                rows = rows + time_token[b] @ w_t.T
                k, v = rows[:, dim : 2 * dim], rows[:, 2 * dim :]
                for h in range(heads):
                    sl = slice(h * head_dim, (h + 1) * head_dim)
                    bias = torch.stack(
                        [
                            table[
                                (i - y + table_h - 1) * (2 * table_w - 1) + j - z + table_w - 1, h
                            ]
                            for y, z in keys
                        ]
                    )
                    scores = k[:, sl] @ q[sl] / head_dim**0.5 + bias
                    out[b, i, j, sl] = torch.softmax(scores, 0) @ v[:, sl]
    return attn.to_out[0](out)


@pytest.mark.parametrize("window", [None, 2])
def test_tmsa_matches_equations_3_to_6(window):
    torch.manual_seed(0)
    size = (window, window) if window else (4, 6)
    attn = randomize(TimeDependentSelfAttention(16, 2, 8, window, size)).double()
    x, time_token = noise(2, 4, 6, 16).double(), noise(2, 8, seed=1).double()
    expected = naive_tmsa(attn, x, time_token, size)
    torch.testing.assert_close(attn(x, time_token), expected)


def test_window_attention_equals_global_attention_when_the_window_covers_the_grid():
    local = randomize(TimeDependentSelfAttention(16, 2, 8, window_size=4, bias_size=(4, 4)))
    glob = TimeDependentSelfAttention(16, 2, 8, window_size=None, bias_size=(4, 4))
    glob.load_state_dict(local.state_dict())
    x, time_token = noise(2, 4, 4, 16), noise(2, 8, seed=1)
    torch.testing.assert_close(local(x, time_token), glob(x, time_token))


def test_windows_do_not_exchange_information():
    attn = randomize(TimeDependentSelfAttention(16, 2, 8, window_size=2, bias_size=(2, 2)))
    x, time_token = noise(1, 4, 4, 16), noise(1, 8, seed=1)
    changed = x.clone()
    changed[:, 2:, 2:] += 1.0  # only the lower-right window
    delta = (attn(changed, time_token) - attn(x, time_token)).abs().amax(-1)
    assert delta[:, 2:, 2:].min() > 0
    assert delta[:, :2].max() == 0 and delta[:, 2:, :2].max() == 0


def test_window_partition_round_trip():
    x = noise(2, 6, 8, 3)
    windows = window_partition(x, (3, 4))
    assert windows.shape == (2 * 2 * 2, 12, 3)
    torch.testing.assert_close(windows[1], x[0, :3, 4:].reshape(12, 3))
    assert torch.equal(window_merge(windows, (3, 4), 6, 8), x)


def test_relative_position_bias_table_size_and_indexing():
    bias = RelativePositionBias((4, 4), num_heads=3)
    assert bias.table.shape == (7 * 7, 3)
    index = bias.index(4, 4, torch.device("cpu"))
    assert index.shape == (16, 16)
    assert index.min() == 0 and index.max() == 48 and index.unique().numel() == 49
    # Equal offsets share an entry: (0,0)->(1,2) and (2,1)->(3,3) are both (-1, -2).
    assert index[0 * 4 + 0, 1 * 4 + 2] == index[2 * 4 + 1, 3 * 4 + 3]
    # A larger grid clamps offsets beyond the table to its border.
    big = bias.index(6, 6, torch.device("cpu"))
    assert big[0, 5 * 6 + 5] == big[0, 3 * 6 + 3]


def test_time_token_changes_attention_through_tmsa_alone():
    model = randomize(tiny_latent(num_classes=0))
    with torch.no_grad():  # freeze the MLP path at zero: time can only act through TMSA
        for block in model.blocks:
            block.mlp.net[-1].weight.zero_()
            block.mlp.net[-1].bias.zero_()
    x = noise(1, 4, 16, 16)
    early, late = model(x, 10).sample, model(x, 900).sample
    assert (early - late).abs().max() > 1e-3
    with torch.no_grad():
        for block in model.blocks:
            block.attn.time_to_qkv.weight.zero_()
    torch.testing.assert_close(model(x, 10).sample, model(x, 900).sample, rtol=0, atol=0)


# -- both models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("window_size", [None, 2])
def test_latent_shapes_conditioning_and_learned_variance(num_classes, window_size):
    model = randomize(tiny_latent(num_classes=num_classes, window_size=window_size, out_channels=8))
    x = noise(2, 4, 16, 8)
    labels = torch.tensor([3, 10]) if num_classes else None
    out = model(x, torch.tensor([1, 999]), class_labels=labels).sample
    assert out.shape == (2, 8, 16, 8)
    if num_classes:  # the label changes the output; None is the null label
        other = model(x, torch.tensor([1, 999]), class_labels=torch.tensor([4, 10])).sample
        assert (other[0] - out[0]).abs().max() > 1e-4
        torch.testing.assert_close(other[1], out[1])
        null = model(x, torch.tensor([1, 999])).sample
        torch.testing.assert_close(null[1], out[1])


@pytest.mark.parametrize("num_classes", [0, 10])
def test_unet_shapes_and_conditioning(num_classes):
    model = randomize(tiny_unet(num_classes=num_classes))
    x = noise(2, 3, 32, 48)
    labels = torch.tensor([3, 10]) if num_classes else None
    out = model(x, torch.tensor([1.0, 500.0]), class_labels=labels).sample
    assert out.shape == x.shape and out.is_contiguous()


def test_unet_structure_follows_tables_s2_s3():
    model = DiffiTUNet2DModel.from_preset("DiffiT-FFHQ64")
    assert [len(level) for level in model.encoder_levels] == [4, 4, 4, 4]
    assert [len(level) for level in model.decoder_levels] == [4, 4, 4]
    assert [d.out_channels for d in model.downsamplers] == [256, 256, 256]
    assert all(d.stride == (2, 2) for d in model.downsamplers)
    windows = {b.transformer.attn.window_size for level in model.encoder_levels for b in level}
    assert windows == {8}
    assert DiffiTUNet2DModel.from_preset("DiffiT-CIFAR10").size_multiple == 16


@pytest.mark.parametrize("factory", [tiny_latent, tiny_unet])
def test_fresh_models_output_exactly_zero(factory):
    model = factory()
    size = 16 if factory is tiny_latent else 32
    channels = model.config.in_channels
    assert model(noise(2, channels, size, size), 5).sample.abs().max() == 0


def test_models_train_a_step():
    model = randomize(tiny_latent())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, target = noise(4, 4, 16, 16), noise(4, 4, 16, 16, seed=1)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(model(x, 100).sample, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_adaln_time_conditioning_is_dit_adaln_zero_at_matched_parameters(tmp_path):
    tmsa = tiny_latent(num_classes=10)
    adaln = tiny_latent(num_classes=10, time_conditioning="adaln", mlp_ratio=2.5)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(adaln) / count(tmsa) - 1) < 0.01
    block = adaln.blocks[0]
    assert block.attn.time_to_qkv is None and block.modulation.out_features == 6 * 64
    x, t, labels = noise(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 10])
    assert adaln(x, t, labels).sample.abs().max() == 0  # adaLN-Zero and a zero head
    randomize(adaln)
    # The block written out: x + g1 Attn(LN(x)(1 + s1) + b1), then the same for the MLP.
    h, time_token = noise(2, 8, 8, 64, seed=2), noise(2, 64, seed=3)
    b1, s1, g1, b2, s2, g2 = block.modulation(F.silu(time_token))[:, None, None].chunk(6, -1)
    expected = h + g1 * block.attn(F.layer_norm(h, (64,), eps=1e-6) * (1 + s1) + b1, None)
    expected = expected + g2 * block.mlp(F.layer_norm(expected, (64,), eps=1e-6) * (1 + s2) + b2)
    torch.testing.assert_close(block(h, time_token), expected)
    # Time reaches the output only through the modulation.
    assert not torch.equal(adaln(x, 3, labels).sample, adaln(x, 700, labels).sample)
    adaln.save_pretrained(tmp_path)
    loaded = DiffiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.time_conditioning == "adaln"
    assert torch.equal(loaded(x, t, labels).sample, adaln(x, t, labels).sample)


# -- presets and sizes ----------------------------------------------------------------------------


def test_diffit_xl_matches_the_paper_size_and_cost():
    # Paper table 9: 561M parameters and 114 G(MACs) per forward on ImageNet-256 latents.
    cost = preset_cost("DiffiT-XL")
    assert abs(cost.parameters / 561e6 - 1) < 0.02
    assert abs(cost.gmacs / 114 - 1) < 0.10
    # Depth 30 (the paper's text) would miss the parameter count by more than 5%.
    assert preset_cost("DiffiT-XL", num_layers=30).parameters / 561e6 > 1.05


def test_presets_belong_to_their_class_and_dispatch():
    assert DiffiTTransformer2DModel.list_presets() == ["DiffiT-XL", "DiffiT-S"]
    assert DiffiTUNet2DModel.list_presets() == ["DiffiT-CIFAR10", "DiffiT-FFHQ64"]
    assert isinstance(from_preset("DiffiT-S", **TINY_LATENT), DiffiTTransformer2DModel)
    with pytest.raises(ValueError, match="is a preset of DiffiTUNet2DModel"):
        DiffiTTransformer2DModel.from_preset("DiffiT-CIFAR10")
    assert preset_cost("DiffiT-S").parameters < 10e6


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, shape, kwargs, match",
    [
        (tiny_latent, (1, 3, 16, 16), {}, "in_channels"),
        (tiny_latent, (1, 4, 15, 16), {}, "multiples of 2"),
        (lambda: tiny_latent(window_size=4), (1, 4, 12, 16), {}, "TMSA window 4"),
        (tiny_unet, (1, 3, 24, 32), {}, "multiples of 16"),
        (
            lambda: tiny_latent(num_classes=0),
            (1, 4, 16, 16),
            {"class_labels": [1]},
            "unconditional",
        ),
        (lambda: tiny_latent(num_classes=5), (1, 4, 16, 16), {"class_labels": [6]}, r"\[0, 5\]"),
    ],
)
def test_bad_input_errors_name_the_fix(factory, shape, kwargs, match):
    model = factory()
    kwargs = {k: torch.tensor(v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape), 1, **kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (DiffiTTransformer2DModel, dict(hidden_size=100, num_attention_heads=16), "multiple"),
        (DiffiTTransformer2DModel, dict(sample_size=15), "patch_size"),
        (DiffiTUNet2DModel, dict(layers_per_level=(1, 1)), "one block count per level"),
        (DiffiTUNet2DModel, dict(window_size=(4, 4)), "one per level"),
        (DiffiTUNet2DModel, dict(num_classes=-1), "num_classes"),
        (DiffiTTransformer2DModel, dict(time_conditioning="film"), "time_conditioning"),
    ],
)
def test_bad_configs_raise(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="Available presets"):
        from_preset("DiffiT-XXL")

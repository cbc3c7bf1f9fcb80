"""MDiTTransformer2DModel: structure, conditioning, initialisation, serialisation, errors."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from diffusers_mdit import MDiTTransformer2DModel
from diffusers_mdit.models.attention import TimeTokenCrossAttention
from diffusers_mdit.models.embeddings import fourier_features, reduce_gradient_flow
from diffusers_mdit.models.layers import merge_tokens, split_tokens
from diffusers_mdit.profiling import count_parameters, forward_flops, preset_cost
from diffusers_mdit.testing import randomize as randomize_weights

# Tiny widths for any layout: 2 heads of 32 outside, 4 in the core.
TINY_WIDTHS = dict(outer_dim=64, core_dim=128, attention_head_dim=32)


def tiny(**overrides) -> MDiTTransformer2DModel:
    config = dict(
        sample_size=8,
        in_channels=4,
        num_outer_in_blocks=1,
        num_outer_out_blocks=2,
        num_alternating_blocks=2,
        num_core_blocks=1,
        outer_kernel_size=3,
        core_kernel_size=3,
        **TINY_WIDTHS,
    )
    config.update(overrides)
    return MDiTTransformer2DModel(**config)


# Norm scales stay near 1 (1 + noise) so deep stacks keep their activation scale.
randomize = functools.partial(randomize_weights, keep_unit_weights=True)


def inputs(batch=2, channels=4, height=8, width=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator), torch.tensor(
        [3.0, 700.0][:batch]
    )


# -- shapes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", MDiTTransformer2DModel.list_presets())
def test_every_preset_layout_runs_with_tiny_widths(preset):
    model = MDiTTransformer2DModel.from_preset(preset, num_classes=10, **TINY_WIDTHS)
    x, t = inputs(height=8, width=8)
    out = model(x, t, class_labels=torch.tensor([1, 10])).sample
    assert out.shape == x.shape


@pytest.mark.parametrize(
    "mode",
    ["unconditional", "class", "text", "class+text", "aux", "learned_variance"],
)
@pytest.mark.parametrize("layout", [(1, 2, 2, 1), (0, 0, 0, 2), (0, 1, 0, 1)])
def test_conditioning_modes_and_layouts(mode, layout):
    m, n, k, l = layout  # noqa: E741 (the paper's {M, N, K, L})
    overrides = dict(
        num_outer_in_blocks=m, num_outer_out_blocks=n, num_alternating_blocks=k, num_core_blocks=l
    )
    kwargs = {}
    if "class" in mode:
        overrides["num_classes"] = 5
        kwargs["class_labels"] = torch.tensor([0, 4])
    if "text" in mode:
        overrides["cross_attention_dim"] = 48
        kwargs["encoder_hidden_states"] = torch.randn(2, 6, 48)
        kwargs["encoder_attention_mask"] = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    if mode == "aux":
        overrides["use_aux_conditions"] = True
        kwargs.update(image_scale=torch.tensor([0.5, 1.0]), aspect_ratio=torch.tensor([1.0, 0.0]))
    if mode == "learned_variance":
        overrides["out_channels"] = 8
    model = randomize(tiny(**overrides))
    x, t = inputs()
    out = model(x, t, **kwargs).sample
    assert out.shape == (2, overrides.get("out_channels", 4), 8, 8)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_non_square_inputs_and_scalar_timestep():
    model = randomize(tiny())
    x = torch.randn(1, 4, 8, 20)
    assert model(x, 10).sample.shape == (1, 4, 8, 20)
    assert model(torch.randn(1, 4, 12, 4), torch.tensor(10.0)).sample.shape == (1, 4, 12, 4)


def test_return_dict_false_returns_tuple():
    model = tiny()
    x, t = inputs()
    (out,) = model(x, t, return_dict=False)
    assert out.shape == x.shape


# -- initialisation (G.3) -----------------------------------------------------------------------


def test_fresh_model_outputs_exactly_zero_and_init_follows_g3():
    model = tiny(num_classes=3, cross_attention_dim=16)
    x, t = inputs()
    out = model(
        x, t, class_labels=torch.tensor([0, 1]), encoder_hidden_states=torch.randn(2, 2, 16)
    )
    assert torch.equal(out.sample, torch.zeros_like(x))
    for name, p in model.named_parameters():
        # The mapping network is not a residual branch: zeroing it would leave W_t without gradient.
        zero = not name.startswith("condition_embedding") and any(
            key in name
            for key in (
                "to_out",
                "ff.net.2",
                "norm1.linear",
                "norm2.linear",
                "core_unpatch.proj",
                "proj_out",
            )
        )
        if zero:
            assert torch.all(p == 0), name
        elif p.ndim == 2:
            assert p.abs().max() <= 0.04, name
            if p.numel() > 1000:  # std of N(0, 0.02) truncated at 2 sigma: 0.0176
                assert 0.016 < p.std() < 0.019, name


# -- serialisation, checkpointing, PEFT ---------------------------------------------------------


def test_lora_adapter_targets_attention_and_feed_forward():
    from peft import LoraConfig

    model = tiny(num_classes=3)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj"]))
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert any("aggregate_blocks.0.attn.to_q" in n for n in names)
    assert any("core_blocks.0.ff.net.0.proj" in n for n in names)


# -- attention variants ---------------------------------------------------------------------------


def test_core_neighborhood_attention_with_covering_kernel_equals_global():
    model = randomize(tiny(num_classes=3)).eval()
    x, t = inputs(height=8, width=12)
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        global_out = model(x, t, class_labels=labels).sample
        model.set_core_attention("neighborhood", kernel_size=7)  # core grid is 4x6
        assert model.config.core_attention_type == "neighborhood"
        covering = model(x, t, class_labels=labels).sample
        model.set_core_attention("neighborhood", kernel_size=3)
        local = model(x, t, class_labels=labels).sample
    torch.testing.assert_close(covering, global_out, rtol=1e-5, atol=1e-5)
    assert (local - global_out).abs().max() > 1e-3


def dit_analog(**overrides) -> MDiTTransformer2DModel:
    """A tiny DiT analog {0, 0, 0, L} with an 8x8 core grid on 16x16 inputs."""
    config = dict(
        sample_size=16, in_channels=4, num_outer_in_blocks=0, num_outer_out_blocks=0,
        num_alternating_blocks=0, num_core_blocks=2, core_dim=64, attention_head_dim=32,
        num_classes=3,
    )  # fmt: skip
    return MDiTTransformer2DModel(**{**config, **overrides})


def test_per_block_core_kernels_follow_the_execution_order():
    model = tiny(num_alternating_blocks=2, num_core_blocks=1, core_kernel_sizes=[3, None, 0])
    sequence = [block.attn.kernel_size for block in model.core_sequence()]
    assert sequence == [3, None, None]
    assert model.core_blocks[0].attn.kernel_size == 3
    assert model.aggregate_blocks[0].attn.kernel_size is None
    model = tiny(core_attention_type="neighborhood", core_kernel_sizes=[None, 5, 3])
    assert [block.attn.kernel_size for block in model.core_sequence()] == [None, 5, 3]


def test_local_core_block_only_reads_tokens_inside_its_window():
    """One core block with k=3 on the 8x8 grid: perturbing the top-left token changes only
    the outputs of the queries whose (border-shifted) window holds it, tokens (i, j) with
    i, j <= 1, i.e. the top-left 4x4 pixels; the global block changes every pixel."""
    local = randomize(dit_analog(num_core_blocks=1, core_kernel_sizes=[3])).eval()
    full = dit_analog(num_core_blocks=1).eval()
    full.load_state_dict(local.state_dict())
    x, t = inputs(height=16, width=16)
    perturbed = x.clone()
    perturbed[:, :, :2, :2] += 1.0
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        local_change = (local(perturbed, t, labels).sample - local(x, t, labels).sample).abs()
        full_change = (full(perturbed, t, labels).sample - full(x, t, labels).sample).abs()
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[:4, :4] = True
    assert local_change[..., ~inside].max() == 0
    assert local_change[..., inside].amin(dim=(0, 1)).min() > 1e-4
    assert full_change[..., ~inside].amin(dim=(0, 1)).min() > 1e-6


def test_per_block_kernels_covering_the_grid_equal_global_and_smaller_ones_do_not():
    base = randomize(dit_analog(num_core_blocks=3)).eval()
    x, t = inputs(height=16, width=16)
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        reference = base(x, t, labels).sample
        outputs = {}
        for kernels in ([15, 15, None], [3, None, None], [None, None, 5]):
            model = dit_analog(num_core_blocks=3, core_kernel_sizes=kernels).eval()
            model.load_state_dict(base.state_dict())
            outputs[tuple(kernels)] = model(x, t, labels).sample
    # k = 15 = 2 * 8 - 1 covers the 8x8 grid from every query (clamped to 8: global).
    torch.testing.assert_close(outputs[(15, 15, None)], reference, rtol=1e-5, atol=1e-5)
    assert (outputs[(3, None, None)] - reference).abs().max() > 1e-3
    assert (outputs[(None, None, 5)] - reference).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kernels, match",
    [
        ([3], "one entry per core block.*2 = num_alternating_blocks"),
        ([3, 3, 3], "Give 2 entries"),
        ([4, None], "odd positive"),
        ([-3, None], "odd positive"),
        ([True, None], "odd positive"),
    ],
)
def test_bad_per_block_kernels_raise_clear_errors(kernels, match):
    with pytest.raises(ValueError, match=match):
        dit_analog(core_kernel_sizes=kernels)
    with pytest.raises(ValueError, match=match):
        dit_analog().set_core_kernel_sizes(kernels)


def test_per_block_kernels_save_load_round_trip(tmp_path):
    model = randomize(dit_analog(num_core_blocks=3, core_kernel_sizes=[3, 5, None])).eval()
    model.save_pretrained(tmp_path)
    loaded = MDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.core_kernel_sizes == [3, 5, None]
    assert [b.attn.kernel_size for b in loaded.core_sequence()] == [3, 5, None]
    x, t = inputs(height=16, width=16)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(model(x, t, labels).sample, loaded(x, t, labels).sample)


def test_set_core_attention_clears_per_block_kernels_and_set_core_kernel_sizes_restores():
    model = dit_analog(num_core_blocks=3, core_kernel_sizes=[3, None, None])
    model.set_core_attention("neighborhood", kernel_size=5)
    assert model.config.core_kernel_sizes is None
    assert [b.attn.kernel_size for b in model.core_sequence()] == [5, 5, 5]
    model.set_core_kernel_sizes([None, 3, 0])
    assert model.config.core_kernel_sizes == [None, 3, 0]
    assert [b.attn.kernel_size for b in model.core_sequence()] == [None, 3, None]
    model.set_core_kernel_sizes(None)  # back to the uniform neighborhood k=5
    assert model.config.core_kernel_sizes is None
    assert [b.attn.kernel_size for b in model.core_sequence()] == [5, 5, 5]
    model.set_core_attention("global")
    assert [b.attn.kernel_size for b in model.core_sequence()] == [None, None, None]


def test_outer_kernel_only_changes_output_when_smaller_than_grid():
    model = randomize(tiny(outer_kernel_size=3)).eval()
    x, t = inputs()
    with torch.no_grad():
        small = model(x, t).sample
        for block in model.outer_in_blocks:
            block.attn.kernel_size = 8
        for block in model.outer_out_blocks:
            block.attn.kernel_size = 8
        full = model(x, t).sample
        for block in list(model.outer_in_blocks) + list(model.outer_out_blocks):
            block.attn.kernel_size = 99
        larger = model(x, t).sample
    assert (small - full).abs().max() > 1e-3
    torch.testing.assert_close(larger, full)


def test_attention_math_runs_in_float32_under_bf16_autocast(monkeypatch):
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):  # diffusers' dispatcher passes keywords
        seen.append((query.dtype, key.dtype, value.dtype))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = randomize(tiny(num_classes=3))
    x, t = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, class_labels=torch.tensor([0, 1])).sample
    assert seen and all(dtypes == (torch.float32,) * 3 for dtypes in seen)
    assert torch.isfinite(out).all()


# -- conditioning -----------------------------------------------------------------------------


def test_padding_tokens_are_ignored_by_text_cross_attention():
    model = randomize(tiny(cross_attention_dim=24)).eval()
    x, t = inputs(batch=1)
    text = torch.randn(1, 3, 24)
    padded = torch.cat([text, 100 * torch.randn(1, 4, 24)], dim=1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0]])
    with torch.no_grad():
        short = model(x, t, encoder_hidden_states=text).sample
        masked = model(x, t, encoder_hidden_states=padded, encoder_attention_mask=mask).sample
        unmasked = model(x, t, encoder_hidden_states=padded).sample
    torch.testing.assert_close(masked, short, rtol=1e-5, atol=1e-5)
    assert (unmasked - short).abs().max() > 1e-3


@pytest.mark.parametrize("class_conditioning", ["cross_attention", "modulation"])
def test_class_conditioning_modes_follow_the_label_and_none_means_null(class_conditioning):
    model = randomize(tiny(num_classes=4, class_conditioning=class_conditioning)).eval()
    x, t = inputs()
    with torch.no_grad():
        a = model(x, t, class_labels=torch.tensor([0, 0])).sample
        b = model(x, t, class_labels=torch.tensor([1, 1])).sample
        null = model(x, t, class_labels=torch.tensor([4, 4])).sample
        none = model(x, t).sample
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(none, null)


def test_class_modulation_adds_the_embedding_to_the_global_condition_and_has_no_class_tokens():
    """``"modulation"`` = ``G(t + y)``: a model whose class embedding row is the zero vector
    behaves exactly like the unconditional model with the same weights, and no block has
    condition-token projections."""
    model = randomize(tiny(num_classes=4, class_conditioning="modulation")).eval()
    plain = tiny(num_classes=0)
    assert not any("cross_attn.to_k." in name for name, _ in model.named_parameters())
    assert model.class_embedding.weight.shape == (5, model.config.core_dim)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("class_embedding")}
    plain.load_state_dict(state)  # strict: the rest of the model is the unconditional one
    plain.eval()
    x, t = inputs()
    with torch.no_grad():
        model.class_embedding.weight[2].zero_()
        zero = model(x, t, class_labels=torch.tensor([2, 2])).sample
        other = model(x, t, class_labels=torch.tensor([1, 1])).sample
        torch.testing.assert_close(zero, plain(x, t).sample)
    assert (other - zero).abs().max() > 1e-3
    tokens = tiny(num_classes=4)
    fewer = count_parameters(tokens) - count_parameters(model)
    blocks = [m for m in tokens.modules() if isinstance(m, TimeTokenCrossAttention)]
    assert blocks and fewer == sum(m.to_k.weight.numel() + m.to_v.weight.numel() for m in blocks)


def test_timestep_and_aux_conditions_change_output():
    model = randomize(tiny(use_aux_conditions=True)).eval()
    x, _ = inputs()
    with torch.no_grad():
        base = model(x, torch.tensor([10.0, 10.0])).sample
        later = model(x, torch.tensor([900.0, 900.0])).sample
        scaled = model(x, torch.tensor([10.0, 10.0]), image_scale=torch.tensor([0.5, 0.5])).sample
        dropped = model(x, torch.tensor([10.0, 10.0]), image_scale=torch.zeros(2)).sample
    assert (base - later).abs().max() > 1e-3
    assert (base - scaled).abs().max() > 1e-3
    torch.testing.assert_close(dropped, base)


def test_fourier_features_zero_marks_dropped_condition():
    values = torch.tensor([0.0, 0.5])
    features = fourier_features(values, 8, 1.0, 1000.0)
    assert torch.equal(features[0], torch.zeros(8))
    freqs = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    expected = torch.cat([(0.5 * freqs).cos(), (0.5 * freqs).sin()])
    # float32 angles of up to 500 rad carry ~3e-5 absolute error.
    torch.testing.assert_close(features[1], expected, rtol=0, atol=2e-4)


def test_gradient_flow_reduction_keeps_value_and_scales_gradient():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = reduce_gradient_flow(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 0.25))


# -- aggregate token merge ------------------------------------------------------------------------


def test_merge_tokens_matches_listing_2_and_split_inverts_it():
    x = torch.randn(2, 4, 6, 3)
    merged = merge_tokens(x, 2)
    # Listing 2: 'b (h p) (w q) c -> b h w (c p q)', written out by hand.
    for i in range(2):
        for j in range(3):
            expected = torch.stack(
                [x[:, 2 * i + p, 2 * j + q, :] for p in range(2) for q in range(2)], dim=-1
            ).reshape(2, -1)
            torch.testing.assert_close(merged[:, i, j], expected)
    assert torch.equal(split_tokens(merged, 2), x)


# -- presets and sizes ----------------------------------------------------------------------------


def test_preset_parameter_counts_near_paper():
    # Paper: MDiT-B has about 133M parameters class-conditional on ImageNet (section F.1).
    assert abs(preset_cost("MDiT-B").parameters / 133e6 - 1) < 0.02
    # Our MDiT-S must stay small enough to train on a CPU in minutes.
    assert preset_cost("MDiT-S").parameters < 10e6


def test_mdit_b_forward_cost_near_paper():
    # Paper: about 30 G (multiply-accumulates, as fvcore counts) per forward on 4x32x32 latents.
    assert abs(preset_cost("MDiT-B").gmacs / 30 - 1) < 0.06


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_dit_analog_depth_is_the_closest_parameter_match(size):
    target = preset_cost(f"MDiT-{size}").parameters
    depth = MDiTTransformer2DModel.preset_config(f"DiT-{size}")["num_core_blocks"]

    def gap(d):
        return abs(preset_cost(f"DiT-{size}", num_core_blocks=d).parameters - target)

    assert gap(depth) <= min(gap(depth - 1), gap(depth + 1))


def test_mdit_l_aggregate_and_core_block_flops_match_paper():
    # G.5: in MDiT-L an aggregate block costs 3.78 G, a core block 3.92 G (16x16 core tokens).
    with torch.device("meta"):
        model = MDiTTransformer2DModel.from_preset("MDiT-L")
        core_grid = torch.zeros(1, 16, 16, 1024)
        condition = torch.zeros(1, 1024)
        tokens = torch.zeros(1, 1, 1024)
        aggregate = forward_flops(model.aggregate_blocks[0], core_grid, condition)
        core = forward_flops(model.core_blocks[0], core_grid, condition, tokens)
    assert abs(aggregate / 2e9 - 3.78) / 3.78 < 0.02
    assert abs(core / 2e9 - 3.92) / 3.92 < 0.02


def test_meta_device_counts_match_a_real_model():
    config = dict(num_classes=5, **TINY_WIDTHS)
    real = MDiTTransformer2DModel.from_preset("MDiT-S", **config)
    assert count_parameters(real) == preset_cost("MDiT-S", **config).parameters


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, call, match",
    [
        ({}, dict(x=torch.randn(1, 3, 8, 8)), "in_channels"),
        ({}, dict(x=torch.randn(1, 4, 8, 6)), "multiples of 4"),
        ({"num_alternating_blocks": 0}, dict(x=torch.randn(1, 4, 7, 8)), "multiples of 2"),
        ({"num_classes": 3}, dict(class_labels=torch.tensor([0, 5])), r"\[0, 3\]"),
        ({"num_classes": 3}, dict(class_labels=torch.tensor([-1, 0])), r"\[0, 3\]"),
        ({}, dict(class_labels=torch.tensor([0, 1])), "unconditional"),
        ({}, dict(encoder_hidden_states=torch.randn(2, 3, 16)), "cross_attention_dim"),
        ({"cross_attention_dim": 32}, dict(encoder_hidden_states=torch.randn(2, 3, 16)), "32"),
        ({}, dict(image_scale=torch.ones(2)), "use_aux_conditions"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, call, match):
    model = tiny(**kwargs)
    x = call.pop("x", inputs()[0])
    with pytest.raises(ValueError, match=match):
        model(x, torch.zeros(x.shape[0]), **call)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_alternating_blocks": 3}, "even"),
        ({"core_dim": 100}, "multiple of attention_head_dim"),
        ({"core_attention_type": "windowed"}, "global"),
        ({"class_conditioning": "adaln"}, "class_conditioning must be"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kwargs)


def test_unknown_preset_and_override_raise_clear_errors():
    with pytest.raises(ValueError, match="MDiT-B"):
        MDiTTransformer2DModel.from_preset("MDiT-Q")
    with pytest.raises(ValueError, match="num_heads"):
        MDiTTransformer2DModel.from_preset("MDiT-S", num_heads=3)
    with pytest.raises(ValueError, match="global"):
        tiny().set_core_attention("sparse")

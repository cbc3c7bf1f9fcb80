"""RoPE attention probe: heads with a known focus are classified as such, in our attention
layers and in rotary language models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.explain import cli
from diffusers_mdit.explain.rope_probe import (
    classify_heads,
    language_model_pair_index,
    plot_rope_probe,
    rope_probe,
    rope_probe_language_model,
)
from diffusers_mdit.models.attention import GridSelfAttention
from diffusers_mdit.testing import ddim_x0, randomize, tiny_mdit

HEAD_DIM, PAIRS = 16, 4  # 8 complex pairs per head, the first 4 rotated (2 x, 2 y)


def _only_channels(linear: torch.nn.Linear, head: int, keep: torch.Tensor) -> None:
    """Zero the rows of ``head`` in a (heads * HEAD_DIM)-output projection except ``keep``."""
    rows = torch.arange(HEAD_DIM)
    drop = rows[~torch.isin(rows, keep)] + head * HEAD_DIM
    with torch.no_grad():
        linear.weight[drop] = 0


class Wrapper(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn


def test_heads_reaching_only_rotated_or_unrotated_channels_are_positional_or_semantic():
    torch.manual_seed(0)
    attn = GridSelfAttention(dim=48, num_heads=3, head_dim=HEAD_DIM, rope_pairs=PAIRS)
    position = torch.arange(2 * PAIRS)  # channels of the rotated pairs (interleaved)
    semantic = torch.arange(2 * PAIRS, HEAD_DIM)
    for projection in (attn.to_q, attn.to_k):
        _only_channels(projection, 0, position)
        _only_channels(projection, 1, semantic)
    result = rope_probe(Wrapper(attn), num_tokens=1024, progress=False)
    (layer,) = result.layers
    assert layer.classes == ["positional", "semantic", "hybrid"]
    # Energy that cannot reach a group shows as ~ -2; the budget moves to the other group.
    assert layer.q[0, PAIRS:].max() < -1.8 and layer.q[0, :PAIRS].min() > 1.0
    assert layer.k[1, :PAIRS].max() < -1.8 and layer.k[1, PAIRS:].min() > 1.0
    assert np.abs(layer.q[2]).max() < 1.0
    assert result.counts == {"positional": 1, "semantic": 1, "hybrid": 1}


def test_classification_thresholds():
    q = torch.tensor([[1.5, 1.5, -1.5, -1.5], [-1.2, -1.2, 1.2, 1.2], [0.5, 0.5, -0.5, -0.5]])
    classes, position, semantic = classify_heads(q, q, num_position_pairs=2, weak_fraction=0.5)
    assert classes == ["positional", "semantic", "hybrid"]
    assert position == pytest.approx([3.5, 0.8, 2.5]) and semantic == pytest.approx([0.5, 3.2, 1.5])
    # A stricter threshold turns the middle head hybrid (its weak group is at 0.8 > 0.3 * 2).
    assert classify_heads(q, q, 2, weak_fraction=0.3)[0] == ["positional", "hybrid", "hybrid"]


def test_probe_of_every_mdit_layer_conserves_head_energy_and_plots(tmp_path):
    model = randomize(tiny_mdit())
    result = rope_probe(model, num_tokens=256, progress=False)
    names = [layer.name for layer in result.layers]
    assert names == ["outer_in.0", "core.0", "aggregate.0", "core.1", "outer_out.0"]
    for layer, (_, block) in zip(result.layers, model.blocks_in_order(), strict=True):
        heads, pairs = block.attn.num_heads, block.attn.head_dim // 2
        assert layer.q.shape == layer.k.shape == (heads, pairs)
        # LayerNorm-ed heads: the pair energies |z|^2 average exactly 2, so |z|^2 - 2 sums to 0.
        np.testing.assert_allclose(layer.q.mean(1), 0, atol=1e-4)
        np.testing.assert_allclose(layer.k.mean(1), 0, atol=1e-4)
    assert sum(result.counts.values()) == sum(len(layer.classes) for layer in result.layers)
    assert result.layers[0].kernel_size == model.config.outer_kernel_size
    path = plot_rope_probe(result, str(tmp_path / "probe.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def _gptj(rotary_dim=8):
    from transformers import GPTJConfig, GPTJForCausalLM

    config = GPTJConfig(
        n_embd=48, n_head=3, rotary_dim=rotary_dim, n_layer=2, vocab_size=32, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPTJForCausalLM(config).eval()


def test_language_model_probe_gptj_partial_rotary():
    torch.manual_seed(0)
    model = _gptj(rotary_dim=2 * PAIRS)  # head_dim 16: 4 rotated pairs, 4 not
    attn = model.transformer.h[1].attn
    for projection in (attn.q_proj, attn.k_proj):
        _only_channels(projection, 0, torch.arange(2 * PAIRS))
        _only_channels(projection, 2, torch.arange(2 * PAIRS, HEAD_DIM))
    result = rope_probe_language_model(model, num_tokens=1024, progress=False)
    assert [layer.name for layer in result.layers] == [
        "transformer.h.0.attn",
        "transformer.h.1.attn",
    ]
    assert result.axes == 1 and result.num_position_pairs == PAIRS
    assert result.layers[1].classes == ["positional", "hybrid", "semantic"]
    assert result.layers[0].classes == ["hybrid"] * 3


def test_language_model_probe_llama_rotate_half_pairs_and_grouped_keys():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=48, intermediate_size=64, num_attention_heads=3, num_key_value_heads=1,
        num_hidden_layers=1, vocab_size=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    attn = model.model.layers[0].self_attn
    # Llama pairs channel i with i + head_dim / 2: starve pair 0 (channels 0 and 8) of head 0.
    _only_channels(attn.q_proj, 0, torch.tensor([c for c in range(HEAD_DIM) if c not in (0, 8)]))
    result = rope_probe_language_model(model, num_tokens=2048, progress=False)
    (layer,) = result.layers
    assert layer.q.shape == (3, HEAD_DIM // 2) and layer.k.shape == (1, HEAD_DIM // 2)
    assert layer.q[0, 0] < -1.8 and layer.q[0, 1:].min() > -1.0
    # Every pair rotates in Llama: no semantic group, so every head counts as positional.
    assert layer.classes == ["positional"] * 3
    assert np.isnan(layer.semantic_energy).all()
    index = language_model_pair_index(8, 4, "half")
    assert index.tolist() == [[0, 2], [1, 3], [4, 5], [6, 7]]
    assert language_model_pair_index(8, 4, "interleaved").tolist() == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
    ]


def test_cli_writes_json_and_png(tmp_path):
    pipe = tmp_path / "pipe"
    MDiTPipeline(transformer=randomize(tiny_mdit()), scheduler=ddim_x0()).save_pretrained(pipe)
    out = tmp_path / "out"
    assert cli.main(["rope-probe", str(pipe), "--output_dir", str(out), "--num_tokens", "64"]) == 0
    data = json.loads((out / "rope-probe.json").read_text())
    assert set(data["classes_by_layer"]) == {
        "outer_in.0",
        "core.0",
        "aggregate.0",
        "core.1",
        "outer_out.0",
    }
    assert len(data["result"]["layers"][1]["q"]) == 4  # core heads of the tiny model
    assert (out / "rope_probe.png").is_file()

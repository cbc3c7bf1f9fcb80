"""Focal patterns: heads with only x or only y position energy give bars along one axis."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffusers_mdit import MDiTPipeline
from diffusers_mdit.explain import cli
from diffusers_mdit.explain.focal import focal_pattern, focal_patterns, plot_focal
from diffusers_mdit.explain.rope_probe import LayerProbe, RopeProbeResult, rope_probe
from diffusers_mdit.testing import ddim_x0, randomize, tiny_mdit

FREQUENCIES = [1.0, 0.5, 0.25, 0.125]


def test_x_only_and_y_only_heads_give_vertical_and_horizontal_bars():
    x_only = focal_pattern([2, 2, 2, 2, 0, 0, 0, 0], FREQUENCIES, size=16)
    y_only = focal_pattern([0, 0, 0, 0, 2, 2, 2, 2], FREQUENCIES, size=16)
    assert x_only.shape == (16, 16)
    np.testing.assert_allclose(x_only, x_only[:1].repeat(16, 0))  # constant down each column
    np.testing.assert_allclose(y_only, x_only.T)
    assert x_only[8, 8] == pytest.approx(1.0)  # (4 pairs x 2) / 8 position pairs
    assert x_only[8].argmax() == 8 and x_only[8, 8] > x_only[8, 9] > x_only[8, 10]
    even = focal_pattern([2.0] * 8, FREQUENCIES)
    assert even[8, 8] == pytest.approx(2.0) and even.max() == pytest.approx(2.0)
    np.testing.assert_allclose(even, even.T)
    with pytest.raises(ValueError, match="8 position-pair energies"):
        focal_pattern([1.0] * 6, FREQUENCIES)


def test_patterns_and_anisotropy_from_a_probe(tmp_path):
    q = np.full((2, 8), -2.0)  # 8 pairs, 4 position (2 x, 2 y)
    q[0, :2] = 2.0  # head 0: x pairs only
    q[1, 2:4] = 2.0  # head 1: y pairs only
    layer = LayerProbe("outer_in.0", q, q, [0.0, 0.0], [0.0, 0.0], ["positional"] * 2, 7)
    probe = RopeProbeResult([layer], num_position_pairs=4, axes=2, frequencies=[1.0, 0.25],
                            weak_fraction=0.5)  # fmt: skip
    result = focal_patterns(probe, size=8)
    assert result.anisotropy == [[1.0, -1.0]]
    assert result.centre_amplitude == [[2.0, 2.0]]
    np.testing.assert_allclose(result.patterns[0][0], result.patterns[0][1].T)
    assert open(plot_focal(result, str(tmp_path / "f.png")), "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="axial"):
        focal_patterns(RopeProbeResult([layer], 4, 1, [1.0, 0.25], 0.5))


def test_focal_of_a_model_and_cli(tmp_path):
    model = randomize(tiny_mdit())
    result = focal_patterns(rope_probe(model, num_tokens=64, progress=False), size=8)
    assert result.layers[0] == "outer_in.0" and result.kernel_sizes[0] == 3
    assert [len(p) for p in result.patterns] == [
        b.attn.num_heads for _, b in model.blocks_in_order()
    ]
    MDiTPipeline(transformer=model, scheduler=ddim_x0()).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "out"
    cli.main(["focal", str(tmp_path / "pipe"), "--output_dir", str(out), "--size", "8",
              "--num_tokens", "64"])  # fmt: skip
    data = json.loads((out / "focal.json").read_text())
    assert len(data["patterns"][0][0]) == 8 and (out / "focal.png").is_file()

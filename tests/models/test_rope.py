"""Partial-head axial RoPE (MDiT sections 3.1, 4.1)."""

from __future__ import annotations

import math

import pytest
import torch

from diffusers_mdit.models.rope import PartialAxialRoPE


def test_angles_by_hand():
    rope = PartialAxialRoPE(head_dim=64, num_position_pairs=16, base=16.0)
    angles = rope.angles(3, 5)
    assert angles.shape == (3, 5, 16)
    # Pair j < 8 rotates by column * 16 ** (-j / 8); pair 8 + j by row * 16 ** (-j / 8).
    assert angles[2, 4, 0] == pytest.approx(4.0)
    assert angles[2, 4, 8] == pytest.approx(2.0)
    assert angles[1, 3, 4] == pytest.approx(3 * 16 ** (-4 / 8))
    assert angles[1, 3, 15] == pytest.approx(1 * 16 ** (-7 / 8))


def test_coordinates_are_integer_indices_independent_of_grid_size():
    rope = PartialAxialRoPE(64)
    assert torch.equal(rope.angles(8, 12)[:4, :6], rope.angles(4, 6))


def test_only_the_position_pairs_rotate_and_magnitudes_are_kept():
    rope = PartialAxialRoPE(head_dim=64, num_position_pairs=16)
    x = torch.randn(2, 4, 5, 3, 64)
    y = rope(x)
    assert torch.equal(y[..., 32:], x[..., 32:])
    assert torch.equal(y[:, 0, 0], x[:, 0, 0])  # the upper-left token has angle 0
    magnitude = lambda t: t.unflatten(-1, (-1, 2)).square().sum(-1)  # noqa: E731
    torch.testing.assert_close(magnitude(y), magnitude(x))
    assert (y[:, 1:, 1:, :, :32] - x[:, 1:, 1:, :, :32]).abs().max() > 1e-2


def test_query_key_products_depend_only_on_relative_offset():
    rope = PartialAxialRoPE(head_dim=16, num_position_pairs=8, base=16.0)
    q = torch.randn(16)
    k = torch.randn(16)
    grid = torch.zeros(1, 9, 9, 1, 16)

    def product(pos_q, pos_k):
        qs, ks = grid.clone(), grid.clone()
        qs[0, pos_q[0], pos_q[1], 0] = q
        ks[0, pos_k[0], pos_k[1], 0] = k
        return (rope(qs)[0, pos_q[0], pos_q[1], 0] * rope(ks)[0, pos_k[0], pos_k[1], 0]).sum()

    reference = product((1, 2), (3, 0))
    torch.testing.assert_close(product((5, 7), (7, 5)), reference, rtol=1e-5, atol=1e-5)
    assert abs(product((1, 2), (3, 1)) - reference) > 1e-3


def test_rotation_matches_complex_multiplication():
    rope = PartialAxialRoPE(head_dim=8, num_position_pairs=2, base=16.0)
    x = torch.randn(1, 3, 4, 2, 8, dtype=torch.float64)
    y = rope(x)
    angles = rope.angles(3, 4)  # (H, W, 2)
    z = torch.view_as_complex(x[..., :4].reshape(1, 3, 4, 2, 2, 2).contiguous())
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, :, None])
    torch.testing.assert_close(y[..., :4], expected.reshape(1, 3, 4, 2, 4).to(y.dtype))


def test_disabled_rope_is_identity_and_bad_sizes_raise():
    rope = PartialAxialRoPE(64)
    rope.enabled = False
    x = torch.randn(1, 2, 2, 1, 64)
    assert torch.equal(rope(x), x)
    with pytest.raises(ValueError, match="num_position_pairs"):
        PartialAxialRoPE(head_dim=16, num_position_pairs=10)
    assert math.isclose(float(PartialAxialRoPE(64).frequencies()[-1]), 16 ** (-7 / 8))

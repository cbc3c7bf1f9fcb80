"""Shared layers: the fused GeGLU and RMSNorm against diffusers' modules and autograd."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.normalization import RMSNorm

from diffusers_mdit.models.layers import (
    FusedGEGLU,
    FusedRMSNorm,
    _RMSNormFunction,
    geglu_feed_forward,
    rms_norm,
)


def test_fused_geglu_matches_diffusers_geglu_forward_and_backward():
    torch.manual_seed(0)
    reference = GEGLU(24, 40, bias=False).double()
    fused = FusedGEGLU(24, 40, bias=False).double()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(3, 5, 24, dtype=torch.double, requires_grad=True)
    grad = torch.randn(3, 5, 40, dtype=torch.double)

    outputs, grads = [], []
    for module in (reference, fused):
        x.grad = None
        module.zero_grad()
        out = module(x)
        out.backward(grad)
        outputs.append(out)
        grads.append((x.grad.clone(), module.proj.weight.grad.clone()))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-12)
    for fused_grad, reference_grad in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(fused_grad, reference_grad, rtol=0, atol=1e-12)


def test_fused_geglu_passes_gradcheck():
    torch.manual_seed(0)
    module = FusedGEGLU(6, 4, bias=False).double()
    x = torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(module, (x,))


def test_feed_forward_keeps_diffusers_state_dict_keys():
    ff = geglu_feed_forward(64, 8 / 3)
    assert set(ff.state_dict()) == {"net.0.proj.weight", "net.2.weight"}
    assert ff.net[0].proj.weight.shape == (2 * 192, 64)


@pytest.mark.parametrize("scale_shape", [None, (5,), (2, 1, 1, 5)])
def test_fused_rms_norm_passes_gradcheck(scale_shape):
    # The fused function itself, in float64 (rms_norm would take its composite path there).
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.double, requires_grad=True)
    scale = None
    if scale_shape:
        scale = torch.randn(scale_shape, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, s: _RMSNormFunction.apply(a, s, 1e-6), (x, scale))


@pytest.mark.parametrize("scale_shape", [None, (16,), (2, 1, 1, 16)])
def test_fused_rms_norm_matches_composite_in_float32(scale_shape):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 16, requires_grad=True)
    scale = torch.randn(scale_shape, requires_grad=True) if scale_shape else None
    grad = torch.randn(2, 3, 4, 16)

    def composite(a, s):
        out = a * torch.rsqrt(a.square().mean(-1, keepdim=True) + 1e-6)
        return out if s is None else out * s

    results = []
    for fn in (composite, lambda a, s: rms_norm(a, s, 1e-6)):
        x.grad = None
        if scale is not None:
            scale.grad = None
        out = fn(x, scale)
        out.backward(grad)
        results.append((out, x.grad.clone(), None if scale is None else scale.grad.clone()))
    for fused, reference in zip(results[1], results[0], strict=True):
        if reference is not None:
            torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_fused_rms_norm_module_matches_diffusers():
    torch.manual_seed(0)
    reference, fused = RMSNorm(16, eps=1e-6), FusedRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_()
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(fused(x), reference(x))

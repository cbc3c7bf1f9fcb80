"""Shared layers: the fused GeGLU and RMSNorm against diffusers' modules and autograd."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.activations import GEGLU
from diffusers.models.normalization import RMSNorm

from diffusers_mdit.models.layers import (
    FusedGEGLU,
    FusedRMSNorm,
    _ChunkedGeGLUFunction,
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


def _chunked_feed_forward(dim=32, tokens_per_chunk=4):
    torch.manual_seed(0)
    ff = geglu_feed_forward(dim, 8 / 3).double()
    for p in ff.parameters():
        torch.nn.init.normal_(p, std=0.2)  # the output projection is zero-initialised in models
    hidden = ff.net[0].proj.out_features
    ff.chunk_bytes = tokens_per_chunk * hidden * 8  # float64: chunks of `tokens_per_chunk`
    return ff


def test_chunked_feed_forward_passes_gradcheck():
    ff = _chunked_feed_forward(dim=8)
    x = torch.randn(11, 8, dtype=torch.double, requires_grad=True)  # 3 chunks, the last short
    w_in = ff.net[0].proj.weight.detach().requires_grad_()
    w_out = ff.net[-1].weight.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: _ChunkedGeGLUFunction.apply(a, b, c, 4), (x, w_in, w_out)
    )


def test_chunked_feed_forward_matches_the_module_path_and_is_taken_on_cpu(monkeypatch):
    ff = _chunked_feed_forward()
    x = torch.randn(2, 3, 5, 32, dtype=torch.double, requires_grad=True)  # 30 tokens
    grad = torch.randn(2, 3, 5, 32, dtype=torch.double)
    calls = []
    apply = _ChunkedGeGLUFunction.apply
    monkeypatch.setattr(_ChunkedGeGLUFunction, "apply", lambda *a: calls.append(1) or apply(*a))

    results = []
    for fused in (False, True):
        monkeypatch.setattr(type(ff), "_fusable", lambda self, h, fused=fused: fused)
        x.grad = None
        ff.zero_grad()
        out = ff(x)
        out.backward(grad)
        results.append((out, x.grad, *(p.grad for p in ff.parameters())))
    assert calls == [1]
    for fused, module in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(fused, module, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # inference keeps nothing for backward but gives the same output
        torch.testing.assert_close(ff(x), results[0][0])


@pytest.mark.parametrize("tokens", [30, 3])  # 8 chunks of 4 (the last short); one chunk
def test_feed_forward_inference_skips_autograd_and_matches(tokens, monkeypatch):
    # Without gradients the fused path runs the chunks directly (one hidden-size buffer, no
    # autograd context keeping every chunk's projection), also below the chunking threshold.
    ff = _chunked_feed_forward()
    x = torch.randn(tokens, 32, dtype=torch.double)
    module = ff.net[2](ff.net[1](ff.net[0](x)))  # diffusers' FeedForward, layer by layer
    calls = []
    apply = _ChunkedGeGLUFunction.apply
    monkeypatch.setattr(_ChunkedGeGLUFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    with torch.no_grad():
        torch.testing.assert_close(ff(x), module, rtol=1e-12, atol=1e-12)
    with torch.inference_mode():
        torch.testing.assert_close(ff(x), module, rtol=1e-12, atol=1e-12)
    assert calls == []
    for p in ff.parameters():  # frozen weights, input without grad: nothing to differentiate
        p.requires_grad_(False)
    torch.testing.assert_close(ff(x), module, rtol=1e-12, atol=1e-12)
    assert calls == []


def test_chunked_feed_forward_keeps_only_the_projections():
    # Backward recomputes the activation from each chunk's projection: nothing else of hidden
    # size is saved (the activated gate was, before).
    x = torch.randn(10, 32, dtype=torch.double, requires_grad=True)
    w_in = torch.randn(48, 32, dtype=torch.double, requires_grad=True)
    w_out = torch.randn(32, 24, dtype=torch.double, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.shape) or t, lambda t: t
    ):
        _ChunkedGeGLUFunction.apply(x, w_in, w_out, 4)
    assert saved == [x.shape, w_in.shape, w_out.shape, (4, 48), (4, 48), (2, 48)]


def test_chunked_feed_forward_is_skipped_for_lora_hooks_and_autocast():
    ff = _chunked_feed_forward().float()
    x = torch.randn(30, 32)
    assert ff._fusable(x)
    assert not ff._fusable(x.double())  # dtype differs from the weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ff._fusable(x)
    handle = ff.net[-1].register_forward_hook(lambda *args: None)
    assert not ff._fusable(x)
    handle.remove()
    ff.train()
    ff.net[1].p = 0.1
    assert not ff._fusable(x)  # dropout must run in training
    ff.eval()
    assert ff._fusable(x)


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

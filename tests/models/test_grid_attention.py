"""GridSelfAttention's projection: three matmuls in one autograd function on the CPU, one
stacked matmul elsewhere and under autocast, each layer's own forward for wrapped or hooked
ones."""

from __future__ import annotations

import torch

from diffusers_mdit.models import attention
from diffusers_mdit.models.attention import GridSelfAttention, _QKVProjection


def _separate(attn: GridSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """The projection computed layer by layer (independent of the stacked path)."""
    heads = (attn.num_heads, attn.head_dim)
    q, k, v = (layer(x).unflatten(-1, heads) for layer in (attn.to_q, attn.to_k, attn.to_v))
    norm = torch.nn.functional.layer_norm
    return torch.stack(
        [attn.rope(norm(q, (attn.head_dim,))), attn.rope(norm(k, (attn.head_dim,))), v]
    )


def test_stacked_projection_matches_the_separate_layers_values_and_gradients():
    torch.manual_seed(0)
    attn = GridSelfAttention(32, 2, head_dim=16, kernel_size=3, rope_pairs=4)
    x = torch.randn(2, 8, 6, 32)  # >= 2 x 32 tokens: stacked
    stacked = torch.stack(attn.project(x))
    torch.testing.assert_close(stacked, _separate(attn, x))
    grad = torch.randn_like(stacked)
    grads = []
    for out in (stacked, _separate(attn, x)):
        attn.zero_grad()
        out.backward(grad)
        grads.append([attn.to_q.weight.grad.clone(), attn.to_v.weight.grad.clone()])
    for ours, reference in zip(*grads, strict=True):
        torch.testing.assert_close(ours, reference)


def test_cpu_projection_goes_through_the_qkv_function(monkeypatch):
    calls = []
    apply = _QKVProjection.apply
    monkeypatch.setattr(_QKVProjection, "apply", lambda *a: calls.append(1) or apply(*a))
    attn = GridSelfAttention(32, 2, head_dim=16, kernel_size=3, rope_pairs=4)
    attn.project(torch.randn(1, 4, 4, 32))
    assert calls == [1]


def test_qkv_function_passes_gradcheck_also_with_an_unused_output():
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=torch.double, requires_grad=True)
    weights = [torch.randn(4, 6, dtype=torch.double, requires_grad=True) for _ in range(3)]
    assert torch.autograd.gradcheck(lambda *a: _QKVProjection.apply(*a), (x, *weights))
    q, _, v = _QKVProjection.apply(x, *weights)
    (q.sum() + v.square().sum()).backward()  # the key's gradient is None
    assert weights[1].grad is None
    torch.testing.assert_close(weights[0].grad, x.detach().sum(0).expand(4, 6))


def test_stacked_projection_under_autocast_matches_the_separate_layers(monkeypatch):
    calls = []
    stacked = attention._stacked_weight
    monkeypatch.setattr(attention, "_stacked_weight", lambda *a: calls.append(1) or stacked(*a))
    torch.manual_seed(0)
    attn = GridSelfAttention(32, 2, head_dim=16, kernel_size=3, rope_pairs=4)
    x = torch.randn(2, 8, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = torch.stack(attn.project(x))
        reference = _separate(attn, x)
    assert calls == [1]
    torch.testing.assert_close(ours, reference.float(), rtol=2e-2, atol=2e-2)


def test_a_hooked_projection_runs_its_own_forward():
    torch.manual_seed(0)
    attn = GridSelfAttention(32, 2, head_dim=16, kernel_size=3, rope_pairs=4)
    x = torch.randn(1, 8, 8, 32)
    plain_v = attn.project(x)[2]
    attn.to_v.register_forward_hook(lambda module, args, out: 2 * out)
    torch.testing.assert_close(attn.project(x)[2], 2 * plain_v)

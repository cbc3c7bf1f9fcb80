"""Tests for diffusers_mdit.models.neighborhood_attention (CPU, a few seconds)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusers_mdit.models.neighborhood_attention import (
    ENV_VAR,
    neighborhood_attention,
    resolve_backend,
)

# The package re-exports the function under the module's name, so fetch the module itself.
na = importlib.import_module("diffusers_mdit.models.neighborhood_attention")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(b, h, w, heads, d, dtype=torch.float32, seed=0):
    return tuple(randn(b, h, w, heads, d, dtype=dtype, seed=seed + i) for i in range(3))


# ---- an independent brute force: Python loops for the window rule, dense masked attention ----


def window(i: int, size: int, kernel: int) -> range:
    """NATTEN's window along one axis, written out: shifted inwards at the borders."""
    kernel = min(kernel, size)
    start = min(max(i - kernel // 2, 0), size - kernel)
    return range(start, start + kernel)


def window_mask(height: int, width: int, kh: int, kw: int) -> torch.Tensor:
    mask = torch.zeros(height * width, height * width, dtype=torch.bool)
    for i in range(height):
        for j in range(width):
            for r in window(i, height, kh):
                for c in window(j, width, kw):
                    mask[i * width + j, r * width + c] = True
    return mask


def brute_force(q, k, v, kernel, scale=None):
    b, h, w, heads, d = q.shape
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    scale = d**-0.5 if scale is None else scale

    def flat(t):
        return t.reshape(b, h * w, heads, d).transpose(1, 2)

    scores = flat(q) @ flat(k).transpose(-1, -2) * scale
    scores = scores.masked_fill(~window_mask(h, w, kh, kw), float("-inf"))
    out = scores.softmax(-1) @ flat(v)
    return out.transpose(1, 2).reshape(b, h, w, heads, d)


def test_window_rule_hand_computed():
    # 5x1 grid, k=3: row 0 -> rows 0..2, row 2 -> 1..3, row 4 -> 2..4 (no zero padding).
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(window_mask(5, 1, 3, 1), expected)
    # Even kernel (NATTEN): k//2 neighbours before the query, k//2 - 1 after.
    assert [list(window(i, 6, 4)) for i in (0, 2, 3, 5)] == [
        [0, 1, 2, 3],
        [0, 1, 2, 3],
        [1, 2, 3, 4],
        [2, 3, 4, 5],
    ]


def window_probe(height, width, kernel, backend):
    """Which keys each query attends to: zero queries give uniform weights over the window,
    and one-hot values turn the output into the window's indicator / window size."""
    tokens = height * width
    q = torch.zeros(1, height, width, 1, tokens, dtype=torch.float64)
    v = torch.eye(tokens, dtype=torch.float64).reshape(1, height, width, 1, tokens)
    out = neighborhood_attention(q, q.clone(), v, kernel, backend=backend)
    return out.reshape(tokens, tokens) > 0


@pytest.mark.parametrize("path", ["reference", "dense", "tiled", "tiled_autograd", "rows"])
@pytest.mark.parametrize(
    "height, width, kernel", [(5, 1, 3), (6, 5, 4), (9, 7, (3, 5)), (11, 10, 7), (4, 3, 9)]
)
def test_backend_windows_match_rule(path, height, width, kernel, monkeypatch):
    backend = force_path(path, monkeypatch)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    got = window_probe(height, width, kernel, backend)
    assert torch.equal(got, window_mask(height, width, kh, kw))


# ---- "torch" backend vs reference ------------------------------------------------------------


def force_path(path: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Backend name for ``path``, patching the module so that the torch backend takes it."""
    if path == "reference":
        return "reference"
    rows = path.startswith("rows")
    if path in ("tiled", "tiled_small_chunks", "tiled_autograd") or rows:
        monkeypatch.setattr(na, "_DENSE_MAX_TOKENS", 0)
        monkeypatch.setattr(na, "_DENSE_MAX_MASK", 0)
    # "rows": whole-row halos wherever the fused path runs; the tiled paths: never.
    monkeypatch.setattr(na, "_ROW_SCORE_RATIO", float("inf") if rows else 0.0)
    if rows and path != "rows":  # "rows_backward_N": N interior query rows per backward halo
        monkeypatch.setattr(na, "_BACKWARD_ROWS", int(path.rsplit("_", 1)[1]))
    if path == "tiled_small_chunks":
        monkeypatch.setattr(na, "_CHUNK_BYTES", 1)  # one tile row of one image per chunk
    if path == "tiled_autograd":
        monkeypatch.setattr(na, "_HAS_CPU_FLASH", False)
    return "torch"


SHAPES = [
    # batch, height, width, heads, head_dim, kernel
    (2, 8, 8, 2, 16, 3),
    (2, 13, 21, 3, 8, 7),  # non-square, not divisible by the tile
    (3, 10, 9, 2, 8, 5),
    (1, 17, 6, 1, 8, (5, 3)),
    (2, 7, 7, 2, 8, 7),  # kernel == grid
    (2, 2, 3, 2, 4, 3),  # tiny grid, kernel clamped along one axis
    (1, 1, 9, 2, 4, 3),
    (2, 12, 16, 2, 8, (4, 6)),  # even kernels
]


@pytest.mark.parametrize(
    "path",
    [
        "dense",
        "tiled",
        "tiled_small_chunks",
        "tiled_autograd",
        "rows",
        "rows_backward_1",
        "rows_backward_3",
    ],
)
@pytest.mark.parametrize("b, h, w, heads, d, kernel", SHAPES)
def test_torch_matches_reference(path, b, h, w, heads, d, kernel, monkeypatch):
    backend = force_path(path, monkeypatch)
    inputs = qkv(b, h, w, heads, d)
    grad = randn(b, h, w, heads, d, seed=9)
    results = []
    for name in (backend, "reference"):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = neighborhood_attention(q, k, v, kernel, backend=name)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
        if name == "torch" and na.normalize_kernel_size(kernel, h, w) != (h, w):
            kind = type(out.grad_fn).__name__
            expected = {"tiled": "Tiled", "tiled_small_chunks": "Tiled"}
            expected.update(dict.fromkeys(("rows", "rows_backward_1", "rows_backward_3"), "Row"))
            assert (f"Fused{expected[path]}" in kind) if path in expected else "Fused" not in kind
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_batch_split_into_several_chunks(monkeypatch):
    force_path("tiled", monkeypatch)
    plan = na._plan(20, 18, 7, 7, 8, 8, torch.device("cpu"))
    row_bytes = na._tile_row_bytes(plan, 2 * 4, torch.float32)
    monkeypatch.setattr(na, "_CHUNK_BYTES", 2 * plan.tile_rows * row_bytes)  # two images
    assert [c.batches for _, c in na._chunks(plan, 5, 2 * 4, torch.float32)] == [2, 2, 1]
    inputs = qkv(5, 20, 18, 2, 4)
    results = []
    for name in ("torch", "reference"):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        out = neighborhood_attention(q, k, v, 7, backend=name)
        results.append((out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["tiled", "tiled_small_chunks", "rows", "rows_backward_3"])
def test_fused_tiled_gradcheck(path, monkeypatch):
    force_path(path, monkeypatch)
    q, k, v = (t.requires_grad_() for t in qkv(2, 9, 5, 1, 3, dtype=torch.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: neighborhood_attention(q, k, v, 3, backend="torch"), (q, k, v)
    )


def test_row_halos_on_views_with_storage_offsets(monkeypatch):
    # q, k, v as slices of one stacked buffer (contiguous, non-zero storage offsets), as the
    # row path addresses memory through as_strided.
    force_path("rows", monkeypatch)
    stacked = randn(3, 2, 11, 9, 2, 8).requires_grad_()
    grad = randn(2, 11, 9, 2, 8, seed=5)
    results = []
    for name in ("torch", "reference"):
        out = neighborhood_attention(*stacked.unbind(0), 5, backend=name)
        assert name == "reference" or type(out.grad_fn).__name__ == "_FusedRowAttentionBackward"
        results.append((out, *torch.autograd.grad(out, stacked, grad)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_row_halos_read_strided_layouts_and_copy_others(monkeypatch):
    # Read in place: q/k/v chunks of one fused projection (token stride 3 x channels) and a
    # heads-first tensor permuted to heads-last. Copied first: rows and columns swapped (a run
    # of grid rows is not one evenly strided run of tokens).
    force_path("rows", monkeypatch)
    fused = randn(2, 9, 10, 3 * 2 * 8).requires_grad_()
    heads_first = randn(2, 2, 9, 10, 8, seed=3).requires_grad_()
    swapped = randn(2, 10, 9, 2, 8, seed=4).requires_grad_()
    grad = randn(2, 9, 10, 2, 8, seed=5)

    def inputs():
        q, k, v = (t.unflatten(-1, (2, 8)) for t in fused.chunk(3, dim=-1))
        return q, k + heads_first.permute(0, 2, 3, 1, 4), v + swapped.transpose(1, 2)

    q = fused.chunk(3, dim=-1)[0].unflatten(-1, (2, 8))
    permuted = heads_first.permute(0, 2, 3, 1, 4)
    assert not q.is_contiguous() and na._row_addressable(q) is q
    assert not permuted.is_contiguous() and na._row_addressable(permuted) is permuted
    transposed = swapped.transpose(1, 2)
    assert na._row_addressable(transposed) is not transposed
    leaves = (fused, heads_first, swapped)
    results = []
    for name in ("torch", "reference"):
        out = neighborhood_attention(*inputs(), 5, backend=name)
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_row_halos_on_a_one_column_grid_with_an_odd_stride(monkeypatch):
    # A size-1 dimension may carry any stride and still count as contiguous: the row path must
    # not read tokens with it.
    force_path("rows", monkeypatch)
    inputs = [
        t.as_strided(t.shape, (t.stride(0), t.stride(1), 12345, t.stride(3), 1))
        for t in qkv(2, 20, 1, 2, 8)
    ]
    assert inputs[0].is_contiguous() and inputs[0].stride(2) == 12345
    got = neighborhood_attention(*inputs, 5, backend="torch")
    torch.testing.assert_close(got, neighborhood_attention(*inputs, 5, backend="reference"))


def test_row_groups_cover_every_query_row_once_with_its_window_rows():
    # 32 rows, k=7: rows 0-3 share the first window, 4 rows the last; 24 interior rows in halos
    # of 2 (or 3, or 5 with a remainder of 4 one-row halos).
    for rows_per_halo in (1, 2, 3, 5):
        groups = na._row_groups(32, 8, 7, 7, torch.float32, torch.device("cpu"), rows_per_halo)
        covered = []
        for g in groups:
            for h in range(g.halos):
                first = g.first_row + h * g.rows
                for r in range(first, first + g.rows):
                    start = min(max(r - 3, 0), 32 - 7)
                    halo = g.halo_start + h * g.rows
                    assert halo <= start and start + 7 <= halo + g.halo_rows
                    covered.append(r)
        assert covered == list(range(32)), rows_per_halo


def test_row_halos_chosen_for_narrow_grids_only():
    # MDiT-B's outer level (32x32, k=7) takes row halos; a 64x64 grid (448 keys per query
    # against the tiles' 196) keeps the tiles.
    outs = {}
    for size in (32, 64):
        q, k, v = (t.requires_grad_() for t in qkv(1, size, size, 1, 8))
        outs[size] = type(neighborhood_attention(q, k, v, 7, backend="torch").grad_fn).__name__
    assert outs == {32: "_FusedRowAttentionBackward", 64: "_FusedTiledAttentionBackward"}


# ---- reference vs brute force, global attention, scale ---------------------------------------


@pytest.mark.parametrize("b, h, w, heads, d, kernel", SHAPES)
def test_reference_matches_brute_force(b, h, w, heads, d, kernel):
    q, k, v = qkv(b, h, w, heads, d, dtype=torch.float64)
    out = neighborhood_attention(q, k, v, kernel, backend="reference")
    torch.testing.assert_close(out, brute_force(q, k, v, kernel))


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("kernel", [(5, 7), 9, (30, 7)])
def test_covering_kernel_is_global_attention(backend, kernel):
    q, k, v = qkv(2, 5, 7, 2, 8, dtype=torch.float64)
    out = neighborhood_attention(q, k, v, kernel, backend=backend)

    def flat(t):
        return t.reshape(2, 35, 2, 8).transpose(1, 2)

    probs = (flat(q) @ flat(k).transpose(-1, -2) * 8**-0.5).softmax(-1)
    expected = (probs @ flat(v)).transpose(1, 2).reshape(2, 5, 7, 2, 8)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_custom_scale(backend):
    q, k, v = qkv(1, 9, 9, 2, 8, dtype=torch.float64)
    out = neighborhood_attention(q, k, v, 5, scale=0.7, backend=backend)
    torch.testing.assert_close(out, brute_force(q, k, v, 5, scale=0.7))


def test_kernel_one_returns_values():
    q, k, v = qkv(1, 4, 5, 2, 8)
    for backend in ("torch", "reference"):
        torch.testing.assert_close(neighborhood_attention(q, k, v, 1, backend=backend), v)


def test_dtype_and_layout_preserved():
    q, k, v = qkv(2, 20, 20, 2, 16, dtype=torch.bfloat16)
    out = neighborhood_attention(q, k, v, 5)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    expected = neighborhood_attention(q.float(), k.float(), v.float(), 5, backend="reference")
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


def test_empty_batch():
    q, k, v = qkv(0, 6, 6, 2, 4)
    assert neighborhood_attention(q, k, v, 3).shape == (0, 6, 6, 2, 4)


# ---- NATTEN ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")  # NATTEN's CPU path warns about uncompiled Flex Attention
@pytest.mark.parametrize(
    "b, h, w, heads, d, kernel",
    [(1, 6, 7, 2, 8, 3), (2, 8, 5, 1, 8, (5, 3)), (1, 6, 6, 2, 8, 4), (1, 5, 9, 1, 8, (5, 7))],
)
def test_natten_forward_agrees(b, h, w, heads, d, kernel):
    pytest.importorskip("natten")
    q, k, v = qkv(b, h, w, heads, d)
    theirs = neighborhood_attention(q, k, v, kernel, backend="natten")
    ours = neighborhood_attention(q, k, v, kernel, backend="torch")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_forced_natten_rejects_unit_kernel():
    pytest.importorskip("natten")
    q, k, v = qkv(1, 1, 6, 1, 4)
    with pytest.raises(ValueError, match="kernel sizes >= 2"):
        neighborhood_attention(q, k, v, 3, backend="natten")


# ---- meta device and FLOPs -------------------------------------------------------------------


@pytest.mark.parametrize(
    "b, h, w, heads, d, kernel", [(2, 16, 16, 4, 32, 7), (1, 9, 20, 3, 8, (3, 5))]
)
def test_meta_reference_flops(b, h, w, heads, d, kernel):
    q, k, v = (torch.empty(b, h, w, heads, d, device="meta") for _ in range(3))
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    counter = FlopCounterMode(display=False)
    with counter:
        out = neighborhood_attention(q, k, v, kernel)  # auto on meta -> reference
    assert out.device.type == "meta" and out.shape == q.shape
    assert counter.get_total_flops() == 4 * b * heads * h * w * kh * kw * d


# ---- validation and backend selection --------------------------------------------------------


def test_bad_inputs():
    q, k, v = qkv(1, 4, 4, 2, 8)
    with pytest.raises(ValueError, match="5-D"):
        neighborhood_attention(q[0], k[0], v[0], 3)
    with pytest.raises(ValueError, match="same shape"):
        neighborhood_attention(q, k[:, :3], v, 3)
    with pytest.raises(ValueError, match="dtype"):
        neighborhood_attention(q, k.double(), v, 3)
    with pytest.raises(ValueError, match="floating point"):
        neighborhood_attention(*(t.long() for t in (q, k, v)), 3)
    for kernel in (0, (3, 3, 3), 2.5, (3, 0)):
        with pytest.raises(ValueError, match="kernel_size"):
            neighborhood_attention(q, k, v, kernel)
    with pytest.raises(ValueError, match="'natten', 'flex', 'torch', 'reference'"):
        neighborhood_attention(q, k, v, 3, backend="flash")


def test_auto_backend_selection(monkeypatch):
    assert resolve_backend("cpu") == "torch"
    assert resolve_backend(torch.device("cpu"), "auto") == "torch"
    assert resolve_backend("meta") == "reference"
    monkeypatch.setattr(na, "_natten_info", lambda: (True, True, ""))
    assert resolve_backend("cuda") == "natten"
    assert resolve_backend("cpu") == "torch"  # NATTEN on CPU has no backward
    monkeypatch.setattr(na, "_natten_info", lambda: (True, False, ""))
    assert resolve_backend("cuda") == "flex"  # no compiled library: no NATTEN build needed
    monkeypatch.setattr(na, "_HAS_FLEX", False)
    assert resolve_backend("cuda") == "torch"  # a PyTorch without flex_attention


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert resolve_backend("cpu") == "reference"
    assert resolve_backend("cpu", "torch") == "torch"  # an explicit argument wins
    monkeypatch.setenv(ENV_VAR, "auto")
    assert resolve_backend("cpu") == "torch"
    monkeypatch.setenv(ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=ENV_VAR):
        resolve_backend("cpu")


def test_unavailable_natten_raises(monkeypatch):
    monkeypatch.setattr(na, "_natten_info", lambda: (False, False, "ImportError: no natten"))
    with pytest.raises(ValueError, match="pip install --no-build-isolation natten"):
        resolve_backend("cpu", "natten")
    assert resolve_backend("cuda") == "flex"


# ---- the Flex Attention backend ---------------------------------------------------------------

FLEX_CASES = [
    (1, 8, 8, 2, 16, 3),
    (2, 7, 9, 2, 16, (3, 5)),
    (1, 16, 16, 1, 32, 7),
    (1, 6, 10, 2, 16, 4),
]


@pytest.mark.parametrize("b, h, w, heads, d, kernel", FLEX_CASES)
def test_flex_forward_matches_reference(b, h, w, heads, d, kernel):
    q, k, v = qkv(b, h, w, heads, d)
    expected = neighborhood_attention(q, k, v, kernel, backend="reference")
    actual = neighborhood_attention(q, k, v, kernel, backend="flex")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b, h, w, heads, d, kernel", FLEX_CASES)
def test_flex_mask_is_the_window_rule_and_gives_the_reference_gradients(b, h, w, heads, d, kernel):
    """flex_attention's backward (CUDA only) runs on the same block mask as its forward; on CPU
    the mask is checked against the brute-force rule and, as a dense mask, gives the reference
    backend's values and q/k/v gradients."""
    from torch.nn.attention.flex_attention import create_mask

    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    dense = create_mask(na.flex_mask_mod(h, w, kh, kw), None, None, h * w, h * w, device="cpu")
    assert torch.equal(dense[0, 0], window_mask(h, w, kh, kw))

    def via_mask(q, k, v):
        def flat(t):
            return t.reshape(b, h * w, heads, d).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            flat(q), flat(k), flat(v), attn_mask=dense
        )
        return out.transpose(1, 2).reshape(b, h, w, heads, d)

    inputs = [t.requires_grad_() for t in qkv(b, h, w, heads, d)]
    twins = [t.detach().clone().requires_grad_() for t in inputs]
    grad = randn(b, h, w, heads, d, seed=9)
    via_mask(*inputs).backward(grad)
    neighborhood_attention(*twins, kernel, backend="reference").backward(grad)
    for ours, reference in zip(inputs, twins, strict=True):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=1e-5, atol=1e-5)


def test_flex_refuses_training_on_cpu_with_a_clear_message():
    q, k, v = (t.requires_grad_() for t in qkv(1, 8, 8, 1, 16))
    with pytest.raises(ValueError, match="no backward on CPU.*backend='torch'"):
        neighborhood_attention(q, k, v, 3, backend="flex")
    with torch.no_grad():  # sampling is fine
        assert neighborhood_attention(q, k, v, 3, backend="flex").shape == q.shape

"""2-D neighborhood attention with NATTEN semantics, in pure PyTorch.

Semantics (``natten.na2d`` with stride 1, dilation 1, not causal)
-----------------------------------------------------------------
Tensors use NATTEN's "heads last" layout ``(B, H, W, heads, head_dim)``. A query at row ``i``
attends to the key rows ``[s, s + kh)`` with ``s = clamp(i - kh // 2, 0, H - kh)``, and likewise
along columns: near a border the window is shifted inwards, so every query sees exactly
``kh * kw`` keys and nothing is zero-padded. Even kernel sizes follow the same rule (the query
sits right of the window's centre: ``k // 2`` neighbours before it, ``k // 2 - 1`` after), which is
what NATTEN does (checked against ``natten.na2d``). A kernel larger than the grid along an axis
is clamped to the grid size, which makes attention global along that axis (NATTEN itself
rejects such kernels, so the clamped value is what it is given). A kernel equal to the grid on
both axes is plain global attention and is computed as such.

Backends (``backend=None`` or ``"auto"`` picks one, see :func:`resolve_backend`)
-------------------------------------------------------------------------------
``"natten"``
    ``natten.na2d``. The choice on CUDA when NATTEN's compiled library is present. On CPU,
    NATTEN 0.21 only has an unfused Flex Attention forward (no backward) and is slow; it is kept
    there for agreement tests.
``"flex"``
    ``torch.nn.attention.flex_attention`` with a 2-D neighborhood block mask (the window rule
    above as a ``mask_mod``; blocks entirely outside every window are skipped), compiled by
    ``torch.compile`` into one fused kernel on CUDA: the choice on CUDA when NATTEN's library is
    absent, so GPUs need no NATTEN build. On CPU PyTorch runs it unfused and forward only
    (``flex_attention`` has no CPU backward); the tests check its forward against the reference
    and its mask, which is what its backward uses too, through the dense path. It computes in
    the input dtype with float32 accumulation; the models pass float32 under autocast, as the
    paper says (attention math in float32).
``"torch"``
    Tiled attention built on ``scaled_dot_product_attention``; differentiable and the default
    on CPU. See below.
``"reference"``
    Gathers every query's ``kh * kw`` keys and values with index tensors and does two batched
    matmuls. Obviously correct, memory hungry, and used on the ``meta`` device: its matmuls have
    exactly the ideal shapes (``1 x D`` by ``D x kh*kw``, then ``1 x kh*kw`` by ``kh*kw x D`` per
    query), so ``FlopCounterMode`` counts ``4 * B * heads * H * W * kh * kw * D`` FLOPs.

The environment variable ``DIFFUSERS_MDIT_NA_BACKEND`` overrides the automatic choice.

Why tiles
---------
Training on CPU needs a backward pass that NATTEN does not have there, and gathering all
``kh * kw`` neighbours per query (the reference) moves ``kh * kw`` times the keys through
memory. Instead the query grid is cut into ``Th x Tw`` tiles. All queries of a tile look into one
halo of ``(Th + kh - 1) x (Tw + kw - 1)`` keys (border tiles shift their halo inwards, exactly
like the windows), so one dense attention per tile, masked by the outer product of the per-axis
window masks, is exact. All tiles go through one fused attention call (per chunk, below). With
``T ~ k + 1`` about 1/4 of the computed scores are used, yet on a 64 x 64 grid with k=7 this is
~9x faster than global attention, forward and forward+backward (benchmarks/bench_attention.py).
Grid sizes not divisible by the tile are padded with duplicated (clamped) query indices whose
outputs are dropped and whose gradients are zeroed. Tile sizes (per axis: 4 for k <= 5, else 8)
were picked from measurements on a 2-core CPU.

Narrow grids skip the tiles on CPU: a query row's window rows are ``kh`` whole grid rows,
which are contiguous in memory, so each query row attends to its ``kh * W`` halo keys through a
strided view, masked to its column windows (:class:`_FusedRowAttention`): no gathers and no
scatter-adds, for ``kh * W`` scores per query (224 on a 32x32 grid with k=7, against the 8x8
tiles' 196). It is taken where that is at most ``_ROW_SCORE_RATIO`` times the tiles' scores.
Its backward groups three interior query rows per halo (``_BACKWARD_ROWS``), as ATen's CPU flash
backward is slow on 32-query blocks.

Small grids (<= 256 tokens, or where the tiles would compute at least half of all token pairs,
e.g. 16 x 16 with k=7) skip the tiling: one attention over all tokens with an additive
``(H*W, H*W)`` window mask is faster there. Windows covering the grid need no mask at all.

On CPU the tiles run through ATen's fused flash-attention kernels directly, in a custom autograd
function, chunk by chunk (~6 MiB of gathered keys per chunk: whole images, or tile rows of one):
only ``q, k, v``, the output and the log-sum-exp are kept for backward, which re-gathers the
tiles. Besides saving memory (no saved halo copies), small chunks reuse freed allocator memory
instead of page-faulting fresh buffers; in profiles that was the largest cost of the plain
autograd version, which was 1.3-2.5x slower. If those private ATen ops are missing, and on other
devices, the same tiles go through the public ``scaled_dot_product_attention`` with autograd.

Computation happens in the input dtype; callers upcast beforehand if they want float32.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "neighborhood_attention",
    "normalize_kernel_size",
    "resolve_backend",
]

BACKENDS = ("natten", "flex", "torch", "reference")
ENV_VAR = "DIFFUSERS_MDIT_NA_BACKEND"
_NATTEN_INSTALL = "pip install --no-build-isolation natten"

# Gathered key-halo bytes per chunk on the fused CPU path: one whole 32x32 image at 6 heads x 64
# (MDiT-B's outer level). Fewer, larger chunks mean fewer kernel calls, each a synchronisation of
# the threads: measured side by side in MDiT-B's outer attention (2 threads, other jobs loading
# the machine), 6 MiB took 0.49-0.64x the time of 2 MiB (forward+backward at batch 8, forward at
# batch 2); 12 MiB took 0.92x of 6 MiB at batch 8 but 1.29x at batch 2. 16 MiB and more were
# 1.2-2.5x slower in earlier measurements, as buffers near or above glibc's 32 MiB mmap
# threshold are handed back to the OS when freed and page-faulted afresh on every use.
_CHUNK_BYTES = 6 << 20


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _natten_info() -> tuple[bool, bool, str]:
    """(importable, has compiled library, import error message)."""
    try:
        import natten
    except Exception as err:  # broken installs raise more than ImportError
        return False, False, f"{type(err).__name__}: {err}"
    return True, bool(getattr(natten, "HAS_LIBNATTEN", False)), ""


def _requested(backend: str | None) -> str | None:
    """The explicitly requested backend name (argument, else environment), None for auto."""
    if backend is None:
        backend = os.environ.get(ENV_VAR, "").strip()
    if not isinstance(backend, str):
        raise ValueError(f"backend must be a string or None, got {type(backend).__name__}.")
    return None if backend.lower() in ("", "auto") else backend


def resolve_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The concrete backend used for tensors on ``device``.

    ``backend=None`` reads ``DIFFUSERS_MDIT_NA_BACKEND`` and otherwise, like ``"auto"``,
    picks: ``"natten"`` for CUDA tensors when NATTEN and its compiled library are installed,
    else ``"flex"`` on CUDA, ``"reference"`` on the ``meta`` device, ``"torch"`` everywhere
    else.

    Raises:
        ValueError: unknown backend name, or a forced backend that is not available.
    """
    source = "backend" if backend is not None else f"environment variable {ENV_VAR}"
    backend = _requested(backend)
    if backend is None:
        device_type = torch.device(device).type
        if device_type == "meta":
            return "reference"
        importable, has_lib, _ = _natten_info()
        if device_type == "cuda" and importable and has_lib:
            return "natten"
        if device_type == "cuda" and _HAS_FLEX:
            return "flex"
        return "torch"
    name = backend.lower()
    if name not in BACKENDS:
        valid = ", ".join(repr(b) for b in ("auto", *BACKENDS))
        raise ValueError(f"Unknown neighborhood attention {source} {backend!r}; valid: {valid}.")
    if name == "flex" and not _HAS_FLEX:
        raise ValueError(
            f"Neighborhood attention backend 'flex' was requested ({source}) but this PyTorch "
            f"({torch.__version__}) has no torch.nn.attention.flex_attention; upgrade PyTorch "
            "(>= 2.5) or use backend='torch'."
        )
    if name == "natten":
        importable, _, error = _natten_info()
        if not importable:
            raise ValueError(
                f"Neighborhood attention backend 'natten' was requested ({source}) but NATTEN "
                f"cannot be imported ({error}). Install it with `{_NATTEN_INSTALL}`, or use "
                "backend='torch'."
            )
    return name


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def normalize_kernel_size(
    kernel_size: int | Sequence[int], height: int, width: int
) -> tuple[int, int]:
    """``(kh, kw)`` from an int or pair, each clamped to the grid size along its axis."""
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        pair = (kernel_size, kernel_size)
    elif (
        isinstance(kernel_size, Sequence)
        and len(kernel_size) == 2
        and all(isinstance(k, int) and not isinstance(k, bool) for k in kernel_size)
    ):
        pair = (kernel_size[0], kernel_size[1])
    else:
        raise ValueError(f"kernel_size must be an int or a pair of ints, got {kernel_size!r}.")
    if min(pair) < 1:
        raise ValueError(f"kernel_size must be >= 1 along both axes, got {kernel_size!r}.")
    return min(pair[0], height), min(pair[1], width)


def neighborhood_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int | Sequence[int],
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """2-D neighborhood attention, ``natten.na2d`` semantics (see the module docstring).

    Args:
        query, key, value: ``(B, H, W, heads, head_dim)`` tensors of one floating dtype, device
            and shape.
        kernel_size: Window size, an int or ``(kh, kw)``; clamped to ``(H, W)``.
        scale: Score scale, default ``head_dim ** -0.5``.
        backend: ``"natten"``, ``"flex"``, ``"torch"``, ``"reference"``, ``"auto"``, or
            ``None`` (the environment variable ``DIFFUSERS_MDIT_NA_BACKEND``, else ``"auto"``).

    Returns:
        ``(B, H, W, heads, head_dim)`` in the input dtype.
    """
    _check_inputs(query, key, value)
    _, height, width, _, head_dim = query.shape
    kh, kw = normalize_kernel_size(kernel_size, height, width)
    scale = head_dim**-0.5 if scale is None else float(scale)
    name = resolve_backend(query.device, backend)
    if query.numel() == 0:
        name = "reference"  # the fused kernels reject empty batches; the gathers do not

    if name == "natten":
        if min(kh, kw) >= 2:
            import natten

            return natten.na2d(query, key, value, (kh, kw), scale=scale)
        if (_requested(backend) or "").lower() == "natten":
            raise ValueError(
                f"NATTEN needs kernel sizes >= 2, got {(kh, kw)} after clamping to the "
                f"{height} x {width} grid; use backend='torch'."
            )
        name = "torch"  # auto-selected NATTEN cannot do 1-wide windows; same result, no error
    if name == "reference":
        return _reference(query, key, value, kh, kw, scale)
    if name == "flex":
        return _flex(query, key, value, kh, kw, scale)
    return _torch(query, key, value, kh, kw, scale)


def _check_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    names = ("query", "key", "value")
    tensors = (query, key, value)
    for name, t in zip(names, tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 5:
            raise ValueError(
                f"{name} must be 5-D (batch, height, width, heads, head_dim), got shape "
                f"{tuple(t.shape)}."
            )
    if not (query.shape == key.shape == value.shape):
        raise ValueError(
            "query, key and value must have the same shape, got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, "
            f"{value.dtype}."
        )
    if not query.dtype.is_floating_point:
        raise ValueError(f"Attention needs floating point inputs, got {query.dtype}.")
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"query, key and value must be on one device, got {query.device}, {key.device}, "
            f"{value.device}."
        )
    if min(query.shape[1:]) < 1:
        raise ValueError(f"Empty grid, heads or head_dim: shape {tuple(query.shape)}.")


# ----------------------------------------------------------------------------------------------
# Reference backend
# ----------------------------------------------------------------------------------------------


def _window_starts(size: int, kernel: int, device: torch.device) -> torch.Tensor:
    """First key index of each query's window along one axis (NATTEN's rule)."""
    return (torch.arange(size, device=device) - kernel // 2).clamp(0, size - kernel)


def _reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kh: int, kw: int, scale: float
) -> torch.Tensor:
    batch, height, width, heads, dim = query.shape
    device = query.device
    rows = _window_starts(height, kh, device)[:, None] + torch.arange(kh, device=device)
    cols = _window_starts(width, kw, device)[:, None] + torch.arange(kw, device=device)
    # (H*W, kh*kw) flat key index of every (query, window slot)
    neighbours = (rows[:, None, :, None] * width + cols[None, :, None, :]).reshape(
        height * width, kh * kw
    )

    def heads_first(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 3, 1, 2, 4).reshape(batch, heads, height * width, dim)

    q = heads_first(query).unsqueeze(-2)  # (B, heads, HW, 1, D)
    k = heads_first(key)[:, :, neighbours]  # (B, heads, HW, kh*kw, D)
    v = heads_first(value)[:, :, neighbours]
    probs = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)  # (B, heads, HW, 1, kk)
    out = (probs @ v).reshape(batch, heads, height, width, dim)
    return out.permute(0, 2, 3, 1, 4)


# ----------------------------------------------------------------------------------------------
# Flex Attention backend
# ----------------------------------------------------------------------------------------------

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _HAS_FLEX = True
except ImportError:  # PyTorch < 2.5
    _HAS_FLEX = False


def flex_mask_mod(height: int, width: int, kh: int, kw: int):
    """The window rule as a Flex Attention ``mask_mod`` over flat ``H*W`` token indices: key
    ``kv`` is visible to query ``q`` when it lies in ``q``'s clamped ``kh x kw`` window."""

    def mask_mod(batch, head, q, kv):
        q_row, q_col, kv_row, kv_col = q // width, q % width, kv // width, kv % width
        row0 = (q_row - kh // 2).clamp(0, height - kh)
        col0 = (q_col - kw // 2).clamp(0, width - kw)
        rows = (kv_row >= row0) & (kv_row < row0 + kh)
        return rows & (kv_col >= col0) & (kv_col < col0 + kw)

    return mask_mod


@functools.lru_cache(maxsize=32)
def flex_block_mask(height: int, width: int, kh: int, kw: int, device: str):
    """The block mask of :func:`flex_mask_mod` (shared by every batch and head)."""
    tokens = height * width
    mask_mod = flex_mask_mod(height, width, kh, kw)
    return create_block_mask(mask_mod, None, None, tokens, tokens, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def _flex(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kh: int, kw: int, scale: float
) -> torch.Tensor:
    batch, height, width, heads, dim = query.shape
    if (
        query.device.type == "cpu"
        and torch.is_grad_enabled()
        and (query.requires_grad or key.requires_grad or value.requires_grad)
    ):
        raise ValueError(
            "The 'flex' neighborhood attention backend has no backward on CPU (PyTorch's "
            "flex_attention is forward-only there); use backend='torch' to train on CPU."
        )

    def flat(t: torch.Tensor) -> torch.Tensor:
        if query.device.type == "cpu":  # CPU flex refuses tensors that require grad at all
            t = t.detach()
        return t.reshape(batch, height * width, heads, dim).transpose(1, 2)

    mask = flex_block_mask(height, width, kh, kw, str(query.device))
    attend = _compiled_flex_attention() if query.device.type == "cuda" else flex_attention
    out = attend(flat(query), flat(key), flat(value), block_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(batch, height, width, heads, dim)


# ----------------------------------------------------------------------------------------------
# Tiled "torch" backend
# ----------------------------------------------------------------------------------------------


def _tile_size(kernel: int) -> int:
    # Measured (2 CPU threads, 32x32 and 64x64 grids, k in 3..15): T=4 wins for k <= 5, T=8 for
    # larger k (k=15: T=8 and 16 tie). Non powers of two were slower, partly from padding.
    return 4 if kernel <= 5 else 8


@dataclass(frozen=True)
class _AxisTiles:
    tile: int  # queries per tile along the axis (clamped to the axis size)
    count: int  # number of tiles
    halo: int  # keys per tile along the axis
    query_index: torch.Tensor  # (count, tile) query positions, padding clamped to the last one
    key_index: torch.Tensor  # (count, halo) key positions of each tile's halo
    mask: torch.Tensor  # (count, tile, halo) whether a query's window contains a halo key


def _axis_tiles(size: int, kernel: int, tile: int, device: torch.device) -> _AxisTiles:
    tile = min(tile, size)
    count = math.ceil(size / tile)
    first = torch.arange(count, device=device) * tile
    query_index = (first[:, None] + torch.arange(tile, device=device)).clamp(max=size - 1)
    halo = min(tile + kernel - 1, size)
    # The union of the windows of queries t0..t0+T-1 starts at the first query's window start
    # (starts are monotone) and spans T + k - 1 keys; clamp it inwards like a window.
    halo_start = (first - kernel // 2).clamp(0, size - halo)
    key_index = halo_start[:, None] + torch.arange(halo, device=device)
    offset = _window_starts(size, kernel, device)[query_index] - halo_start[:, None]
    slot = torch.arange(halo, device=device)
    mask = (slot >= offset[..., None]) & (slot < offset[..., None] + kernel)
    return _AxisTiles(tile, count, halo, query_index, key_index, mask)


@dataclass(frozen=True, eq=False)  # hashed by identity: cached, and holds tensors
class _Plan:
    """Index tensors of one tiling; tiles are ordered row-major, slots row-major in a tile."""

    num_tiles: int
    tile_rows: int  # number of tile rows (chunks on the CPU path are ranges of tile rows)
    tiles_per_row: int
    queries: int  # L: query slots per tile
    keys: int  # N: halo keys per tile
    query_index: torch.Tensor  # (num_tiles * L,) flat token of each query slot
    key_index: torch.Tensor  # (num_tiles * N,) flat token of each halo key
    slot_of_token: torch.Tensor  # (H * W,) query slot holding each token
    mask: torch.Tensor  # (num_tiles, L, N) bool
    height: int
    width: int
    tile_h: int  # query rows per tile


@functools.lru_cache(maxsize=64)
def _plan(
    height: int, width: int, kh: int, kw: int, th: int, tw: int, device: torch.device
) -> _Plan:
    rows = _axis_tiles(height, kh, th, device)
    cols = _axis_tiles(width, kw, tw, device)

    def flat(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (r[:, None, :, None] * width + c[None, :, None, :]).reshape(-1)

    i = torch.arange(height, device=device)[:, None]
    j = torch.arange(width, device=device)[None, :]
    tile_of_token = (i // rows.tile) * cols.count + j // cols.tile
    slot_in_tile = (i % rows.tile) * cols.tile + j % cols.tile
    mask = rows.mask[:, None, :, None, :, None] & cols.mask[None, :, None, :, None, :]
    return _Plan(
        num_tiles=rows.count * cols.count,
        tile_rows=rows.count,
        tiles_per_row=cols.count,
        queries=rows.tile * cols.tile,
        keys=rows.halo * cols.halo,
        query_index=flat(rows.query_index, cols.query_index),
        key_index=flat(rows.key_index, cols.key_index),
        slot_of_token=(tile_of_token * rows.tile * cols.tile + slot_in_tile).reshape(-1),
        mask=mask.reshape(rows.count * cols.count, rows.tile * cols.tile, rows.halo * cols.halo),
        height=height,
        width=width,
        tile_h=rows.tile,
    )


# Small problems skip tiling: one attention over all tokens, masked to the windows, when the
# grid is tiny (fixed costs of gathering dominate) or the tiles would compute at least half of
# the dense scores anyway (e.g. 16x16 with k=7). Measured crossovers: 16x16 k=3 ties, 20x20 k=3
# tiles 1.7x faster, 20x20 k=7 dense 1.3x faster. Capped so the cached mask stays <= 16 MiB.
_DENSE_MAX_TOKENS = 256
_DENSE_MAX_MASK = 1 << 22


def _torch(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kh: int, kw: int, scale: float
) -> torch.Tensor:
    batch, height, width, heads, dim = query.shape
    tokens = height * width
    dense = (kh, kw) == (height, width)  # windows covering the grid: global attention, no mask
    if not dense:
        plan = _plan(height, width, kh, kw, _tile_size(kh), _tile_size(kw), query.device)
        tiled_scores = plan.num_tiles * plan.queries * plan.keys
        dense = tokens * tokens <= _DENSE_MAX_MASK and (
            tokens <= _DENSE_MAX_TOKENS or 2 * tiled_scores >= tokens * tokens
        )
    if dense:
        mask = None
        if (kh, kw) != (height, width):
            mask = _dense_mask(height, width, kh, kw, query.dtype, query.device)

        def flat(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, tokens, heads, dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            flat(query), flat(key), flat(value), attn_mask=mask, scale=scale
        )
        return out.transpose(1, 2).reshape(batch, height, width, heads, dim)

    if query.device.type == "cpu" and _HAS_CPU_FLASH:
        if kh * width * tokens <= _ROW_SCORE_RATIO * tiled_scores:
            return _FusedRowAttention.apply(query, key, value, (kh, kw), scale)
        return _FusedTiledAttention.apply(query, key, value, plan, scale)
    return _tiled_autograd(query, key, value, plan, scale)


@functools.lru_cache(maxsize=32)
def _dense_mask(
    height: int, width: int, kh: int, kw: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(H*W, H*W)`` additive mask: 0 where a key lies in the query's window, else -inf."""

    def axis(size: int, kernel: int) -> torch.Tensor:
        start = _window_starts(size, kernel, device)[:, None]
        pos = torch.arange(size, device=device)[None, :]
        return (pos >= start) & (pos < start + kernel)

    inside = axis(height, kh)[:, None, :, None] & axis(width, kw)[None, :, None, :]
    return _additive_mask(inside.reshape(height * width, height * width), dtype)


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # ATen's CPU flash kernel wants a float mask of the query dtype; a bool mask would be
    # converted on every call.
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


def _tiled_autograd(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: _Plan, scale: float
) -> torch.Tensor:
    """All tiles in one public SDPA call, differentiated by autograd (non-CPU devices)."""
    batch, height, width, heads, dim = query.shape
    tiles, n_q, n_k = plan.num_tiles, plan.queries, plan.keys
    channels = heads * dim

    def gather(t: torch.Tensor, index: torch.Tensor, per_tile: int) -> torch.Tensor:
        # (B, tiles*per_tile, heads, D) -> SDPA's (B*tiles, heads, per_tile, D) as a view
        t = t.reshape(batch, height * width, channels).index_select(1, index)
        return t.view(batch * tiles, per_tile, heads, dim).transpose(1, 2)

    mask = _additive_mask(plan.mask, query.dtype)
    mask = mask.unsqueeze(0).expand(batch, -1, -1, -1).reshape(batch * tiles, 1, n_q, n_k)
    out = F.scaled_dot_product_attention(
        gather(query, plan.query_index, n_q),
        gather(key, plan.key_index, n_k),
        gather(value, plan.key_index, n_k),
        attn_mask=mask,
        scale=scale,
    )
    out = out.transpose(1, 2).reshape(batch, tiles * n_q, channels)
    return out.index_select(1, plan.slot_of_token).view(batch, height, width, heads, dim)


# ---- fused CPU path --------------------------------------------------------------------------

try:
    _cpu_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    _cpu_flash_backward = (
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    )
    _HAS_CPU_FLASH = True
except (AttributeError, RuntimeError):  # private ops; fall back to public SDPA if they move
    _HAS_CPU_FLASH = False


@dataclass(frozen=True, eq=False)
class _Chunk:
    """Indices for ``batches`` whole batch elements, or tile rows ``[row0, row1)`` of one."""

    batches: int
    row0: int
    row1: int
    query_index: torch.Tensor  # flat token (within the chunk's batch elements) of each slot
    key_index: torch.Tensor
    token0: int  # the chunk's output tokens are [token0, token1) of each batch element...
    token1: int
    slot_of_token: torch.Tensor  # ...and come from these slots of the chunk's tiles
    padding: torch.Tensor | None  # slots holding duplicated queries (gradient zeroed)
    mask: torch.Tensor  # (batches * chunk tiles, 1, L, N) additive


@functools.lru_cache(maxsize=32)
def _chunk(plan: _Plan, batches: int, row0: int, row1: int, dtype: torch.dtype) -> _Chunk:
    tiles = (row1 - row0) * plan.tiles_per_row
    tokens = plan.width * plan.tile_h
    q0, k0 = row0 * plan.tiles_per_row * plan.queries, row0 * plan.tiles_per_row * plan.keys
    query_index = plan.query_index[q0 : q0 + tiles * plan.queries]
    key_index = plan.key_index[k0 : k0 + tiles * plan.keys]
    hw, slots = plan.height * plan.width, tiles * plan.queries
    token0, token1 = row0 * tokens, min(row1 * tokens, hw)
    slot_of_token = plan.slot_of_token[token0:token1] - q0
    offsets = torch.arange(batches, device=query_index.device)[:, None]
    used = torch.zeros(slots, dtype=torch.bool, device=query_index.device)
    used[slot_of_token] = True
    padding = (~used).nonzero().flatten()
    mask = _additive_mask(plan.mask[row0 * plan.tiles_per_row :][:tiles], dtype)
    return _Chunk(
        batches=batches,
        row0=row0,
        row1=row1,
        query_index=(offsets * hw + query_index).reshape(-1),
        key_index=(offsets * hw + key_index).reshape(-1),
        token0=token0,
        token1=token1,
        slot_of_token=(offsets * slots + slot_of_token).reshape(-1),
        padding=padding if padding.numel() else None,
        mask=mask.unsqueeze(0).expand(batches, -1, -1, -1).reshape(-1, 1, *mask.shape[1:]),
    )


def _tile_row_bytes(plan: _Plan, channels: int, dtype: torch.dtype) -> int:
    """Bytes one tile row of one image takes in a chunk: gathered keys, plus the chunk's cached
    mask (L values per key) and key indices, which dominate when channels are few."""
    return plan.tiles_per_row * plan.keys * (max(channels, plan.queries) * dtype.itemsize + 8)


def _chunks(plan: _Plan, batch: int, channels: int, dtype: torch.dtype) -> list[tuple[int, _Chunk]]:
    """(first batch element, chunk) pairs covering the batch, ~_CHUNK_BYTES each."""
    row_bytes = _tile_row_bytes(plan, channels, dtype)
    rows = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    if rows >= plan.tile_rows:
        per_chunk = min(batch, rows // plan.tile_rows)
        out = []
        for b0 in range(0, batch, per_chunk):
            n = min(per_chunk, batch - b0)
            out.append((b0, _chunk(plan, n, 0, plan.tile_rows, dtype)))
        return out
    spans = [(r, min(r + rows, plan.tile_rows)) for r in range(0, plan.tile_rows, rows)]
    return [(b, _chunk(plan, 1, r0, r1, dtype)) for b in range(batch) for r0, r1 in spans]


def _rows(t: torch.Tensor, b0: int, c: _Chunk) -> torch.Tensor:
    """The chunk's batch elements of a ``(B, H, W, heads, D)`` tensor as ``(tokens, channels)``."""
    _, height, width, heads, dim = t.shape
    return t[b0 : b0 + c.batches].view(c.batches * height * width, heads * dim)


def _tiles(t: torch.Tensor, per_tile: int, heads: int) -> torch.Tensor:
    """``(tiles * per_tile, heads * D)`` rows as SDPA's ``(tiles, heads, per_tile, D)`` view."""
    return t.view(-1, per_tile, heads, t.shape[-1] // heads).transpose(1, 2)


def _untile_into(target: torch.Tensor, b0: int, c: _Chunk, tiled: torch.Tensor) -> None:
    """Writes the chunk's real query slots of ``tiled`` to their tokens in ``target``."""
    hw = target.shape[1] * target.shape[2]
    rows = target[b0 : b0 + c.batches].view(c.batches, hw, -1)[:, c.token0 : c.token1]
    flat = tiled.transpose(1, 2).reshape(-1, rows.shape[-1])
    torch.index_select(flat, 0, c.slot_of_token, out=rows.view(-1, rows.shape[-1]))


class _FusedTiledAttention(torch.autograd.Function):
    """Tiled attention through ATen's CPU flash kernels, chunked; backward re-gathers tiles."""

    @staticmethod
    def forward(ctx, query, key, value, plan, scale):
        batch, _, _, heads, dim = query.shape
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
        chunks = _chunks(plan, batch, heads * dim, query.dtype)
        out = torch.empty_like(query)
        lse = []
        for b0, c in chunks:
            out_t, lse_t = _cpu_flash_forward(
                _tiles(_rows(query, b0, c).index_select(0, c.query_index), plan.queries, heads),
                _tiles(_rows(key, b0, c).index_select(0, c.key_index), plan.keys, heads),
                _tiles(_rows(value, b0, c).index_select(0, c.key_index), plan.keys, heads),
                0.0,
                False,
                attn_mask=c.mask,
                scale=scale,
            )
            _untile_into(out, b0, c, out_t)
            lse.append(lse_t)
        ctx.save_for_backward(query, key, value, out, *lse)
        ctx.plan, ctx.scale, ctx.chunks = plan, scale, chunks
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, *lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        heads = query.shape[3]
        grad_out = grad_out.contiguous()
        grad_q = torch.empty_like(query)
        grad_k = torch.zeros_like(key)
        grad_v = torch.zeros_like(value)
        for (b0, c), lse_t in zip(ctx.chunks, lse, strict=True):
            d_out = _rows(grad_out, b0, c).index_select(0, c.query_index)
            if c.padding is not None:
                # Duplicated queries' outputs were dropped: they must not feed gradients.
                d_out.view(c.batches, -1, d_out.shape[-1]).index_fill_(1, c.padding, 0)
            d_q, d_k, d_v = _cpu_flash_backward(
                _tiles(d_out, plan.queries, heads),
                _tiles(_rows(query, b0, c).index_select(0, c.query_index), plan.queries, heads),
                _tiles(_rows(key, b0, c).index_select(0, c.key_index), plan.keys, heads),
                _tiles(_rows(value, b0, c).index_select(0, c.key_index), plan.keys, heads),
                _tiles(_rows(out, b0, c).index_select(0, c.query_index), plan.queries, heads),
                lse_t,
                0.0,
                False,
                attn_mask=c.mask,
                scale=scale,
            )
            _untile_into(grad_q, b0, c, d_q)
            channels = d_k.shape[1] * d_k.shape[3]
            # Halos overlap: keys get the sum over every tile whose halo holds them.
            _rows(grad_k, b0, c).index_add_(
                0, c.key_index, d_k.transpose(1, 2).reshape(-1, channels)
            )
            _rows(grad_v, b0, c).index_add_(
                0, c.key_index, d_v.transpose(1, 2).reshape(-1, channels)
            )
        return grad_q, grad_k, grad_v, None, None


# ---- row halos: the fused CPU path without gathers ------------------------------------------

# Row halos instead of tiles while they compute at most this many times the tiles' scores (a
# 32x32 grid with k=7: 224 keys per query against 196; 64x64: 448 against 196, tiles). Measured
# on 2 CPU threads, whole MDiT-B, rows / tiles interleaved: training at batch 8 0.91x and 0.95x
# the time (half the page faults), at batch 2 and forward within noise (0.93-1.08x); in the
# model at batch 2 the outer attention layer's forward took 27.9 vs 29.7 ms.
_ROW_SCORE_RATIO = 1.25


# Query rows per halo in the backward pass: ATen's CPU flash backward is slow on short query
# blocks. Measured on 2 threads (Xeon, AVX-512), MDiT-B's outer shape (6 heads x 64, 32x32,
# k=7), kernel calls of one image: one row per halo (32 queries, 224 keys) took 15.5 ms in
# backward, two rows (64 queries, 256 keys) 8.9 ms, three 8.2 ms, four 9.0 ms, while the forward
# took 3.0, 3.4, 3.6 and 3.6 ms. The whole layer forward+backward at batch 8 (interleaved, 10
# repeats): 139.9, 124.2, 117.7 ms for 1, 2, 3 rows; at batch 2: 40.7, 38.1, 36.7 ms. So the
# forward keeps one row per halo (the fewest scores, and the only pass inference runs) and the
# backward takes three.
_BACKWARD_ROWS = 3


@dataclass(frozen=True, eq=False)
class _RowGroup:
    """Query rows ``first_row + g * rows ... + rows - 1`` attend to key rows ``halo_start + g *
    rows ... + halo_rows - 1`` for ``g < halos``: every query row's window rows lie in its
    halo's rows."""

    first_row: int
    rows: int  # query rows per halo (and rows between consecutive halos)
    halo_start: int
    halos: int
    halo_rows: int
    mask: torch.Tensor  # (1, 1, rows * W, halo_rows * W) additive: each query's window


@functools.lru_cache(maxsize=32)
def _row_groups(
    height: int,
    width: int,
    kh: int,
    kw: int,
    dtype: torch.dtype,
    device: torch.device,
    rows_per_halo: int = 1,
) -> tuple[_RowGroup, ...]:
    """Query rows grouped by window start row: the rows sharing the first start (top border),
    the interior rows (starts one apart, ``rows_per_halo`` of them per halo, the remainder one
    per halo), the rows sharing the last start (bottom)."""
    starts = _window_starts(height, kh, torch.device("cpu")).tolist()
    top = starts.count(0)
    last = height - kh
    bottom = starts.count(last) if last > 0 else 0
    interior = height - top - bottom
    spans = [(0, top, 1)]  # (first row, query rows per halo, halos)
    full = interior // rows_per_halo
    if full:
        spans.append((top, rows_per_halo, full))
    if interior - full * rows_per_halo:
        spans.append((top + full * rows_per_halo, 1, interior - full * rows_per_halo))
    if bottom:
        spans.append((height - bottom, bottom, 1))
    start = _window_starts(width, kw, device)[:, None]
    col = torch.arange(width, device=device)[None, :]
    columns = (col >= start) & (col < start + kw)  # (W, W): key column in query column's window
    groups = []
    for r0, rows, halos in spans:
        row_starts = starts[r0 : r0 + rows]
        halo_start, halo_rows = row_starts[0], row_starts[-1] + kh - row_starts[0]
        offset = torch.tensor(row_starts, device=device)[:, None] - halo_start
        slot = torch.arange(halo_rows, device=device)[None, :]
        in_rows = (slot >= offset) & (slot < offset + kh)  # (rows, halo_rows)
        inside = in_rows[:, None, :, None] & columns[None, :, None, :]
        mask = _additive_mask(inside.reshape(rows * width, halo_rows * width), dtype)
        groups.append(_RowGroup(r0, rows, halo_start, halos, halo_rows, mask[None, None]))
    return tuple(groups)


def _halo_view(
    t: torch.Tensor, b: int, row0: int, halos: int, rows: int, step: int = 1
) -> torch.Tensor:
    """``halos`` windows of ``rows`` whole grid rows of image ``b`` of a ``(B, H, W, heads, D)``
    tensor (see :func:`_row_addressable`), ``step`` rows apart, as SDPA's ``(halos, heads, rows
    * W, D)``: a strided view, so no gather."""
    _, _, width, heads, dim = t.shape
    stride = t.stride()
    offset = t.storage_offset() + b * stride[0] + row0 * stride[1]
    return t.as_strided(
        (halos, heads, rows * width, dim), (step * stride[1], stride[3], stride[2], 1), offset
    )


def _lse_view(lse: torch.Tensor, b: int, g: _RowGroup) -> torch.Tensor:
    """Group ``g``'s queries of image ``b`` in a ``(B, heads, H, W)`` log-sum-exp tensor, as
    the flash kernels' ``(halos, heads, rows * W)``."""
    _, heads, height, width = lse.shape
    return lse[b].as_strided(
        (g.halos, heads, g.rows * width),
        (g.rows * width, height * width, 1),
        lse[b].storage_offset() + g.first_row * width,
    )


def _row_addressable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when a run of whole grid rows is one evenly strided run of tokens (the
    channels-last layout, and slices of it such as q/k/v chunks of a fused projection), else a
    copy with standard strides (``contiguous()`` would keep the arbitrary stride PyTorch allows
    on a size-1 dimension, which :func:`_halo_view` reads)."""
    stride = t.stride()
    if stride[-1] == 1 and stride[1] == t.shape[2] * stride[2]:
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _FusedRowAttention(torch.autograd.Function):
    """Neighborhood attention through ATen's CPU flash kernels with whole-row halos.

    A query row's window rows are ``kh`` consecutive grid rows, and those rows are contiguous in
    the ``(B, H, W, heads, D)`` layout, so each query row attends to its ``kh * W`` halo keys
    through a strided view, masked to its column windows: no gathers of queries, keys or values
    (the tiles' largest cost besides the kernel), no scatter-add of key gradients (overlapping
    halos are summed by shifted adds), no chunking. It computes ``kh * W`` scores per query
    against the tiles' ``(Th + kh - 1) * (Tw + kw - 1) / (Th * Tw)``, so :func:`_torch` takes it
    only where that is at most ``_ROW_SCORE_RATIO`` times the tiles' scores (narrow grids such
    as MDiT-B's 32x32 outer level: 224 against 196 keys per query). The backward groups
    ``_BACKWARD_ROWS`` interior query rows per halo (see there); the log-sum-exp of every query
    is the same under either grouping, as keys outside a query's window are masked out.
    """

    @staticmethod
    def forward(ctx, query, key, value, kernel, scale):
        query, key, value = (_row_addressable(t) for t in (query, key, value))
        batch, height, width, heads, _ = query.shape
        groups = _row_groups(height, width, *kernel, query.dtype, query.device)
        out = query.new_empty(query.shape)
        lse = None
        for b in range(batch):
            for g in groups:
                out_g, lse_g = _cpu_flash_forward(
                    _halo_view(query, b, g.first_row, g.halos, g.rows, g.rows),
                    _halo_view(key, b, g.halo_start, g.halos, g.halo_rows, g.rows),
                    _halo_view(value, b, g.halo_start, g.halos, g.halo_rows, g.rows),
                    0.0,
                    False,
                    attn_mask=g.mask,
                    scale=scale,
                )
                _halo_view(out, b, g.first_row, g.halos, g.rows, g.rows).copy_(out_g)
                if lse is None:
                    lse = lse_g.new_empty(batch, heads, height, width)
                _lse_view(lse, b, g).copy_(lse_g)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale, ctx.kernel = scale, kernel
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        _, height, width, _, _ = query.shape
        kh, kw = ctx.kernel
        groups = _row_groups(
            height, width, kh, kw, query.dtype, query.device, rows_per_halo=_BACKWARD_ROWS
        )
        grad_out = _row_addressable(grad_out)
        grad_q = query.new_empty(query.shape)
        grad_k = key.new_zeros(key.shape)
        grad_v = value.new_zeros(value.shape)
        for b in range(query.shape[0]):
            for g in groups:
                d_q, d_k, d_v = _cpu_flash_backward(
                    _halo_view(grad_out, b, g.first_row, g.halos, g.rows, g.rows),
                    _halo_view(query, b, g.first_row, g.halos, g.rows, g.rows),
                    _halo_view(key, b, g.halo_start, g.halos, g.halo_rows, g.rows),
                    _halo_view(value, b, g.halo_start, g.halos, g.halo_rows, g.rows),
                    _halo_view(out, b, g.first_row, g.halos, g.rows, g.rows),
                    _lse_view(lse, b, g).contiguous(),
                    0.0,
                    False,
                    attn_mask=g.mask,
                    scale=ctx.scale,
                )
                _halo_view(grad_q, b, g.first_row, g.halos, g.rows, g.rows).copy_(d_q)
                # Halo h's row r is grid row halo_start + h * rows + r: shifted, strided adds.
                d_k = d_k.unflatten(2, (g.halo_rows, -1))
                d_v = d_v.unflatten(2, (g.halo_rows, -1))
                for r in range(g.halo_rows):
                    row = g.halo_start + r
                    _halo_view(grad_k, b, row, g.halos, 1, g.rows).add_(d_k[:, :, r])
                    _halo_view(grad_v, b, row, g.halos, 1, g.rows).add_(d_v[:, :, r])
        return grad_q, grad_k, grad_v, None, None

"""Triton kernels of the masked LoRA linear (formulas: kernels/reference.py).

Four kernels, each accumulating in fp32 and reading bf16 / fp16 / fp32 inputs:

    forward  (N/BM x out/(BN*G) programs)  y tile = x W^T + s (x_d A^T) B^T; every x tile loaded in
             the K loop feeds both the base product and the rank-r product x_d A^T, so x is read
             once per column block and no (N, out) LoRA intermediate exists. Each program does G
             column blocks and forms x_d A^T in the first one only. Column group 0 also stores
             xa = x_d A^T (N, r) for backward.
    dx       (N/BM x in/(BN*G) programs)   dX tile = dY W + s ((dY B) A) * keep / (1 - p); the dY
             tile of the K loop feeds both dY W and dY B (formed in the first of G column blocks).
             Column group 0 stores dyb = dY B (N, r).
    grad_A   (in/BN x S programs)      dA = s dyb^T x_d over a 1/S slice of the tokens, masked.
    grad_B   (out/BM x S programs)     dB = s dY^T xa over a 1/S slice of the tokens, masked.

grad_A / grad_B split the token reduction over S programs (so a GPU has enough of them) and write
S masked fp32 partials that torch sums: deterministic, no atomics. Masked-out entries are written as
0.0 in every partial, so the sum is exactly 0.0.

Rank r < 16: tl.dot needs every block dim >= 16, so the rank axis is padded to R_PAD =
max(16, next_pow2(r)) with masked loads (zeros beyond r).

Dropout: in-kernel. keep = Philox(seed, row * in + col) >= p, regenerated bit-identically by the
forward, dx and grad_A kernels from one 31-bit seed, so neither the mask nor x_d is stored and x is
read once per kernel. Offsets are int32: x must have fewer than 2**31 elements (checked).

Interpreter (TRITON_INTERPRET=1, the CPU tests): the interpreter cannot compute on bfloat16 (it
multiplies the uint16 bit patterns, triton-lang/triton#11584), so there every loaded tile is widened
to fp32 (exact) and the intermediates xa, dyb, x_d are rounded to the input dtype explicitly, as the
GPU path does by storing them in that dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = bool(triton.knobs.runtime.interpret)


# (tile sizes..., num_warps, num_stages) candidates for the autotuner on a GPU. GROUP_N trades the
# rank-r product recomputed per column block (R_PAD / (BLOCK_N * GROUP_N) of the base MMA work)
# against parallelism (GROUP_N times fewer programs).
_MATMUL_TILES = [
    (128, 128, 32, 1, 8, 3),
    (128, 128, 32, 2, 8, 3),
    (128, 128, 32, 4, 8, 3),
    (128, 256, 32, 1, 8, 3),
    (128, 256, 32, 2, 8, 3),
    (64, 128, 32, 2, 4, 4),
    (128, 64, 32, 4, 4, 4),
    (64, 64, 64, 4, 4, 3),
]
_REDUCTION_TILES = [(64, 64, 4, 3), (128, 32, 4, 3), (64, 128, 4, 3), (32, 64, 2, 4), (128, 64, 8, 3)]


def _configs(names: tuple[str, ...], tiles: list[tuple[int, ...]]) -> list[triton.Config]:
    """Autotuner candidates; one 16-wide tile under the interpreter (fast, and every edge is hit)."""
    if INTERPRET:  # GROUP_N 2: the grouped column loop and a fully out-of-range block are exercised
        return [triton.Config({name: 2 if name == "GROUP_N" else 16 for name in names}, num_warps=1, num_stages=1)]
    return [triton.Config(dict(zip(names, tile)), num_warps=tile[-2], num_stages=tile[-1]) for tile in tiles]


_MATMUL_CONFIGS = _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_N"), _MATMUL_TILES)


@triton.jit
def _widen(t, COMPUTE_F32: tl.constexpr):
    """Under the interpreter compute in fp32 (bf16 arithmetic is unsupported there); no-op on a GPU."""
    if COMPUTE_F32:
        return t.to(tl.float32)
    return t


@triton.jit
def _dropout(x, rows, cols, n_cols, p, seed, DTYPE: tl.constexpr):
    """x_d for a tile: Philox keep mask at offsets row * n_cols + col, kept values scaled by 1/(1-p)."""
    keep = tl.rand(seed, rows[:, None] * n_cols + cols[None, :]) >= p
    return tl.where(keep, x / (1.0 - p), 0.0).to(DTYPE)


@triton.autotune(configs=_MATMUL_CONFIGS, key=["IN", "OUT", "R_PAD"])
@triton.jit
def _forward_kernel(
    x_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    y_ptr,
    xa_ptr,
    N,
    IN,
    OUT,
    R,
    scale,
    p,
    seed,
    R_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    COMPUTE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """GROUP_N column blocks per program; x_d A^T is formed in the first one's K loop and reused."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for group in tl.static_range(GROUP_N):
        cols = (tl.program_id(1) * GROUP_N + group) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rows[:, None] * IN + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < IN), other=0.0
            )
            w_t = tl.load(
                w_ptr + cols[None, :] * IN + ks[:, None],  # W^T tile (BLOCK_K, BLOCK_N)
                mask=(cols[None, :] < OUT) & (ks[:, None] < IN),
                other=0.0,
            )
            x = _widen(x, COMPUTE_F32)
            acc = tl.dot(x, _widen(w_t, COMPUTE_F32), acc, input_precision=PRECISION)
            if group == 0:  # compile-time: the same x tile feeds the rank-r product
                a_t = tl.load(
                    a_ptr + ranks[None, :] * IN + ks[:, None],  # A^T tile (BLOCK_K, R_PAD)
                    mask=(ranks[None, :] < R) & (ks[:, None] < IN),
                    other=0.0,
                )
                if DROPOUT:
                    x = _widen(_dropout(x, rows, ks, IN, p, seed, DTYPE), COMPUTE_F32)
                xa = tl.dot(x, _widen(a_t, COMPUTE_F32), xa, input_precision=PRECISION)
        b_t = tl.load(
            b_ptr + cols[None, :] * R + ranks[:, None],  # B^T tile (R_PAD, BLOCK_N)
            mask=(cols[None, :] < OUT) & (ranks[:, None] < R),
            other=0.0,
        )
        xa_low = xa.to(DTYPE)  # rounded like the stored xa, so forward and backward see the same xa
        lora = tl.dot(_widen(xa_low, COMPUTE_F32), _widen(b_t, COMPUTE_F32), input_precision=PRECISION)
        acc += scale * lora
        tl.store(
            y_ptr + rows[:, None] * OUT + cols[None, :], acc.to(DTYPE), mask=(rows[:, None] < N) & (cols[None, :] < OUT)
        )
    if tl.program_id(1) == 0:
        tl.store(
            xa_ptr + rows[:, None] * R + ranks[None, :], xa.to(DTYPE), mask=(rows[:, None] < N) & (ranks[None, :] < R)
        )


@triton.autotune(configs=_MATMUL_CONFIGS, key=["IN", "OUT", "R_PAD"])
@triton.jit
def _dx_kernel(
    dy_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    dx_ptr,
    dyb_ptr,
    N,
    IN,
    OUT,
    R,
    scale,
    p,
    seed,
    R_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    STORE_DYB: tl.constexpr,
    PRECISION: tl.constexpr,
    COMPUTE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """GROUP_N column blocks (of in_features) per program; dY B is formed in the first one's K loop."""
    DTYPE: tl.constexpr = dy_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    dyb = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for group in tl.static_range(GROUP_N):
        cols = (tl.program_id(1) * GROUP_N + group) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, OUT, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            dy = tl.load(
                dy_ptr + rows[:, None] * OUT + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < OUT), other=0.0
            )
            w = tl.load(
                w_ptr + ks[:, None] * IN + cols[None, :], mask=(ks[:, None] < OUT) & (cols[None, :] < IN), other=0.0
            )
            dy = _widen(dy, COMPUTE_F32)
            acc = tl.dot(dy, _widen(w, COMPUTE_F32), acc, input_precision=PRECISION)
            if group == 0:  # compile-time: the same dY tile feeds dY B
                b = tl.load(
                    b_ptr + ks[:, None] * R + ranks[None, :], mask=(ks[:, None] < OUT) & (ranks[None, :] < R), other=0.0
                )
                dyb = tl.dot(dy, _widen(b, COMPUTE_F32), dyb, input_precision=PRECISION)
        a = tl.load(
            a_ptr + ranks[:, None] * IN + cols[None, :], mask=(ranks[:, None] < R) & (cols[None, :] < IN), other=0.0
        )
        dyb_low = dyb.to(DTYPE)
        lora = tl.dot(_widen(dyb_low, COMPUTE_F32), _widen(a, COMPUTE_F32), input_precision=PRECISION)
        if DROPOUT:
            keep = tl.rand(seed, rows[:, None] * IN + cols[None, :]) >= p
            lora = tl.where(keep, lora / (1.0 - p), 0.0)
        acc += scale * lora
        tl.store(
            dx_ptr + rows[:, None] * IN + cols[None, :], acc.to(DTYPE), mask=(rows[:, None] < N) & (cols[None, :] < IN)
        )
    if STORE_DYB:
        if tl.program_id(1) == 0:
            tl.store(
                dyb_ptr + rows[:, None] * R + ranks[None, :],
                dyb.to(DTYPE),
                mask=(rows[:, None] < N) & (ranks[None, :] < R),
            )


@triton.autotune(configs=_configs(("BLOCK_N", "BLOCK_T"), _REDUCTION_TILES), key=["IN", "R_PAD"])
@triton.jit
def _grad_A_kernel(
    dyb_ptr,
    x_ptr,
    mask_ptr,
    out_ptr,
    N,
    IN,
    R,
    scale,
    p,
    seed,
    R_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    COMPUTE_F32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Partial s = program_id(1): out[s] = scale * dyb[slice]^T x_d[slice], zero where ~mask."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # over in_features
    ranks = tl.arange(0, R_PAD)
    chunk = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BLOCK_T) * BLOCK_T
    start = tl.program_id(1) * chunk
    acc = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    for t0 in range(start, tl.minimum(start + chunk, N), BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        dyb_t = tl.load(
            dyb_ptr + ts[None, :] * R + ranks[:, None],  # (R_PAD, BLOCK_T)
            mask=(ts[None, :] < N) & (ranks[:, None] < R),
            other=0.0,
        )
        x = tl.load(x_ptr + ts[:, None] * IN + cols[None, :], mask=(ts[:, None] < N) & (cols[None, :] < IN), other=0.0)
        if DROPOUT:
            x = _dropout(_widen(x, COMPUTE_F32), ts, cols, IN, p, seed, DTYPE)
        acc = tl.dot(_widen(dyb_t, COMPUTE_F32), _widen(x, COMPUTE_F32), acc, input_precision=PRECISION)
    acc = acc * scale
    in_bounds = (ranks[:, None] < R) & (cols[None, :] < IN)
    if HAS_MASK:
        trainable = tl.load(mask_ptr + ranks[:, None] * IN + cols[None, :], mask=in_bounds, other=0)
        acc = tl.where(trainable != 0, acc, 0.0)
    tl.store(out_ptr + tl.program_id(1) * R * IN + ranks[:, None] * IN + cols[None, :], acc, mask=in_bounds)


@triton.autotune(configs=_configs(("BLOCK_M", "BLOCK_T"), _REDUCTION_TILES), key=["OUT", "R_PAD"])
@triton.jit
def _grad_B_kernel(
    dy_ptr,
    xa_ptr,
    mask_ptr,
    out_ptr,
    N,
    OUT,
    R,
    scale,
    R_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    COMPUTE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Partial s = program_id(1): out[s] = scale * dY[slice]^T xa[slice], zero where ~mask."""
    outs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    chunk = tl.cdiv(tl.cdiv(N, tl.num_programs(1)), BLOCK_T) * BLOCK_T
    start = tl.program_id(1) * chunk
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for t0 in range(start, tl.minimum(start + chunk, N), BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        dy_t = tl.load(
            dy_ptr + ts[None, :] * OUT + outs[:, None],  # dY^T tile (BLOCK_M, BLOCK_T)
            mask=(ts[None, :] < N) & (outs[:, None] < OUT),
            other=0.0,
        )
        xa = tl.load(
            xa_ptr + ts[:, None] * R + ranks[None, :], mask=(ts[:, None] < N) & (ranks[None, :] < R), other=0.0
        )
        acc = tl.dot(_widen(dy_t, COMPUTE_F32), _widen(xa, COMPUTE_F32), acc, input_precision=PRECISION)
    acc = acc * scale
    in_bounds = (outs[:, None] < OUT) & (ranks[None, :] < R)
    if HAS_MASK:
        trainable = tl.load(mask_ptr + outs[:, None] * R + ranks[None, :], mask=in_bounds, other=0)
        acc = tl.where(trainable != 0, acc, 0.0)
    tl.store(out_ptr + tl.program_id(1) * OUT * R + outs[:, None] * R + ranks[None, :], acc, mask=in_bounds)


def _rank_pad(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products (as torch's default matmul); tf32 would be ~1e-3 off."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _splits(n_tiles: int, n_tokens: int, device: torch.device) -> int:
    """How many token slices a gradient reduction uses: about two programs per SM, >= 256 tokens each."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter: two slices, so the split path is exercised by the tests
        target = 2 * n_tiles
    return max(1, min(triton.cdiv(target, n_tiles), triton.cdiv(n_tokens, 256 if device.type == "cuda" else 16)))


def _common(x: Tensor) -> dict:
    if x.numel() >= 2**31:
        raise ValueError(
            f"triton masked_lora_linear: x has {x.numel()} elements; the int32 offsets "
            f"of the kernels need fewer than 2**31"
        )
    return dict(PRECISION=_precision(x.dtype), COMPUTE_F32=INTERPRET)


def forward(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, p: float, seed: int
) -> tuple[Tensor, Tensor]:
    """(y, xa) for 2-D x; dropout with probability p from Philox `seed` when p > 0."""
    x, weight, lora_A, lora_B = (t.contiguous() for t in (x, weight, lora_A, lora_B))
    (n, n_in), n_out, rank = x.shape, weight.shape[0], lora_A.shape[0]
    y = torch.empty(n, n_out, dtype=x.dtype, device=x.device)
    xa = torch.empty(n, rank, dtype=x.dtype, device=x.device)
    if n == 0:
        return y, xa
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(n_out, meta["BLOCK_N"] * meta["GROUP_N"]))  # noqa: E731
    _forward_kernel[grid](
        x,
        weight,
        lora_A,
        lora_B,
        y,
        xa,
        n,
        n_in,
        n_out,
        rank,
        scale,
        p,
        seed,
        R_PAD=_rank_pad(rank),
        DROPOUT=p > 0,
        **_common(x),
    )
    return y, xa


def backward(
    dy: Tensor,
    x: Tensor,
    xa: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scale: float,
    mask_A: Optional[Tensor],
    mask_B: Optional[Tensor],
    p: float,
    seed: int,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dX, dA, dB) as kernels/reference.backward; dA, dB in fp32; None where not needed."""
    dy, x, xa, weight, lora_A, lora_B = (t.contiguous() for t in (dy, x, xa, weight, lora_A, lora_B))
    need_x, need_A, need_B = needs
    (n, n_in), n_out, rank = x.shape, weight.shape[0], lora_A.shape[0]
    common, r_pad = _common(x), _rank_pad(rank)
    dx = da = db = None
    dyb = torch.empty(n, rank, dtype=dy.dtype, device=dy.device)
    if need_x:
        dx = _dx(dy, x, weight, lora_A, lora_B, dyb, scale, p, seed, need_A, r_pad, common)
    elif need_A:
        torch.matmul(dy, lora_B, out=dyb)
    if need_A:
        da = _reduce(
            lambda grid, out: _grad_A_kernel[grid](
                dyb,
                x,
                _mask_arg(mask_A, out),
                out,
                n,
                n_in,
                rank,
                scale,
                p,
                seed,
                R_PAD=r_pad,
                DROPOUT=p > 0,
                HAS_MASK=mask_A is not None,
                **common,
            ),
            n_in,
            "BLOCK_N",
            n,
            (rank, n_in),
            x,
        )
    if need_B:
        db = _reduce(
            lambda grid, out: _grad_B_kernel[grid](
                dy,
                xa,
                _mask_arg(mask_B, out),
                out,
                n,
                n_out,
                rank,
                scale,
                R_PAD=r_pad,
                HAS_MASK=mask_B is not None,
                **common,
            ),
            n_out,
            "BLOCK_M",
            n,
            (n_out, rank),
            x,
        )
    return dx, da, db


def _dx(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    dyb: Tensor,
    scale: float,
    p: float,
    seed: int,
    store_dyb: bool,
    r_pad: int,
    common: dict,
) -> Tensor:
    """dX by _dx_kernel; with store_dyb it also writes dY B into `dyb` for dA (contiguous inputs)."""
    (n, n_in), n_out, rank = x.shape, weight.shape[0], lora_A.shape[0]
    dx = torch.empty_like(x)
    if n > 0:

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(n_in, meta["BLOCK_N"] * meta["GROUP_N"]))

        _dx_kernel[grid](
            dy,
            weight,
            lora_A,
            lora_B,
            dx,
            dyb,
            n,
            n_in,
            n_out,
            rank,
            scale,
            p,
            seed,
            R_PAD=r_pad,
            DROPOUT=p > 0,
            STORE_DYB=store_dyb,
            **common,
        )
    return dx


def _mask_arg(mask: Optional[Tensor], placeholder: Tensor) -> Tensor:
    """The mask as bytes (Triton loads uint8 portably); any pointer when there is no mask."""
    return placeholder if mask is None else mask.contiguous().view(torch.uint8)


def _reduce(launch, n_features: int, block_name: str, n_tokens: int, shape: tuple[int, int], like: Tensor) -> Tensor:
    """Run a grad kernel over (feature blocks x token slices) and sum its fp32 partials."""
    # The tile size is an autotuned choice, so size the split from the smallest candidate tile.
    min_block = 16 if INTERPRET else min(tile[0] for tile in _REDUCTION_TILES)
    splits = _splits(triton.cdiv(n_features, min_block), n_tokens, like.device)
    # Every element of every partial is written (a slice without tokens writes zeros): no memset.
    partials = torch.empty(splits, *shape, dtype=torch.float32, device=like.device)
    if n_tokens > 0:
        launch(lambda meta: (triton.cdiv(n_features, meta[block_name]), splits), partials)
    return partials.sum(0)

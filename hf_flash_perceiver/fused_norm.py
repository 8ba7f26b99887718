"""LayerNorm as one Triton kernel forward and one backward, on CUDA: the blocks' norms over large activations
([`FusedLayerNorm`]), the input's affine-free norm, and the latent stream's norms inside the fused residual branches
(fused_block.py).

Under autocast, PyTorch's LayerNorm runs in fp32 and returns fp32, so every Linear after it launches a cast of its
input, and backward launches another for the gradient; its gamma/beta gradient kernel reduces over the token axis
with one thread block per channel, which is slow for the few hundred channels of a latent stream and for the
hundred thousand tokens of a batch. Here the forward writes the normalised output straight in the autocast dtype
(what the next Linear consumes; the values are the fp32 result rounded once, as the cast would), and the backward
reads that dtype's gradient, writes the input gradient in the input's dtype, and sums gamma/beta gradients per
program over row tiles, leaving a small partial per program that one [`column_sum`] finishes.

[`column_sum`] is the fused branches' other reduction over rows, a projection's bias gradient: one kernel whose last
program per column block finishes the sum (PyTorch's sum over the token axis launches a memset and a reduction
that reads a tall half-precision gradient at a fraction of the memory bandwidth).

Off CUDA, without Triton, under `torch.compile` (Inductor fuses the native op itself) or for widths past one tile,
[`layer_norm`] is `F.layer_norm` followed by the same cast.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path below
    triton = tl = None

MAX_FUSED_WIDTH = 8192
# A block norm ([`FusedLayerNorm`]) over fewer elements stays PyTorch's op. The Triton path is an autograd node
# launched from Python (two launches, four allocations, a reduction) and costs several times the host time of the
# native op; the device time it saves grows with the activation, and only past about this size does it outweigh
# that host time, which is what an eager step of a small Perceiver is short of (README, "LayerNorm kernels").
BLOCK_NORM_MIN_ELEMENTS = 2**24

# Off switch for comparisons (benchmarks, tests): the PyTorch path everywhere when False.
enabled = True


def fused_layer_norm_fits(x: Tensor) -> bool:
    """Whether [`layer_norm`] takes the Triton kernels for `x`."""
    return (
        enabled
        and triton is not None
        and x.is_cuda
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and 0 < x.shape[-1] <= MAX_FUSED_WIDTH
        and x.numel() > 0
        and not torch.compiler.is_compiling()
    )


def _output_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last axis, returned in the autocast dtype under autocast (else in `x`'s dtype, or the
    promoted dtype of `x` and the affine as `F.layer_norm` gives)."""
    if fused_layer_norm_fits(x) and (weight is None or weight.is_cuda):
        return _LayerNormFunction.apply(x, weight, bias, eps, _output_dtype(x))
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if torch.is_autocast_enabled(x.device.type):
        y = y.to(torch.get_autocast_dtype(x.device.type))
    return y


@lru_cache(maxsize=None)  # called at every launch, where host time is what the eager step is short of
def _tile(width: int) -> tuple[int, int, int]:
    """(rows per tile, padded width, warps): tiles of about 4096 elements."""
    block = triton.next_power_of_2(width)
    rows = max(1, min(16, 4096 // block))
    warps = 4 if block * rows <= 4096 else 8
    return rows, block, warps


@lru_cache(maxsize=None)
def _backward_tile(width: int) -> tuple[int, int, int, int, bool]:
    """(rows per tile, padded width, warps, programs per SM, streamed) of the backward, whose
    programs loop over row tiles: tiles of about 4096 elements, four warps (eight past that), two programs per SM for
    widths of 256 and more, the gamma/beta partial sums kept as whole tiles until the end, from a sweep on an H200
    (widths 256 and 1024; README, "The cross-attention as a fused branch"). Rows padded to 1024 take two rows per
    tile, each tile's sums reduced over its rows as it goes and the next tile's loads issued before this one's
    arithmetic: faster there on an H100 (README, "The LayerNorm backward at 1024 columns"), slower at 256, 512 and
    2048, which keep the first launch."""
    block = triton.next_power_of_2(width)
    if block == 1024:
        return 2, block, 4, 2, True
    rows = max(1, min(16, 4096 // block))
    warps = 4 if block * rows <= 4096 else 8
    return rows, block, warps, 2 if block >= 256 else 4, False


_SM_COUNT: dict[int, int] = {}


def _programs(device: torch.device, tiles: int, per_sm: int) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(tiles, per_sm * _SM_COUNT[index]))


def norm_forward(x2: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype,
                 x_hat: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LayerNorm of the rows of `x2 (rows, width)` (unit stride along the row) into a new `out_dtype` tensor.
    Returns `(y, stats)`, `stats (2, rows)` holding the fp32 mean and inverse standard deviation. `x_hat`, a `(rows,
    width)` tensor, receives the normalised rows before the affine, in its dtype, from the same kernel: what
    [`norm_backward`] reads (`normalized=True`) instead of `x2`."""
    rows, width = x2.shape
    y = torch.empty((rows, width), dtype=out_dtype, device=x2.device)
    stats = torch.empty((2, rows), dtype=torch.float32, device=x2.device)
    tile_rows, block, warps = _tile(width)
    _layer_norm_forward[(triton.cdiv(rows, tile_rows),)](
        x2, y, weight if weight is not None else x2, bias if bias is not None else x2, stats,
        x_hat if x_hat is not None else y, rows, width, x2.stride(0), eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, KEEP_NORMALIZED=x_hat is not None,
        ROWS=tile_rows, BLOCK=block, num_warps=warps,
    )
    return y, stats


def norm_backward(x2: Tensor, dy: Tensor, weight: Tensor | None, stats: Tensor, has_bias: bool,
                  residual_grad: Tensor | None = None, residual_sum: bool = False,
                  dx_copy: Tensor | None = None, normalized: bool = False, dx_dtype: torch.dtype | None = None,
                  bias: Tensor | None = None,
                  output: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of [`norm_forward`] from `dy (rows, width)`: `(dx, d_weight, d_bias, residual column sum)`, in
    fp32 for the affine, `dx` in `dx_dtype` (default: `x2`'s dtype). `residual_grad`, when given, is added to `dx` in
    the same kernel (a residual branch's gradient meeting the normalised one); with `residual_sum` its fp32 sum over
    the rows comes out of the same kernel and reduction as the affine's (the bias gradient of the projection whose
    output joined the residual stream: the sum of the same gradient), else the last item is None. `dx_copy`, a
    `(rows, width)` tensor of another dtype, receives `dx` in that dtype from the same kernel.

    With `normalized`, `x2` holds the forward's normalised rows (its `x_hat`, in any dtype) rather than its input.
    `output`, a `(rows, width)` tensor, receives the forward's output again, `x_hat * weight + bias` (`bias` the
    norm's bias where `has_bias`), from the same kernel."""
    rows, width = x2.shape
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    dx = torch.empty((rows, width), dtype=dx_dtype or x2.dtype, device=x2.device)
    tile_rows, block, warps, per_sm, streamed = _backward_tile(width)
    programs = _programs(x2.device, triton.cdiv(rows, tile_rows), per_sm)
    residual_sum = residual_sum and residual_grad is not None
    want_sums = weight is not None or has_bias or residual_sum
    partial = torch.empty((programs, 3, width) if want_sums else (1, 3, 1), dtype=torch.float32, device=x2.device)
    if residual_grad is not None and residual_grad.stride(-1) != 1:
        residual_grad = residual_grad.contiguous()
    _layer_norm_backward[(programs,)](
        x2, dy, dx, weight if weight is not None else x2, stats, partial,
        residual_grad if residual_grad is not None else dx, dx_copy if dx_copy is not None else dx,
        bias if bias is not None else x2, output if output is not None else dx,
        rows, width, x2.stride(0), dy.stride(0), residual_grad.stride(0) if residual_grad is not None else 0,
        HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias, HAS_RESIDUAL=residual_grad is not None,
        RESIDUAL_SUM=residual_sum, HAS_COPY=dx_copy is not None, NORMALIZED=normalized,
        REWRITE=output is not None, STREAMED=streamed, ROWS=tile_rows, BLOCK=block, num_warps=warps,
    )
    if not want_sums:
        return dx, None, None, None
    # Each program's partials lie side by side, so the span of wanted ones over all programs is one column sum (an
    # unwritten slot inside the span is summed and dropped).
    wanted = [i for i, want in enumerate((weight is not None, has_bias, residual_sum)) if want]
    span = partial[:, wanted[0]:wanted[-1] + 1]
    sums = column_sum(span.reshape(programs, -1)).view(span.shape[1:])
    out = [None, None, None]
    for i in wanted:
        out[i] = sums[i - wanted[0]]
    return dx, out[0], out[1], out[2]


# Per-column-block arrival counters of [`column_sum`], per device and stream (kernels on one stream run one after
# another, so they can share counters; two streams cannot). Every launch leaves its counters at zero, so they are
# zeroed once, when made, and never freed: a captured CUDA graph keeps their address.
_COUNTERS: dict[tuple[int, int], Tensor] = {}
COUNTER_SLOTS = 4096
_SUM_TILE = (64, 128, 4)  # rows per iteration, columns per program, warps
_SUM_PER_SM = 2  # programs per SM


def _counters(device: torch.device) -> Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch.cuda.current_stream(index).cuda_stream)
    counters = _COUNTERS.get(key)
    if counters is None:
        counters = _COUNTERS[key] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return counters


def column_sum(x2: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """`x2.sum(0, dtype=out_dtype)` of a `(rows, cols)` CUDA tensor with unit stride along the row, summed in fp32 in
    a fixed order (the same result on every call). Each program sums a span of rows for one block of columns into a
    partial; the last of a column block's programs to finish adds the partials up. Off CUDA or without Triton it is
    PyTorch's sum."""
    rows, cols = x2.shape
    column_blocks = triton.cdiv(cols, _SUM_TILE[1]) if triton is not None else 0
    if triton is None or not x2.is_cuda or x2.stride(-1) != 1 or rows == 0 or column_blocks > COUNTER_SLOTS:
        return x2.sum(0, dtype=out_dtype)
    return _launch_column_sum(x2, out_dtype)


def _launch_column_sum(x2: Tensor, out_dtype: torch.dtype, heads: Sequence[Tensor] | None = None,
                       copy: Tensor | None = None, out: Tensor | None = None, block: int | None = None) -> Tensor:
    # `heads`: three `(outer, heads, inner, head_width)` views of one layout (unit stride along the last axis) read
    # in place of `x2`, side by side, as the rows `outer * inner` by columns `3 * heads * head_width` (then `x2` only
    # gives that shape).
    rows, cols = x2.shape
    tile_rows, tile_block, warps = _SUM_TILE
    block = block or tile_block
    column_blocks = triton.cdiv(cols, block)
    # About two programs per SM in all, each over a span of whole row tiles.
    splits = max(1, _programs(x2.device, column_blocks * triton.cdiv(rows, tile_rows), _SUM_PER_SM) // column_blocks)
    span = triton.cdiv(triton.cdiv(rows, splits), tile_rows) * tile_rows
    splits = triton.cdiv(rows, span)
    partial = torch.empty((splits, cols), dtype=torch.float32, device=x2.device)
    if out is None:
        out = torch.empty(cols, dtype=out_dtype, device=x2.device)
    sources = [x2] * 3 if heads is None else list(heads)
    first = sources[0]
    gather = ((first.shape[2], first.stride(0), first.shape[3], first.stride(1), first.shape[1] * first.shape[3])
              if heads is not None else (1, 0, 1, 0, cols))
    _column_sum[(column_blocks, splits)](
        *sources, out, partial, _counters(x2.device), rows, cols, first.stride(-2), span, splits, *gather,
        copy if copy is not None else out, copy.stride(0) if copy is not None else 0,
        GATHER=heads is not None, COPY=copy is not None, ROWS=tile_rows, BLOCK=block, num_warps=warps,
    )
    return out


def stack_heads_column_sum(parts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """`(stacked, sums)` of `parts`, each `(batch, heads, length, head_dim)` (attention's per-head gradients of the
    query, key and value): `stacked (batch * length, len(parts) * heads * head_dim)` holds row `b * length + l` of
    every part, part by part and head by head (the gradient of a fused QKV projection's output), and `sums` its fp32
    column sums (that projection's bias gradient), both from one pass over each part. Off CUDA, without Triton, for
    other than three parts of one layout, or for heads the kernel's column blocks do not divide, `torch.stack` and
    [`column_sum`]."""
    head_dim = parts[0].shape[-1]
    if not (triton is not None and parts[0].is_cuda and _head_block(head_dim) >= 16 and len(parts) == 3
            and all(p.stride() == parts[0].stride() and p.shape == parts[0].shape for p in parts)
            and parts[0].stride(-1) == 1):
        stacked = stack_heads(parts)
        return stacked, column_sum(stacked)
    return _launch_stack_heads(parts)


def stack_heads(parts: Sequence[Tensor]) -> Tensor:
    """The rows of [`stack_heads_column_sum`] without the sums: `torch.stack`."""
    batch, _, length, _ = parts[0].shape
    return torch.stack([p.transpose(1, 2) for p in parts], dim=2).view(batch * length, -1)


def _head_block(head_dim: int) -> int:
    # Columns per program of a gathered column sum: the largest power of two dividing the head width, up to a tile.
    return min(_SUM_TILE[1], head_dim & -head_dim)


def _launch_stack_heads(parts: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    batch, heads, length, head_dim = parts[0].shape
    block = _head_block(head_dim)
    width = heads * head_dim
    stacked = torch.empty((batch * length, len(parts) * width), dtype=parts[0].dtype, device=parts[0].device)
    sums = torch.empty(len(parts) * width, dtype=torch.float32, device=parts[0].device)
    _launch_column_sum(stacked, torch.float32, heads=parts, copy=stacked, out=sums, block=block)
    return stacked, sums


_FOLD_TILE = (32, 64, 4)  # rows per iteration, columns per iteration / per program, warps


def fold_affine(weight: Tensor, bias: Tensor | None, norm_weight: Tensor, norm_bias: Tensor,
                out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A LayerNorm's affine folded into the Linear after it, `(weight * norm_weight, bias + weight @ norm_bias)`
    (cross_attention.fold_norm_affine), computed in fp32 and written in `out_dtype` by one kernel (CUDA, Triton)."""
    weight = weight.contiguous()
    rows, cols = weight.shape
    tile_rows, block, warps = _FOLD_TILE
    folded = torch.empty((rows, cols), dtype=out_dtype, device=weight.device)
    folded_bias = torch.empty(rows, dtype=out_dtype, device=weight.device)
    _fold_affine[(triton.cdiv(rows, tile_rows),)](
        weight, bias if bias is not None else weight, norm_weight, norm_bias, folded, folded_bias, rows, cols,
        HAS_BIAS=bias is not None, ROWS=tile_rows, BLOCK=block, num_warps=warps,
    )
    return folded, folded_bias


def unfold_affine_grads(d_folded: Tensor, d_folded_bias: Tensor, weight: Tensor, norm_weight: Tensor,
                        norm_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of [`fold_affine`]'s inputs from those of its outputs (fp32): `(d_norm_weight, d_norm_bias,
    d_weight)` in their parameters' dtypes, by one kernel; the Linear's bias gradient is `d_folded_bias` itself."""
    weight = weight.contiguous()
    rows, cols = weight.shape
    tile_rows, block, warps = _FOLD_TILE
    d_weight = torch.empty_like(weight)
    d_norm_weight = torch.empty_like(norm_weight)
    d_norm_bias = torch.empty_like(norm_bias)
    _unfold_affine[(triton.cdiv(cols, block),)](
        d_folded.contiguous(), d_folded_bias, weight, norm_weight, norm_bias, d_weight, d_norm_weight, d_norm_bias,
        rows, cols, ROWS=tile_rows, BLOCK=block, num_warps=warps,
    )
    return d_norm_weight, d_norm_bias, d_weight


class FusedLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (the same parameters, initialisation and checkpoint keys) for a norm whose output a projection
    consumes. On CUDA, for inputs of at least `BLOCK_NORM_MIN_ELEMENTS` elements, it runs the Triton kernels of
    [`layer_norm`]: under autocast the output is then in the autocast dtype (the fp32 norm rounded once, as the
    projection's own cast would round it). Elsewhere it is `nn.LayerNorm`."""

    def forward(self, input: Tensor) -> Tensor:
        if (
            len(self.normalized_shape) == 1
            and input.numel() >= BLOCK_NORM_MIN_ELEMENTS
            and fused_layer_norm_fits(input)
            and (self.weight is None or self.weight.is_cuda)
        ):
            return _LayerNormFunction.apply(input, self.weight, self.bias, self.eps, _output_dtype(input))
        return super().forward(input)


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y, stats = norm_forward(x2, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x2, weight, stats)
        ctx.has_bias = bias is not None
        ctx.shape = x.shape
        ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight, stats = ctx.saved_tensors
        dx, grad_weight, grad_bias, _ = norm_backward(x2, grad.reshape(-1, x2.shape[1]), weight, stats, ctx.has_bias)
        w_dtype, b_dtype = ctx.dtypes
        if grad_weight is not None:
            grad_weight = grad_weight.to(w_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(b_dtype)
        return dx.view(ctx.shape), grad_weight, grad_bias, None, None


if triton is not None:

    @triton.jit
    def _layer_norm_forward(
        X, Y, W, B, Stats, XHat, rows, width, stride, eps,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, KEEP_NORMALIZED: tl.constexpr, ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        col = tl.arange(0, BLOCK)
        row_ok = row < rows
        col_ok = col < width
        ok = row_ok[:, None] & col_ok[None, :]
        offsets = row[:, None].to(tl.int64) * stride + col[None, :]
        x = tl.load(X + offsets, mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / width
        centered = tl.where(ok, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / width + eps)
        y = centered * rstd[:, None]
        out_offsets = row[:, None].to(tl.int64) * width + col[None, :]
        if KEEP_NORMALIZED:
            tl.store(XHat + out_offsets, y.to(XHat.dtype.element_ty), mask=ok)
        if HAS_WEIGHT:
            y = y * tl.load(W + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            y = y + tl.load(B + col, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + out_offsets, y.to(Y.dtype.element_ty), mask=ok)
        tl.store(Stats + row, mean, mask=row_ok)
        tl.store(Stats + rows + row, rstd, mask=row_ok)

    @triton.jit
    def _backward_rows(X, DY, DRes, Stats, start, rows, stride_x, stride_dy, stride_res, col, col_ok,
                       HAS_RESIDUAL: tl.constexpr, NORMALIZED: tl.constexpr, ROWS: tl.constexpr):
        # One row tile's loads, as stored (converted where used): the input (or x_hat), the output gradient, the
        # residual gradient, the row statistics. What a launch has no use for is given as an alias of another.
        row = start + tl.arange(0, ROWS)
        row_ok = row < rows
        ok = row_ok[:, None] & col_ok[None, :]
        row64 = row[:, None].to(tl.int64)
        x = tl.load(X + row64 * stride_x + col[None, :], mask=ok, other=0.0)
        dy = tl.load(DY + row64 * stride_dy + col[None, :], mask=ok, other=0.0)
        rstd = tl.load(Stats + rows + row, mask=row_ok, other=0.0)
        if NORMALIZED:
            mean = rstd
        else:
            mean = tl.load(Stats + row, mask=row_ok, other=0.0)
        if HAS_RESIDUAL:
            d_res = tl.load(DRes + row64 * stride_res + col[None, :], mask=ok, other=0.0)
        else:
            d_res = dy
        return x, dy, mean, rstd, d_res

    @triton.jit
    def _layer_norm_backward(
        X, DY, DX, W, Stats, Partial, DRes, DXCopy, B, H, rows, width, stride_x, stride_dy, stride_res,
        HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RESIDUAL_SUM: tl.constexpr,
        HAS_COPY: tl.constexpr, NORMALIZED: tl.constexpr, REWRITE: tl.constexpr, STREAMED: tl.constexpr,
        ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # STREAMED: the next row tile's loads are issued before this tile's arithmetic, and the partial sums are
        # reduced over each tile's rows as it goes ([BLOCK] accumulators, fewer registers) rather than kept as whole
        # tiles and reduced once at the end (_backward_tile says which launch takes which).
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        step = programs * ROWS
        col = tl.arange(0, BLOCK)
        col_ok = col < width
        if HAS_WEIGHT:
            w = tl.load(W + col, mask=col_ok, other=0.0).to(tl.float32)
        if REWRITE and HAS_BIAS:
            b = tl.load(B + col, mask=col_ok, other=0.0).to(tl.float32)
        # Whole-tile partial sums: a reduction across the rows of a tile (across warps) in every iteration held the
        # narrow launches to a fraction of the memory bandwidth.
        if STREAMED:
            grad_w = tl.zeros([BLOCK], dtype=tl.float32)
            grad_b = tl.zeros([BLOCK], dtype=tl.float32)
            grad_r = tl.zeros([BLOCK], dtype=tl.float32)
        else:
            grad_w = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            grad_b = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            grad_r = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        if STREAMED:
            x_next, dy_next, mean_next, rstd_next, res_next = _backward_rows(
                X, DY, DRes, Stats, program * ROWS, rows, stride_x, stride_dy, stride_res, col, col_ok,
                HAS_RESIDUAL, NORMALIZED, ROWS)
        for start in range(program * ROWS, rows, step):
            row = start + tl.arange(0, ROWS)
            row_ok = row < rows
            ok = row_ok[:, None] & col_ok[None, :]
            row64 = row[:, None].to(tl.int64)
            if STREAMED:
                x, dy, mean, rstd, d_res = x_next, dy_next, mean_next, rstd_next, res_next
                x_next, dy_next, mean_next, rstd_next, res_next = _backward_rows(
                    X, DY, DRes, Stats, start + step, rows, stride_x, stride_dy, stride_res, col, col_ok,
                    HAS_RESIDUAL, NORMALIZED, ROWS)
                x = x.to(tl.float32)
                dy = dy.to(tl.float32)
            else:  # each load where it is used (the residual gradient's below): fewer live registers
                x = tl.load(X + row64 * stride_x + col[None, :], mask=ok, other=0.0).to(tl.float32)
                dy = tl.load(DY + row64 * stride_dy + col[None, :], mask=ok, other=0.0).to(tl.float32)
                rstd = tl.load(Stats + rows + row, mask=row_ok, other=0.0)
            if NORMALIZED:
                x_hat = x
            else:
                if not STREAMED:
                    mean = tl.load(Stats + row, mask=row_ok, other=0.0)
                x_hat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
            if REWRITE:
                h = x_hat * w[None, :] if HAS_WEIGHT else x_hat
                if HAS_BIAS:
                    h += b[None, :]
                tl.store(H + row64 * width + col[None, :], h.to(H.dtype.element_ty), mask=ok)
            w_dy = dy * w[None, :] if HAS_WEIGHT else dy
            c1 = tl.sum(x_hat * w_dy, axis=1) / width
            c2 = tl.sum(w_dy, axis=1) / width
            dx = (w_dy - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_RESIDUAL:
                if not STREAMED:
                    d_res = tl.load(DRes + row64 * stride_res + col[None, :], mask=ok, other=0.0)
                d_res = d_res.to(tl.float32)
                dx += d_res
                if RESIDUAL_SUM:
                    if STREAMED:
                        grad_r += tl.sum(d_res, axis=0)
                    else:
                        grad_r += d_res
            tl.store(DX + row64 * width + col[None, :], dx.to(DX.dtype.element_ty), mask=ok)
            if HAS_COPY:
                tl.store(DXCopy + row64 * width + col[None, :], dx.to(DXCopy.dtype.element_ty), mask=ok)
            if HAS_WEIGHT:
                if STREAMED:
                    grad_w += tl.sum(dy * x_hat, axis=0)
                else:
                    grad_w += dy * x_hat
            if HAS_BIAS:
                if STREAMED:
                    grad_b += tl.sum(dy, axis=0)
                else:
                    grad_b += dy
        if STREAMED:
            if HAS_WEIGHT:
                tl.store(Partial + program * 3 * width + col, grad_w, mask=col_ok)
            if HAS_BIAS:
                tl.store(Partial + (program * 3 + 1) * width + col, grad_b, mask=col_ok)
            if RESIDUAL_SUM:
                tl.store(Partial + (program * 3 + 2) * width + col, grad_r, mask=col_ok)
        else:
            if HAS_WEIGHT:
                tl.store(Partial + program * 3 * width + col, tl.sum(grad_w, axis=0), mask=col_ok)
            if HAS_BIAS:
                tl.store(Partial + (program * 3 + 1) * width + col, tl.sum(grad_b, axis=0), mask=col_ok)
            if RESIDUAL_SUM:
                tl.store(Partial + (program * 3 + 2) * width + col, tl.sum(grad_r, axis=0), mask=col_ok)

    @triton.jit
    def _column_sum(X, X1, X2, Out, Partial, Counters, rows, cols, stride, span, splits, inner_rows, stride_outer,
                    head_width, stride_head, part_cols, Copy, copy_stride,
                    GATHER: tl.constexpr, COPY: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # GATHER: X, X1 and X2 are `(outer, heads, inner_rows, head_width)` views of one layout, read side by side as
        # rows `outer * inner_rows` by columns `3 * heads * head_width` (`part_cols` columns each; a block of
        # columns never straddles two heads). COPY: the rows are also written to `Copy`, a row-major `(rows, cols)`
        # view with row stride `copy_stride`.
        block = tl.program_id(0)
        split = tl.program_id(1)
        col = block * BLOCK + tl.arange(0, BLOCK)
        col_ok = col < cols
        if GATHER:
            part = (block * BLOCK) // part_cols
            if part == 0:
                source = X
            elif part == 1:
                source = X1
            else:
                source = X2
            local = col - part * part_cols
            head = (block * BLOCK - part * part_cols) // head_width
            x_col = head.to(tl.int64) * stride_head + (local - head * head_width)
        else:
            source = X
            x_col = col
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for first in range(split * span, (split + 1) * span, ROWS):
            row = first + tl.arange(0, ROWS)
            ok = (row < rows)[:, None] & col_ok[None, :]
            row64 = row[:, None].to(tl.int64)
            if GATHER:
                x_row = (row64 // inner_rows) * stride_outer + (row64 % inner_rows) * stride
            else:
                x_row = row64 * stride
            x = tl.load(source + x_row + x_col[None, :], mask=ok, other=0.0)
            if COPY:
                tl.store(Copy + row64 * copy_stride + col[None, :], x, mask=ok)
            acc += x.to(tl.float32)
        tl.store(Partial + split * cols + col, tl.sum(acc, axis=0), mask=col_ok)
        # The barrier and acq_rel: every thread's part of this program's partial is visible before its arrival
        # counts, and the last arrival sees them all (read past L1, which another SM's writes do not update).
        tl.debug_barrier()
        arrived = tl.atomic_add(Counters + block, 1, sem="acq_rel")
        if arrived == splits - 1:
            total = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
            for first in range(0, splits, ROWS):
                s = first + tl.arange(0, ROWS)
                ok = (s < splits)[:, None] & col_ok[None, :]
                total += tl.load(Partial + s[:, None] * cols + col[None, :], mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(Out + col, tl.sum(total, axis=0).to(Out.dtype.element_ty), mask=col_ok)
            tl.atomic_xchg(Counters + block, 0)

    @triton.jit
    def _fold_affine(W, B, G, Beta, WF, BF, rows, cols, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                     BLOCK: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = row < rows
        acc = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, cols, BLOCK):
            col = start + tl.arange(0, BLOCK)
            col_ok = col < cols
            ok = row_ok[:, None] & col_ok[None, :]
            offsets = row[:, None].to(tl.int64) * cols + col[None, :]
            w = tl.load(W + offsets, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(G + col, mask=col_ok, other=0.0).to(tl.float32)
            beta = tl.load(Beta + col, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(WF + offsets, (w * g[None, :]).to(WF.dtype.element_ty), mask=ok)
            acc += tl.sum(w * beta[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(B + row, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(BF + row, acc.to(BF.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _unfold_affine(DWF, DBF, W, G, Beta, DW, DG, DBeta, rows, cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        col = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        col_ok = col < cols
        g = tl.load(G + col, mask=col_ok, other=0.0).to(tl.float32)
        beta = tl.load(Beta + col, mask=col_ok, other=0.0).to(tl.float32)
        acc_g = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        acc_beta = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for start in range(0, rows, ROWS):
            row = start + tl.arange(0, ROWS)
            row_ok = row < rows
            ok = row_ok[:, None] & col_ok[None, :]
            offsets = row[:, None].to(tl.int64) * cols + col[None, :]
            dwf = tl.load(DWF + offsets, mask=ok, other=0.0).to(tl.float32)
            w = tl.load(W + offsets, mask=ok, other=0.0).to(tl.float32)
            dbf = tl.load(DBF + row, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(DW + offsets, (dwf * g[None, :] + dbf[:, None] * beta[None, :]).to(DW.dtype.element_ty), mask=ok)
            acc_g += dwf * w
            acc_beta += w * dbf[:, None]
        tl.store(DG + col, tl.sum(acc_g, axis=0).to(DG.dtype.element_ty), mask=col_ok)
        tl.store(DBeta + col, tl.sum(acc_beta, axis=0).to(DBeta.dtype.element_ty), mask=col_ok)


__all__ = [
    "BLOCK_NORM_MIN_ELEMENTS", "FusedLayerNorm", "column_sum", "fold_affine", "fused_layer_norm_fits", "layer_norm",
    "norm_backward", "norm_forward", "unfold_affine_grads",
]

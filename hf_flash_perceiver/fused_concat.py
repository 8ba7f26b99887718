"""Per-sample tokens concatenated with position features that every sample shares, by one vectorised kernel.

The image and flow adapters concatenate each sample's tokens `(batch, n, c)` with position features `(n, p)` that the
whole batch shares (learned, or Fourier). `torch.cat` of the positions expanded over the batch runs PyTorch's generic
strided copy, which moves one element per thread: at the pretrained vision shape (batch 16, 224 x 224 pixels) that
is a copy of 0.8 GB at a fraction of the memory bandwidth. Here, on CUDA with Triton, each program writes whole rows
of both parts. Backward is the concatenation's: the gradient's slice for the tokens, and for the positions its slice
summed over the batch.

Off CUDA, without Triton, under `torch.compile` (Inductor writes the concatenation itself), or where the two parts'
dtypes or layouts differ from what the kernel reads, it is `torch.cat` of the expanded positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fused_norm import triton

if triton is not None:
    import triton.language as tl

# Off switch for comparisons (benchmarks, tests): `torch.cat` everywhere when False.
enabled = True

_ROWS, _WARPS = 8, 4  # rows per program, warps


def concat_fits(tokens: Tensor, positions: Tensor) -> bool:
    """Whether [`concat_positions`] takes the Triton kernel for these two parts."""
    return (
        enabled
        and triton is not None
        and tokens.is_cuda
        and tokens.dim() == 3
        and positions.dim() == 2
        and tokens.dtype == positions.dtype
        and tokens.is_contiguous()
        and positions.is_contiguous()
        and tokens.numel() > 0
        and not torch.compiler.is_compiling()
    )


def concat_positions(tokens: Tensor, positions: Tensor) -> Tensor:
    """`torch.cat([tokens, positions.expand(batch, -1, -1)], dim=-1)` for `tokens (batch, n, c)` and positions
    `(n, p)` shared by the batch: `(batch, n, c + p)`."""
    if tokens.shape[1] != positions.shape[0]:
        raise ValueError(
            f"the position features have {positions.shape[0]} rows but the tokens {tokens.shape[1]}: tokens "
            f"{tuple(tokens.shape)}, positions {tuple(positions.shape)}."
        )
    if not concat_fits(tokens, positions):
        return torch.cat([tokens, positions.expand(tokens.shape[0], -1, -1)], dim=-1)
    return _ConcatPositions.apply(tokens, positions)


class _ConcatPositions(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: Tensor, positions: Tensor) -> Tensor:
        batch, n, channels = tokens.shape
        width = channels + positions.shape[1]
        out = torch.empty((batch, n, width), dtype=tokens.dtype, device=tokens.device)
        _concat[(triton.cdiv(batch * n, _ROWS),)](
            tokens, positions, out, batch * n, n, channels, positions.shape[1],
            BLOCK_T=triton.next_power_of_2(channels), BLOCK_P=triton.next_power_of_2(positions.shape[1]),
            ROWS=_ROWS, num_warps=_WARPS,
        )
        ctx.channels = channels
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        d_tokens = grad[..., : ctx.channels] if ctx.needs_input_grad[0] else None
        d_positions = grad[..., ctx.channels:].sum(0) if ctx.needs_input_grad[1] else None
        return d_tokens, d_positions


if triton is not None:

    @triton.jit
    def _concat(T, P, Out, rows, n, channels, width_p, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
                ROWS: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = (row < rows)[:, None]
        row64 = row[:, None].to(tl.int64)
        out_row = Out + row64 * (channels + width_p)
        col = tl.arange(0, BLOCK_T)[None, :]
        ok = row_ok & (col < channels)
        tl.store(out_row + col, tl.load(T + row64 * channels + col, mask=ok), mask=ok)
        col = tl.arange(0, BLOCK_P)[None, :]
        ok = row_ok & (col < width_p)
        tl.store(out_row + channels + col, tl.load(P + (row64 % n) * width_p + col, mask=ok), mask=ok)


__all__ = ["concat_fits", "concat_positions"]

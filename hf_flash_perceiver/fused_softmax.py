"""The softmax of wide-head attention over its materialised scores, with the attention dropout, as one kernel each way.

Heads that no fused attention kernel takes (over 256 channels: the single 512- to 1280-wide heads of transformers'
pretrained Perceivers) run as two GEMMs around a softmax over the whole scores matrix (`gemm_attention`, and the
cross-attention with its key/value projection absorbed, layers.py): at the pretrained vision shape, batch 16, that
matrix has 411 million entries. Under autocast PyTorch's softmax runs in fp32: the half-precision scores are copied
to fp32, the fp32 probabilities are dropped out and copied back for the GEMM, and backward retraces those passes over
an fp32 copy, a dozen passes over the scores in all, where the GEMMs around them are a few milliseconds.

Here, on CUDA with Triton, one program per row:

- forward reads the scores (and the key mask) twice, online maximum and sum first, and writes the probabilities and
  the dropped-out probabilities in the scores' dtype, computed in fp32 and rounded once, and optionally the rows' sums
  of the dropped-out probabilities (what a value bias is multiplied by under dropout);
- the dropout mask is drawn from Philox keyed by a seed taken from PyTorch's generator (so CUDA graphs and
  activation checkpointing, which replay that generator, get the same mask), one draw per four entries;
- backward reads the output gradient and the dropped-out probabilities twice and the probabilities once, and writes
  the scores' gradient: the mask is where the dropped-out probabilities are zero.

Kept for backward: the probabilities, and the dropped-out ones, which the GEMM after keeps anyway. Off CUDA, in fp32,
without Triton and under `torch.compile` (Inductor fuses the softmax and the dropout itself), [`softmax_dropout`] runs
PyTorch's softmax and dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_norm import triton

if triton is not None:
    import triton.language as tl

# Off switch for comparisons (benchmarks, tests): PyTorch's softmax and dropout everywhere when False.
enabled = True

HALF = (torch.bfloat16, torch.float16)


def fused_softmax_fits(scores: Tensor, dropout: float) -> bool:
    """Whether [`softmax_dropout`] takes the Triton kernels for `scores`."""
    return (
        enabled
        and triton is not None
        and scores.is_cuda
        and scores.dtype in HALF
        and scores.numel() > 0
        and 0.0 <= dropout < 1.0
        and not torch.compiler.is_compiling()
    )


def _reference(scores: Tensor, key_mask: Tensor | None, dropout: float, row_sums: bool
               ) -> tuple[Tensor, Tensor | None]:
    if key_mask is not None:
        scores = scores.masked_fill(~_broadcast_mask(key_mask, scores), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    return probs, (probs.sum(-1) if row_sums else None)


def _broadcast_mask(key_mask: Tensor, scores: Tensor) -> Tensor:
    """`(batch, kv_len)` -> broadcastable against `scores (batch, ..., kv_len)`."""
    return key_mask.view(key_mask.shape[0], *([1] * (scores.dim() - 2)), key_mask.shape[1])


def _geometry(n: int) -> tuple[int, int]:
    """(columns per loop step, warps) of a row of `n` scores: at least 64 (the forward splits a step in quarters)."""
    block = min(4096, max(64, triton.next_power_of_2(n)))
    return block, 8 if block >= 2048 else 4


def _launch_forward(scores: Tensor, key_mask: Tensor | None, dropout: float, row_sums: bool
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """`(probs, dropped, sums)` of `scores (batch, ..., n)` as `(rows, n)` tensors (`dropped` is `probs` without
    dropout) and `(rows,)` fp32 sums or None."""
    n = scores.shape[-1]
    s = scores.reshape(-1, n).contiguous()
    rows = s.shape[0]
    probs = torch.empty_like(s)
    dropped = torch.empty_like(s) if dropout > 0 else probs
    sums = torch.empty(rows, dtype=torch.float32, device=s.device) if row_sums else None
    # The dropout's seed, from PyTorch's generator: replayed by CUDA graphs and by activation checkpointing.
    seed = (torch.randint(0, 2**62, (1,), device=s.device, dtype=torch.int64) if dropout > 0
            else torch.zeros(1, device=s.device, dtype=torch.int64))
    block, warps = _geometry(n)
    _softmax_forward[(rows,)](
        s, s if key_mask is None else key_mask.contiguous(), probs, dropped, probs if sums is None else sums, seed, n,
        rows // scores.shape[0], dropout, 1.0 / (1.0 - dropout), HAS_MASK=key_mask is not None, DROPOUT=dropout > 0,
        ROW_SUMS=row_sums, BLOCK=block, num_warps=warps,
    )
    return probs, dropped, sums


def _launch_backward(d_out: Tensor | None, probs: Tensor, dropped: Tensor, d_sums: Tensor | None) -> Tensor:
    """The scores' gradient `(rows, n)` from those of the dropped-out probabilities and of the row sums."""
    rows, n = probs.shape
    g = torch.zeros_like(probs) if d_out is None else d_out.reshape(rows, n).contiguous()
    d_scores = torch.empty_like(probs)
    ds = probs if d_sums is None else d_sums.reshape(rows).float().contiguous()
    block, warps = _geometry(n)
    _softmax_backward[(rows,)](g, probs, dropped, ds, d_scores, n, ROW_SUMS=d_sums is not None, BLOCK=block,
                               num_warps=warps)
    return d_scores


class _SoftmaxDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores: Tensor, key_mask: Tensor | None, dropout: float, row_sums: bool):
        probs, dropped, sums = _launch_forward(scores, key_mask, dropout, row_sums)
        # The dropped-out probabilities are the next GEMM's operand, kept by it anyway.
        ctx.save_for_backward(probs, dropped)
        ctx.shape = scores.shape
        return dropped.view(scores.shape), (None if sums is None else sums.view(scores.shape[:-1]))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor | None, d_sums: Tensor | None):
        probs, dropped = ctx.saved_tensors
        return _launch_backward(d_out, probs, dropped, d_sums).view(ctx.shape), None, None, None


class _SharedKeyValueAttention(torch.autograd.Function):
    """`softmax(q x^T) x` as one node: autograd of the two GEMMs would give `x` two gradients, one of them the
    transpose of the scores GEMM's, and add them in an uncoalesced elementwise kernel over the input's size; here the
    second is accumulated into the first by its GEMM."""

    @staticmethod
    def forward(ctx, q: Tensor, x: Tensor, key_mask: Tensor | None, dropout: float, row_sums: bool):
        scores = torch.bmm(q, x.transpose(1, 2))
        probs, dropped, sums = _launch_forward(scores, key_mask, dropout, row_sums)
        dropped = dropped.view(scores.shape)
        ctx.save_for_backward(q, x, probs, dropped)
        return torch.bmm(dropped, x), (None if sums is None else sums.view(scores.shape[:-1]))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_mixed: Tensor | None, d_sums: Tensor | None):
        q, x, probs, dropped = ctx.saved_tensors
        d_mixed = torch.zeros(*q.shape, dtype=x.dtype, device=x.device) if d_mixed is None else d_mixed.to(x.dtype)
        d_dropped = torch.bmm(d_mixed, x.transpose(1, 2))
        d_scores = _launch_backward(d_dropped, probs, dropped.view_as(probs), d_sums).view(dropped.shape)
        d_q = torch.bmm(d_scores, x) if ctx.needs_input_grad[0] else None
        d_x = None
        if ctx.needs_input_grad[1]:
            d_x = torch.bmm(dropped.transpose(1, 2), d_mixed)
            d_x.baddbmm_(d_scores.transpose(1, 2), q)
        return d_q, d_x, None, None, None


def softmax_dropout(scores: Tensor, key_mask: Tensor | None = None, dropout: float = 0.0, row_sums: bool = False
                    ) -> tuple[Tensor, Tensor | None]:
    """Softmax over the last axis of `scores`, masked keys excluded, then dropout: the attention probabilities that
    multiply the values.

    Args:
        scores (`torch.Tensor` of shape `(batch, ..., kv_len)`): attention scores (scaled).
        key_mask (`torch.BoolTensor` of shape `(batch, kv_len)`, *optional*): True = attend. Every row must keep at
            least one key ([`KeyPaddingMask`] guarantees it).
        dropout (`float`): probability of zeroing an entry (pass 0 in eval); kept entries are scaled by `1/(1-p)`.
        row_sums (`bool`): also return the sum over keys of the returned probabilities (1 without dropout).

    Returns:
        `(probs, sums)`: `probs` of `scores`' shape (and dtype on the fused path), `sums` of shape `scores.shape[:-1]`
        or None.
    """
    if fused_softmax_fits(scores, dropout):
        return _SoftmaxDropout.apply(scores, key_mask, dropout, row_sums)
    return _reference(scores, key_mask, dropout, row_sums)


def shared_key_value_attention(q: Tensor, x: Tensor, key_mask: Tensor | None = None, dropout: float = 0.0,
                               row_sums: bool = False) -> tuple[Tensor, Tensor | None]:
    """Attention whose keys and values are the same rows `x`, `softmax(q x^T) x` with [`softmax_dropout`] between
    the GEMMs: the cross-attention with its key/value projection absorbed (layers.py).

    Args:
        q (`torch.Tensor` of shape `(batch, rows, width)`): queries (scaled), heads stacked as rows.
        x (`torch.Tensor` of shape `(batch, kv_len, width)`): the rows attended to, keys and values both.
        key_mask, dropout, row_sums: as [`softmax_dropout`] takes them.

    Returns:
        `(mixed, sums)`: `mixed (batch, rows, width)`, the probability-weighted sums of `x`'s rows, and the row sums of
        the probabilities (`(batch, rows)`) or None.
    """
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        q, x = q.to(dtype), x.to(dtype)
    if q.dtype == x.dtype and fused_softmax_fits(q, dropout):
        return _SharedKeyValueAttention.apply(q, x, key_mask, dropout, row_sums)
    probs, sums = softmax_dropout(torch.matmul(q, x.transpose(1, 2)), key_mask, dropout, row_sums)
    return torch.matmul(probs, x), sums


# ---------------------------------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _write_probs(S, Mask, P, PD, base, mask_base, cols, n, row_max, inv_sum, uniform, p, inv_keep,
                     HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr):
        ok = cols < n
        valid = ok
        if HAS_MASK:
            valid = ok & (tl.load(Mask + mask_base + cols, mask=ok, other=0) != 0)
        s = tl.load(S + base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        prob = tl.exp(s - row_max) * inv_sum
        tl.store(P + base + cols, prob.to(P.dtype.element_ty), mask=ok)
        if DROPOUT:
            prob = tl.where(tl.uint_to_uniform_float(uniform) >= p, prob * inv_keep, 0.0)
            tl.store(PD + base + cols, prob.to(PD.dtype.element_ty), mask=ok)
        return prob

    @triton.jit
    def _softmax_forward(S, Mask, P, PD, Sums, Seed, n, rows_per_batch, p, inv_keep, HAS_MASK: tl.constexpr,
                         DROPOUT: tl.constexpr, ROW_SUMS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * n
        mask_base = (row // rows_per_batch).to(tl.int64) * n
        offs = tl.arange(0, BLOCK)
        # Online maximum and sum, per lane; lanes that only saw masked keys keep a finite floor (exp of it is 0).
        m = tl.full([BLOCK], -1e30, tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + offs
            ok = cols < n
            if HAS_MASK:
                ok = ok & (tl.load(Mask + mask_base + cols, mask=cols < n, other=0) != 0)
            s = tl.load(S + base + cols, mask=ok, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, s)
            acc = acc * tl.exp(m - m_new) + tl.exp(s - m_new)
            m = m_new
        row_max = tl.max(m, axis=0)
        inv_sum = 1.0 / tl.sum(acc * tl.exp(m - row_max), axis=0)
        # Second pass: a step's columns in four quarters, each taking one of the four numbers a Philox draw gives
        # (counted by the step's quarter offset and the row): integer work a quarter of one draw per entry.
        QUARTER: tl.constexpr = BLOCK // 4
        quarter = tl.arange(0, QUARTER)
        seed = tl.load(Seed) if DROPOUT else 0
        total = tl.zeros([QUARTER], tl.float32)
        for start in range(0, n, BLOCK):
            counter = (start + quarter).to(tl.uint32)
            u0, u1, u2, u3 = counter, counter, counter, counter  # unread without dropout
            if DROPOUT:
                zero = counter * 0
                u0, u1, u2, u3 = tl.philox(seed, counter, zero + row.to(tl.uint32), zero, zero)
            total += _write_probs(S, Mask, P, PD, base, mask_base, start + quarter, n, row_max, inv_sum, u0, p,
                                  inv_keep, HAS_MASK, DROPOUT)
            total += _write_probs(S, Mask, P, PD, base, mask_base, start + QUARTER + quarter, n, row_max, inv_sum,
                                  u1, p, inv_keep, HAS_MASK, DROPOUT)
            total += _write_probs(S, Mask, P, PD, base, mask_base, start + 2 * QUARTER + quarter, n, row_max,
                                  inv_sum, u2, p, inv_keep, HAS_MASK, DROPOUT)
            total += _write_probs(S, Mask, P, PD, base, mask_base, start + 3 * QUARTER + quarter, n, row_max,
                                  inv_sum, u3, p, inv_keep, HAS_MASK, DROPOUT)
        if ROW_SUMS:
            tl.store(Sums + row, tl.sum(total, axis=0))

    @triton.jit
    def _softmax_backward(G, P, PD, DSums, DS, n, ROW_SUMS: tl.constexpr, BLOCK: tl.constexpr):
        # With D the dropped-out probabilities the forward returned (P itself without dropout) and g their gradient
        # (plus the row sums' gradient): d scores_j = D_j g_j - P_j sum_k D_k g_k. The dropout mask is where D is
        # zero, so it is read, not drawn again.
        row = tl.program_id(0)
        base = row.to(tl.int64) * n
        offs = tl.arange(0, BLOCK)
        d_sum = tl.load(DSums + row) if ROW_SUMS else 0.0
        dot = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + offs
            ok = cols < n
            g = tl.load(G + base + cols, mask=ok, other=0.0).to(tl.float32) + d_sum
            dot += g * tl.load(PD + base + cols, mask=ok, other=0.0).to(tl.float32)
        delta = tl.sum(dot, axis=0)
        for start in range(0, n, BLOCK):
            cols = start + offs
            ok = cols < n
            g = tl.load(G + base + cols, mask=ok, other=0.0).to(tl.float32) + d_sum
            dropped = tl.load(PD + base + cols, mask=ok, other=0.0).to(tl.float32)
            prob = tl.load(P + base + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(DS + base + cols, (dropped * g - prob * delta).to(DS.dtype.element_ty), mask=ok)


__all__ = ["enabled", "fused_softmax_fits", "shared_key_value_attention", "softmax_dropout"]

"""The package's Triton kernels and fused residual branches on CPU tensors, in Triton's interpreter.

Run by tests/test_triton_interpreter.py in a subprocess with `TRITON_INTERPRET=1` (the interpreter is chosen when the
kernels are defined, at import): `python tests/interpreted_kernels.py` prints one JSON object, each check's name
mapped to `{"ok": bool, "detail": str}`. The GPU tests (tests/test_cuda.py) check the same code on CUDA, where the
attention kernels are real; here the aten attention ops the branches call are replaced by a reference in fp32 with
the same signatures, so that everything else in a branch (LayerNorm, projections, activation, residual adds, column
sums, the input norm's fold, the half-precision gradient handed on) runs as on the GPU. What the interpreter cannot
show: speed, and what depends on the GPU's memory model (the column sum's arrival counters run one program at a
time here).

Tolerances, relative Frobenius error against PyTorch in fp32 (fp64 for the reductions), with what was measured:
kernels whose output is fp32 agree to fp32 rounding (1e-5); half-precision outputs within one ulp of their dtype
(the interpreter's conversion to half precision was seen up to one ulp off, not the half ulp of rounding to nearest
that the GPU's conversion keeps to); whole branches
in bfloat16 against their fp32 reference within 2e-2 (worst measured 1.0e-2), as the GPU tests allow bf16 paths; a
whole fused model in float16 as accurate as the float16 module path (see `check_fused_model`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("run with TRITON_INTERPRET=1 (tests/test_triton_interpreter.py does)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package; this file's folder holds the helpers

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hf_flash_perceiver.fused_norm as fused_norm  # noqa: E402
from hf_flash_perceiver import fused_activation, fused_block  # noqa: E402
from hf_flash_perceiver.attention_backends import KeyPaddingMask  # noqa: E402
from hf_flash_perceiver.cross_attention import CrossInput, fold_norm_affine  # noqa: E402

from core_common import build, rel_err as rel, shared_key_value_reference, small_config  # noqa: E402

# Launch geometry reads the GPU's SM count and stream: a few programs here (each loops over several row tiles).
fused_norm._programs = lambda device, tiles, per_sm: max(1, min(tiles, 3))
_COUNTERS = torch.zeros(fused_norm.COUNTER_SLOTS, dtype=torch.int32)
fused_norm._counters = lambda device: _COUNTERS

# CPU matmuls do not take `out_dtype`: the branches' weight gradients ask for fp32 results of half-precision inputs.
_mm = torch.mm


def _mm_out_dtype(a, b, *, out_dtype=None):
    return _mm(a, b) if out_dtype is None else _mm(a.float(), b.float()).to(out_dtype)


torch.mm = _mm_out_dtype
_addmm = torch.addmm


def _addmm_out_dtype(c, a, b, *, out_dtype=None, out=None, **kw):
    if out_dtype is None:
        return _addmm(c, a, b, **kw) if out is None else _addmm(c, a, b, out=out, **kw)
    result = (_mm(a.float(), b.float()) + c.float()).to(out_dtype)
    return result if out is None else out.copy_(result)


torch.addmm = _addmm_out_dtype

FP32_TOL = 1e-5
BRANCH_TOL = 2e-2


def ulp_close(got, want, dtype) -> bool:
    """Within one ulp of `dtype` at each element's magnitude (plus a floor for values near zero)."""
    ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny * 2**10)
    return bool(((got.double() - want.double()).abs() <= ulp.double() * 1.01 + 1e-6).all())


# ---------------------------------------------------------------------------------------------------- attention
# Reference attention ops with the signatures of the aten ops the branches call; layout (batch, heads, seq, dim).


def _attend(q, k, v, bias, scale):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.float()
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.float()), lse


def _attend_grads(dout, q, k, v, bias, scale):
    with torch.enable_grad():
        qq, kk, vv = (t.detach().float().requires_grad_() for t in (q, k, v))
        out, _ = _attend(qq, kk, vv, bias, scale)
        return [g.to(q.dtype) for g in torch.autograd.grad(out, (qq, kk, vv), dout.float())]


def _flash_forward(q, k, v, dropout, causal, debug, scale=None):
    out, lse = _attend(q, k, v, None, scale)
    empty = torch.empty(0)
    return out.to(q.dtype), lse, empty, empty, q.shape[2], k.shape[2], empty, empty, empty


def _flash_backward(dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout, causal, seed, offset, scale=None):
    return tuple(_attend_grads(dout, q, k, v, None, scale))


def _cudnn_forward(q, k, v, bias, compute_lse, dropout, causal, debug, scale=None):
    out, lse = _attend(q, k, v, bias, scale)
    empty = torch.empty(0)
    return out.to(q.dtype), lse[..., None], empty, empty, q.shape[2], k.shape[2], empty, empty, empty


def _cudnn_backward(dout, q, k, v, out, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, dropout, causal,
                    scale=None):
    return tuple(_attend_grads(dout, q, k, v, bias, scale))


torch.ops.aten._scaled_dot_product_flash_attention = _flash_forward
torch.ops.aten._scaled_dot_product_flash_attention_backward = _flash_backward
torch.ops.aten._scaled_dot_product_cudnn_attention = _cudnn_forward
torch.ops.aten._scaled_dot_product_cudnn_attention_backward = _cudnn_backward


# ---------------------------------------------------------------------------------------------------- kernels


def check_layer_norm() -> str:
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for rows, width, affine, out_dtype in [(70, 48, True, torch.float32), (33, 256, True, torch.float32),
                                           (19, 96, False, torch.float32), (41, 160, True, torch.bfloat16),
                                           (23, 1000, True, torch.float32), (9, 1280, True, torch.bfloat16)]:
        x = torch.randn(rows, width, generator=gen, dtype=torch.float64)
        w = torch.randn(width, generator=gen, dtype=torch.float64) if affine else None
        b = torch.randn(width, generator=gen, dtype=torch.float64) if affine else None
        weight, bias = (None if p is None else p.float() for p in (w, b))
        y, stats = fused_norm.norm_forward(x.float(), weight, bias, 1e-5, out_dtype)
        xr = x.clone().requires_grad_()
        params = [p.clone().requires_grad_() for p in (w, b)] if affine else [None, None]
        ref = F.layer_norm(xr, (width,), *params, 1e-5)
        if out_dtype == torch.float32:
            worst = max(worst, rel(y, ref))
            assert rel(y, ref) <= FP32_TOL, ("forward", rows, width, rel(y, ref))
        else:
            assert ulp_close(y.float(), ref.detach().float(), out_dtype), ("forward", rows, width)
        dy = torch.randn(rows, width, generator=gen, dtype=torch.float64)
        res = torch.randn(rows, width, generator=gen, dtype=torch.float64)
        copy = torch.empty(rows, width, dtype=torch.bfloat16)
        dx, dw, db, dres = fused_norm.norm_backward(
            x.float(), dy.float(), weight, stats, affine, residual_grad=res.float(),
            residual_sum=True, dx_copy=copy,
        )
        want = torch.autograd.grad(ref, [xr] + [p for p in params if p is not None], dy)
        for got, ref_grad, name in zip([dx, dw, db], [want[0] + res, *want[1:]], ["dx", "dw", "db"]):
            if got is not None:
                worst = max(worst, rel(got, ref_grad))
                assert rel(got, ref_grad) <= FP32_TOL, (name, rows, width, rel(got, ref_grad))
        assert rel(dres, res.sum(0)) <= FP32_TOL, ("residual sum", rel(dres, res.sum(0)))
        assert ulp_close(copy.float(), dx, torch.bfloat16), "dx copy"
        # What the fused branches keep instead of the input: the normalised rows in fp16, from which the backward
        # computes the same gradients (to fp16's rounding of x_hat) and writes the forward's output again.
        x_hat = torch.empty(rows, width, dtype=torch.float16)
        y2, stats2 = fused_norm.norm_forward(x.float(), weight, bias, 1e-5, out_dtype, x_hat=x_hat)
        assert torch.equal(y2, y) and torch.equal(stats2, stats), "x_hat output changed the forward"
        exact_hat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
        assert ulp_close(x_hat.float(), exact_hat, torch.float16), "x_hat"
        again = torch.empty(rows, width, dtype=out_dtype)
        dx2, dw2, db2, dres2 = fused_norm.norm_backward(
            x_hat, dy.float(), weight, stats, affine, residual_grad=res.float(), residual_sum=True,
            normalized=True, dx_dtype=torch.float32, bias=bias, output=again,
        )
        assert dx2.dtype == torch.float32 and torch.equal(dres2, dres), "normalized backward"
        for got, ref_grad, name in zip([dx2, dw2, db2], [want[0] + res, *want[1:]], ["dx", "dw", "db"]):
            if got is not None:  # fp16's rounding of x_hat (2^-11 relative): measured 2.5e-4 at most
                assert rel(got, ref_grad) <= 1e-3, ("normalized " + name, rows, width, rel(got, ref_grad))
        # Written again from fp16 x_hat: within one rounding to `out_dtype` plus fp16's rounding of x_hat, carried
        # through the affine.
        scaled = (exact_hat * w).abs() if affine else exact_hat.abs()
        allowed = torch.finfo(out_dtype).eps * ref.detach().abs() + 2.0**-11 * scaled
        assert ((again.double() - ref.detach()).abs() <= allowed * 1.01 + 1e-6).all(), "output written again"
    return f"worst {worst:.1e}"


def check_column_sum() -> str:
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for rows, cols, dtype in [(1000, 300, torch.bfloat16), (37, 129, torch.float32), (1, 8, torch.float16),
                              (4099, 256, torch.bfloat16)]:
        x = torch.randn(rows, cols + 16, generator=gen).to(dtype)[:, 8:cols + 8]  # a row stride past the width
        got = fused_norm._launch_column_sum(x, torch.float32)
        want = x.double().sum(0)
        worst = max(worst, rel(got, want))
        assert rel(got, want) <= FP32_TOL, (rows, cols, rel(got, want))
        assert not _COUNTERS.any(), "a launch left its arrival counters set"
    return f"worst {worst:.1e}"


def check_stack_heads_column_sum() -> str:
    """Attention's per-head gradients stacked into a fused QKV projection's output gradient, with that projection's
    bias gradient from the same pass (fused_norm.stack_heads_column_sum): parts laid out as PyTorch's attention
    kernels return them ((batch, heads, length, dim) contiguous, or (batch, length, heads, dim) underneath), or
    as views of one packed tensor; head widths whose column blocks are 128, 64 and 16. The stacked rows are a copy
    (equal to `torch.stack`'s, exactly); the sums within fp32 rounding of the fp64 sums (1e-5)."""
    gen = torch.Generator().manual_seed(13)
    worst = 0.0
    for batch, heads, length, dim, layout in [(2, 3, 37, 128, "bhld"), (3, 2, 20, 64, "blhd"), (1, 4, 70, 48, "packed"),
                                              (2, 1, 9, 16, "bhld")]:
        if layout == "packed":
            packed = torch.randn(batch, length, 3, heads, dim, generator=gen).to(torch.bfloat16)
            parts = [t.transpose(1, 2) for t in packed.unbind(2)]
        elif layout == "blhd":
            parts = [torch.randn(batch, length, heads, dim, generator=gen).to(torch.bfloat16).transpose(1, 2)
                     for _ in range(3)]
        else:
            parts = [torch.randn(batch, heads, length, dim, generator=gen).to(torch.bfloat16) for _ in range(3)]
        stacked, sums = fused_norm._launch_stack_heads(parts)
        want = torch.stack([p.transpose(1, 2) for p in parts], dim=2).reshape(batch * length, -1)
        assert torch.equal(stacked, want), (batch, heads, length, dim, layout)
        error = rel(sums, want.double().sum(0))
        worst = max(worst, error)
        assert sums.dtype == torch.float32 and error <= FP32_TOL, (layout, error)
        assert not _COUNTERS.any(), "a launch left its arrival counters set"
    return f"exact stack; sums worst {worst:.1e}"


def check_activation() -> str:
    gen = torch.Generator().manual_seed(2)
    for gate in (None, "gelu", "silu", "sigmoid"):
        for rows, hidden in [(37, 48), (5, 300)]:
            width = 2 * hidden if gate else hidden
            pre = torch.randn(rows, width, generator=gen).to(torch.bfloat16)
            out = fused_activation.activation_forward(pre, gate)
            p = pre.double().requires_grad_()
            if gate:
                value, g = p.chunk(2, dim=-1)
                ref = value * fused_activation.GATE_ACTIVATIONS[gate](g)
            else:
                ref = F.gelu(p)
            assert ulp_close(out.float(), ref.detach(), torch.bfloat16), ("forward", gate, rows, hidden)
            d_out = torch.randn(rows, hidden, generator=gen).to(torch.bfloat16)
            d_pre, again = fused_activation.activation_backward(d_out, pre, gate, recompute_output=True)
            (want,) = torch.autograd.grad(ref, p, d_out.double())
            assert ulp_close(d_pre.float(), want, torch.bfloat16), ("backward", gate, rows, hidden)
            assert torch.equal(again, out), ("recomputed output", gate)
    return "gelu, gated gelu / silu / sigmoid"


def check_softmax_dropout() -> str:
    """The wide-head attention's softmax (fused_softmax.py): rows longer than one loop step, shorter, and of 3 keys
    (shorter than the smallest step), bf16 and fp16 scores, a key mask with a fully padded tail, dropout on and off,
    row sums on and off.

    - Probabilities (the undropped ones, kept for backward) within one ulp of the fp64 softmax.
    - Under dropout each entry is 0 or the kept probability scaled by 1/(1-p), and about p of the valid entries are
      dropped; masked keys get nothing.
    - Row sums: those of the returned entries before their rounding to bf16, to fp32 rounding.
    - Gradients (of the probabilities and of the row sums): within one ulp of the kernel's formula evaluated in fp64
      from the bf16 tensors it keeps; and, for rows of 64 keys and more, within 1e-2 relative of autograd of the fp64
      expression with the same dropout mask (worst measured 6.7e-3: the interpreter's conversions to bf16 truncate;
      the GPU test, rounding to nearest, allows 6e-3)."""
    from hf_flash_perceiver import fused_softmax

    gen = torch.Generator().manual_seed(11)
    worst = 0.0
    bf16, fp16 = torch.bfloat16, torch.float16
    for batch, rows, n, masked, p, sums, dtype in [
        (2, 3, 5000, True, 0.25, True, bf16), (3, 2, 300, False, 0.0, False, bf16), (2, 4, 70, True, 0.0, True, bf16),
        (1, 2, 9000, False, 0.1, False, bf16), (8, 50, 3, False, 0.25, True, bf16), (2, 3, 700, True, 0.1, True, fp16),
    ]:
        scores = (torch.randn(batch, rows, n, generator=gen) * 3).to(dtype)
        mask = None
        if masked:
            mask = torch.rand(batch, n, generator=gen) < 0.8
            mask[0, n // 2:] = False
        ss = scores.clone().requires_grad_()
        dropped, row_sums = fused_softmax._SoftmaxDropout.apply(ss, mask, p, sums)
        probs = dropped.grad_fn.saved_tensors[0].view(batch, rows, n)
        s64 = scores.double().requires_grad_()
        logits = s64 if mask is None else s64.masked_fill(~mask[:, None, :], float("-inf"))
        ref = torch.softmax(logits, -1)
        assert dropped.dtype == probs.dtype == dtype
        assert ulp_close(probs.float(), ref.detach(), dtype), ("probabilities", n, p)
        if mask is not None:
            assert not dropped[~mask[:, None, :].expand_as(dropped)].any(), "a masked key took probability"
        keep = torch.ones_like(ref, dtype=torch.bool)
        if p > 0:
            keep = dropped != 0
            scaled = (probs.double() / (1 - p)).to(dtype)
            assert torch.equal(dropped[keep], scaled[keep]) or ulp_close(
                dropped[keep].float(), probs[keep].double() / (1 - p), dtype), ("kept entries", n)
            valid = (ref > 0)
            count = valid.sum().item()
            rate = 1 - (keep & valid).sum().item() / count
            # The seed comes from PyTorch's unseeded generator, so the rate is a fresh binomial draw each run: within
            # five of its standard deviations (a false alarm about once in two million runs, not a few percent).
            assert abs(rate - p) <= 5 * (p * (1 - p) / count) ** 0.5, ("drop rate", rate, p, count)
        want = ref * keep / (1 - p)
        if sums:  # of the fp32 values before their rounding to bf16
            assert rel(row_sums, want.sum(-1)) <= FP32_TOL, ("row sums", n)
        g = torch.randn(batch, rows, n, generator=gen).to(dtype)
        d_sums = torch.randn(batch, rows, generator=gen) if sums else None
        saved = dropped.grad_fn.saved_tensors
        loss = (dropped.float() * g.float()).sum() + ((row_sums * d_sums).sum() if sums else 0)
        loss.backward()
        ref_loss = (want * g.double()).sum() + ((want.sum(-1) * d_sums.double()).sum() if sums else 0)
        (want_grad,) = torch.autograd.grad(ref_loss, s64)
        # The kernel's formula, in fp64 from the half-precision tensors it keeps: within one ulp of its output.
        kept_probs, kept_dropped = (t.double().view(batch, rows, n) for t in saved)
        total_g = g.double() + (d_sums.double()[..., None] if sums else 0)
        formula = kept_dropped * total_g - kept_probs * (kept_dropped * total_g).sum(-1, keepdim=True)
        assert ss.grad.dtype == dtype and ulp_close(ss.grad.float(), formula, dtype), ("gradient formula", n, p, sums)
        if n >= 64:  # a handful of keys per row: cancellation makes the relative error of the whole meaningless
            error = rel(ss.grad, want_grad)
            worst = max(worst, error)
            assert error <= 1e-2, ("gradient", n, p, sums, error)
    return f"gradients worst {worst:.1e}"


def check_shared_key_value_attention() -> str:
    """`softmax(q x^T) x` as one autograd node (fused_softmax.py, the absorbed cross-attention's core): output, row
    sums and the gradients of `q` and `x` (the latter from both GEMMs, accumulated by the second) against autograd of
    the fp64 expression with the same dropout mask, in bf16 within 2e-2 (the branches' bound; the row sums too: the
    scores are a bf16 GEMM's)."""
    from hf_flash_perceiver import fused_softmax

    gen = torch.Generator().manual_seed(12)
    worst = 0.0
    for masked, p, sums in [(True, 0.2, True), (False, 0.0, False)]:
        q = (torch.randn(2, 6, 40, generator=gen) * 0.3).to(torch.bfloat16).requires_grad_()
        x = torch.randn(2, 700, 40, generator=gen).to(torch.bfloat16).requires_grad_()
        mask = None
        if masked:
            mask = torch.rand(2, 700, generator=gen) < 0.6
            mask[1, :500] = False
        mixed, row_sums = fused_softmax._SharedKeyValueAttention.apply(q, x, mask, p, sums)
        dropped = mixed.grad_fn.saved_tensors[3]
        keep = dropped != 0 if p > 0 else torch.ones(dropped.shape, dtype=torch.bool)
        g = torch.randn(mixed.shape, generator=gen).to(torch.bfloat16)
        d_sums = torch.randn(2, 6, generator=gen) if sums else None
        ((mixed.float() * g.float()).sum() + ((row_sums * d_sums).sum() if sums else 0)).backward()
        q64, x64, want_dropped, want = shared_key_value_reference(q, x, mask, keep, p)
        ref_loss = (want * g.double()).sum() + ((want_dropped.sum(-1) * d_sums.double()).sum() if sums else 0)
        want_q, want_x = torch.autograd.grad(ref_loss, (q64, x64))
        for name, got, ref in [("output", mixed, want), ("q", q.grad, want_q), ("x", x.grad, want_x)]:
            error = rel(got, ref)
            worst = max(worst, error)
            assert error <= BRANCH_TOL, (name, masked, error)
        if sums:
            assert rel(row_sums, want_dropped.sum(-1)) <= BRANCH_TOL, "row sums"  # of bf16 scores
    return f"worst {worst:.1e}"


def check_fold_affine() -> str:
    gen = torch.Generator().manual_seed(3)
    worst = 0.0
    for rows, cols, bias in [(40, 7, True), (130, 96, False)]:
        w = torch.randn(rows, cols, generator=gen, requires_grad=True)
        b = torch.randn(rows, generator=gen, requires_grad=True) if bias else None
        g = torch.randn(cols, generator=gen, requires_grad=True)
        beta = torch.randn(cols, generator=gen, requires_grad=True)
        ref_w, ref_b = fold_norm_affine(g, beta, w, b)
        got_w, got_b = fused_norm.fold_affine(w.detach(), None if b is None else b.detach(), g.detach(),
                                              beta.detach(), torch.float32)
        worst = max(worst, rel(got_w, ref_w), rel(got_b, ref_b))
        assert rel(got_w, ref_w) <= FP32_TOL and rel(got_b, ref_b) <= FP32_TOL, ("fold", rows, cols)
        d_w, d_b = torch.randn(rows, cols, generator=gen), torch.randn(rows, generator=gen)
        want = torch.autograd.grad((ref_w, ref_b), [g, beta, w], (d_w, d_b))
        got = fused_norm.unfold_affine_grads(d_w, d_b, w.detach(), g.detach(), beta.detach())
        for name, a, e in zip(["d_norm_weight", "d_norm_bias", "d_weight"], got, want):
            worst = max(worst, rel(a, e))
            assert rel(a, e) <= FP32_TOL, (name, rows, cols, rel(a, e))
    return f"worst {worst:.1e}"


def check_residual_add() -> str:
    gen = torch.Generator().manual_seed(4)
    x2 = torch.randn(37, 64, generator=gen)
    a = torch.randn(37, 96, generator=gen).to(torch.bfloat16)
    w = torch.randn(64, 96, generator=gen).to(torch.bfloat16)
    b = torch.randn(64, generator=gen)
    got = fused_block._residual_add(x2, a, w, b)
    want = x2.double() + (a.float() @ w.float().t()).to(torch.bfloat16).double() + b.double()
    assert rel(got, want) <= FP32_TOL, rel(got, want)
    return f"{rel(got, want):.1e}"


def check_concat_positions() -> str:
    """Tokens with batch-shared positions (fused_concat.py): widths that are and are not powers of two, a row count
    that is not a multiple of a program's rows, both dtypes of the adapters. A copy: equal to `torch.cat`, exactly;
    backward: the tokens' slice of the gradient, exactly, and the positions' slice summed over the batch."""
    from hf_flash_perceiver import fused_concat

    gen = torch.Generator().manual_seed(12)
    worst = 0.0
    for batch, n, c, p, dtype in [(3, 13, 256, 256, torch.bfloat16), (2, 37, 7, 258, torch.float32),
                                  (1, 5, 64, 3, torch.float16)]:
        tokens = torch.randn(batch, n, c, generator=gen).to(dtype).requires_grad_()
        positions = torch.randn(n, p, generator=gen).to(dtype).requires_grad_()
        got = fused_concat._ConcatPositions.apply(tokens, positions)
        want = torch.cat([tokens, positions.expand(batch, -1, -1)], dim=-1)
        assert got.shape == want.shape and torch.equal(got, want), (batch, n, c, p)
        g = torch.randn(want.shape, generator=gen).to(dtype)
        got_grads = torch.autograd.grad(got, (tokens, positions), g)
        assert torch.equal(got_grads[0], g[..., :c]), "tokens' gradient"
        # The positions' gradient is a sum over the batch: to the rounding of its dtype, against fp64.
        error = rel(got_grads[1], g[..., c:].double().sum(0))
        assert error <= torch.finfo(dtype).eps, ("positions' gradient", error)
        worst = max(worst, error / torch.finfo(dtype).eps)
    return f"exact copy; positions' gradient worst {worst:.2f} eps"


# ---------------------------------------------------------------------------------------------------- branches


def _block_model(seed: int, **overrides):
    """A small model whose parameters are all away from their initialisation (core_common.build), in training."""
    config = small_config(**{**dict(input_dim=24, depth=1, num_latents=16, latent_dim=64, cross_heads=2,
                                    cross_head_dim=32, latent_heads=2, latent_head_dim=32), **overrides})
    return build(config, "sdpa", seed).train()


def _grads(out, inputs, gy):
    return torch.autograd.grad(out, list(inputs), gy, allow_unused=True)


def _keeps_no_input_copy(y, x, module) -> None:
    """A fused branch keeps its input as the fp16 normalised rows, and no fp32 copy of it (the branches here compute
    in bf16: their other activations of that size are bf16; `module`'s parameters are not activations)."""
    params = {p.data_ptr() for p in module.parameters()}
    kept = [t.dtype for t in y.grad_fn.saved_tensors
            if t is not None and t.numel() == x.numel() and t.data_ptr() not in params]
    assert kept.count(torch.float16) == 1 and torch.float32 not in kept, kept


def _against_reference(y, ref, named) -> tuple[float, tuple]:
    """A branch's output `y` and the gradients of its `(name, input)` pairs against its fp32 reference `ref`, for one
    random output gradient: the worst relative error, and the branch's gradients."""
    names, inputs = zip(*named)
    gy = torch.randn_like(ref)
    got = _grads(y, inputs, gy)
    assert rel(y, ref) <= BRANCH_TOL, ("output", rel(y, ref))
    return max(rel(y, ref), _compare(got, _grads(ref, inputs, gy), names, BRANCH_TOL)), got


def _compare(got, want, names, tol) -> float:
    worst = 0.0
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None or not g.any(), name
            continue
        assert g is not None and torch.isfinite(g).all(), name
        worst = max(worst, rel(g, w))
        assert rel(g, w) <= tol, (name, rel(g, w))
    return worst


def check_mlp_branch() -> str:
    worst = 0.0
    for seed, gated, residual in [(0, True, True), (1, False, True), (2, True, False)]:
        block = _block_model(seed, gated_mlp=gated, mlp_residual=residual).encoder.self_layers[0][0]
        norm, mlp = block.norm2, block.mlp
        x = torch.randn(3, 16, 64, requires_grad=True)
        gate = mlp.gate_activation_name if mlp.gated else None
        copies = tuple(fused_block.cast_tensors(torch.bfloat16, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                                                mlp.fc2.bias))
        y = fused_block._MLPBranch.apply(x, norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                                         mlp.fc2.bias, norm.eps, gate, residual, copies, None, None, None)
        ref = mlp(norm(x)) + (x if residual else 0)
        named = [("x", x), *norm.named_parameters(prefix="norm"), *mlp.named_parameters(prefix="mlp")]
        _keeps_no_input_copy(y, x, block)
        worst = max(worst, _against_reference(y, ref, named)[0])
    return f"worst {worst:.1e}"


def check_self_attention_branch() -> str:
    worst = 0.0
    for seed, heads, head_dim, bias in [(0, 2, 32, False), (1, 4, 16, True)]:
        block = _block_model(seed, latent_heads=heads, latent_head_dim=head_dim,
                             latent_qkv_bias=bias).encoder.self_layers[0][0]
        norm, attn = block.norm1, block.attn
        x = torch.randn(3, 16, 64, requires_grad=True)
        copies = tuple(fused_block.cast_tensors(torch.bfloat16, attn.qkv_proj.weight, attn.qkv_proj.bias,
                                                attn.o_proj.weight, attn.o_proj.bias))
        y = fused_block._SelfAttentionBranch.apply(
            x, norm.weight, norm.bias, attn.qkv_proj.weight, attn.qkv_proj.bias, attn.o_proj.weight, attn.o_proj.bias,
            norm.eps, heads, head_dim, 0.0, copies, None, None, None,
        )
        ref = x + attn(norm(x))[0]
        named = [("x", x), *norm.named_parameters(prefix="norm"), *attn.named_parameters(prefix="attn")]
        _keeps_no_input_copy(y, x, block)
        worst = max(worst, _against_reference(y, ref, named)[0])
    return f"worst {worst:.1e}"


def check_cross_attention_branch() -> str:
    """Unmasked (the flash op) and masked (the cuDNN op with the mask's key bias; a sample without any valid key
    gets no attention output, padded tokens no gradient), with and without the input norm folded into kv_proj."""
    worst = 0.0
    for seed, masked, input_norm, residual in [(0, False, True, True), (1, True, True, True),
                                               (2, True, False, False)]:
        block = _block_model(seed, cross_qkv_bias=True, cross_input_norm=input_norm,
                             cross_query_residual=residual).encoder.cross_layers[0]
        norm, attn, cn = block.norm1, block.attn, block.context_norm
        x = torch.randn(4, 16, 64, requires_grad=True)
        x_in = torch.randn(4, 30, 24, requires_grad=True)
        mask = torch.arange(30)[None] < torch.tensor([30, 17, 3, 0])[:, None] if masked else None
        context = CrossInput(x_in, None if mask is None else KeyPaddingMask.from_mask(mask))
        y = fused_block.cross_attention_branch(norm, attn, x, context, cn, torch.bfloat16, residual)
        ref = attn(norm(x), CrossInput(x_in, context.mask), input_norm=cn)[0] + (x if residual else 0)
        _keeps_no_input_copy(y, x, block)
        error, got = _against_reference(y, ref, [("x", x), ("x_in", x_in), *block.named_parameters()])
        worst = max(worst, error)
        if masked:  # exactly: no padded token (nor any token of the sample without keys) reaches the output
            assert not got[1][~mask].any() and not got[1][3].any(), "padded tokens took a gradient"
    return f"worst {worst:.1e}"


def check_backward_copies() -> str:
    """A block's fused branches given its `BackwardCopies` (as `PerceiverBlock` runs them) keep no half-precision
    weight copy for backward: the backward converts the block's weights again, once for both branches, and drops
    them after; the values are those of the branches that keep their copies (to fp32 rounding: the same conversion
    of the same weights, through GEMMs on other buffers)."""
    from hf_flash_perceiver import weight_cast

    block = _block_model(7, latent_qkv_bias=True).encoder.self_layers[0][0]
    params = [p for p in block.parameters()]
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(7), requires_grad=True)
    conversions = [0]
    cast = weight_cast.cast_tensors

    def counted(*args):
        conversions[0] += 1
        return cast(*args)

    def step(recast):
        y = fused_block.self_attention_branch(block.norm1, block.attn, x, torch.bfloat16, recast)
        y = fused_block.mlp_branch(block.norm2, block.mlp, y, torch.bfloat16, True, recast)
        return y, _grads(y, [x, *params], torch.ones_like(y))

    want_y, want = step(None)
    recast = weight_cast.BackwardCopies(torch.bfloat16)
    weight_cast.cast_tensors = counted
    try:
        y = fused_block.self_attention_branch(block.norm1, block.attn, x, torch.bfloat16, recast)
        y = fused_block.mlp_branch(block.norm2, block.mlp, y, torch.bfloat16, True, recast)
        half = [t for node in (y.grad_fn, y.grad_fn.next_functions[0][0]) for t in node.saved_tensors
                if t is not None and t.dtype == torch.bfloat16 and t.dim() == 2 and t.shape[1] == 64
                and t.shape[0] != x.shape[0] * x.shape[1]]
        assert not half, [tuple(t.shape) for t in half]  # no (out, 64) weight copy kept
        assert recast._copies is None
        in_forward = conversions[0]  # the forward's own (one per branch here, outside an encoder's shared scope)
        got = _grads(y, [x, *params], torch.ones_like(y))
    finally:
        weight_cast.cast_tensors = cast
    assert conversions[0] == in_forward + 1 and recast._copies is None, (conversions, in_forward)
    worst = rel(y, want_y)
    assert worst <= FP32_TOL, ("output", worst)
    for name, g, w in zip(["x", *(n for n, _ in block.named_parameters())], got, want):
        if w is not None:
            worst = max(worst, rel(g, w))
            assert rel(g, w) <= FP32_TOL, (name, rel(g, w))
    return f"one conversion in backward, worst {worst:.1e}"


def check_fused_model() -> str:
    """A whole model (2 cross-attentions, 2 self-attentions each, shared latent stacks) with every branch fused, as a
    GPU replay runs it: the routing, the weights converted once per forward, and the half-precision gradient handed
    from branch to branch. In float16 (its three more mantissa bits keep the check far from its bound, where bf16
    rounding through eight blocks came within 85 % of it), against the fp32 module path, next to the fp16 module path
    (CPU autocast): the fused path must be about as accurate as the path it replaces (within twice its error, or
    5e-3 for the output and 1e-2 for gradients where those are larger; measured: 1.4e-3 and at most 1.9e-3, the fp16
    module path's 1.5e-3 and 2.1e-3). Then as a captured encoder runs it (shared_gradients.summed): the shared
    stacks' parameter gradients summed as they are made, every one of their weight GEMMs after a stack's first call
    accumulating into the sum, and the same gradients as autograd's sums to fp32 rounding (1e-5; the order of the
    additions differs)."""
    from hf_flash_perceiver import shared_gradients

    import hf_flash_perceiver.encoder as encoder
    import hf_flash_perceiver.layers as layers

    model = _block_model(5, depth=2, self_per_cross_attn=2, latent_stack_repeats=2, latent_qkv_bias=True)
    x = torch.randn(3, 30, 24, generator=torch.Generator().manual_seed(5), requires_grad=True)
    calls = {"branches": 0, "handed": 0}
    half_grad = fused_block._half_grad

    def counted_half_grad(dy, dy2, dtype):
        copy = half_grad(dy, dy2, dtype)
        handed = getattr(dy, fused_block._HALF_COPY, None)
        calls["handed"] += handed is not None and copy is handed[0]
        return copy

    def counting(branch):
        def run(*args, **kwargs):
            calls["branches"] += 1
            return branch(*args, **kwargs)
        return run

    recasts = []  # the blocks' BackwardCopies: (made, conversions in backward)

    class CountedCopies(layers.BackwardCopies):
        def __init__(self, dtype):
            super().__init__(dtype)
            self.conversions = 0
            recasts.append(self)

        def take(self, part):
            self.conversions += self._copies is None
            return super().take(part)

    sums_log = {"gemm": 0, "accumulated": 0, "add": 0, "take": 0}

    class CountedSums(shared_gradients.GradientSums):
        def gemm(self, slot, dy, x, grad_dtype):
            sums_log["gemm"] += 1
            sums_log["accumulated"] += isinstance(self._sums[slot], torch.Tensor)
            return super().gemm(slot, dy, x, grad_dtype)

        def add(self, slot, grad):
            sums_log["add"] += 1
            return super().add(slot, grad)

        def take(self):
            sums_log["take"] += 1
            return super().take()

    def step(fused: bool, autocast: bool, summed: bool = False):
        saved = (layers.fused_dtype, encoder.fused_dtype, fused_block._half_grad, layers.self_attention_branch,
                 layers.cross_attention_branch, layers.mlp_branch, layers.BackwardCopies)
        if fused:  # off CUDA no branch fuses: route every fitting branch, in float16
            layers.fused_dtype = encoder.fused_dtype = lambda t: torch.float16
            fused_block._half_grad = counted_half_grad
            layers.self_attention_branch, layers.cross_attention_branch, layers.mlp_branch = (
                counting(b) for b in saved[3:6])
            layers.BackwardCopies = CountedCopies
        try:
            model.zero_grad(set_to_none=True)
            x.grad = None
            with torch.autocast("cpu", dtype=torch.float16, enabled=autocast), (
                    shared_gradients.summed() if summed else contextlib.nullcontext()):
                out = model(x).last_hidden_state
            out.float().square().mean().backward()
        finally:
            (layers.fused_dtype, encoder.fused_dtype, fused_block._half_grad, layers.self_attention_branch,
             layers.cross_attention_branch, layers.mlp_branch, layers.BackwardCopies) = saved
        grads = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in model.named_parameters()}}
        return out.detach().float(), grads

    ref_out, ref = step(fused=False, autocast=False)
    module_out, module = step(fused=False, autocast=True)
    out, got = step(fused=True, autocast=False)
    assert rel(out, ref_out) <= max(5e-3, 2 * rel(module_out, ref_out)), ("output", rel(out, ref_out))
    margin = []  # (error / allowed, name, error, the bf16 module path's error)
    for name, want in ref.items():
        err, module_err = rel(got[name], want), rel(module[name], want)
        margin.append((err / max(1e-2, 2 * module_err), name, err, module_err))
        assert torch.isfinite(got[name]).all() and err <= max(1e-2, 2 * module_err), (name, err, module_err)
    # 2 cross blocks and 2 x 2 x 2 self blocks, each an attention and an MLP branch; every branch after the first
    # takes its input from the branch before, so all but the last-run backward read a handed half copy.
    assert calls["branches"] == 2 * (1 + 2 * 2) * 2, calls
    assert calls["handed"] >= calls["branches"] - 2, calls
    # The two cross-attention blocks, each called once, convert their weights again in backward, once each, and drop
    # them; the self-attention blocks of the repeated stacks keep the copies that serve both repeats.
    assert [r.conversions for r in recasts] == [1, 1] and all(r._copies is None for r in recasts), recasts
    # Summed as a captured encoder sums them: 2 blocks x 2 self layers, each called twice, 4 weights each.
    saved_sums = shared_gradients.GradientSums
    shared_gradients.GradientSums = CountedSums
    try:
        summed_out, summed_grads = step(fused=True, autocast=False, summed=True)
    finally:
        shared_gradients.GradientSums = saved_sums
    assert torch.equal(summed_out, out), "the forward changed"
    assert sums_log["take"] == 1 and sums_log["gemm"] == 2 * 2 * 2 * 4 and sums_log["accumulated"] == 16, sums_log
    assert sums_log["add"] == 2 * 2 * 2 * 8, sums_log  # each call: 2 norms x (weight, bias), qkv, o, fc1, fc2 biases
    for name, want in got.items():
        assert rel(summed_grads[name], want) <= FP32_TOL, (name, rel(summed_grads[name], want))
    closest = max(margin)
    return (f"output {rel(out, ref_out):.1e} (fp16 module path {rel(module_out, ref_out):.1e}); closest gradient "
            f"{closest[1]}: {closest[2]:.1e} against the module path's {closest[3]:.1e} ({closest[0]:.0%} of allowed)")


CHECKS = {name.removeprefix("check_"): fn for name, fn in list(globals().items()) if name.startswith("check_")}


def main() -> None:
    results = {}
    for name, check in CHECKS.items():
        try:
            results[name] = {"ok": True, "detail": check()}
        except Exception:  # reported per check, so that one failure does not hide the others
            results[name] = {"ok": False, "detail": traceback.format_exc(limit=6)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()

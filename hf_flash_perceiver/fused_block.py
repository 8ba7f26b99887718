"""The latent path's residual branches, each as one autograd node on CUDA in half precision.

`x + Attn(LN(x))` (the latents' self-attention, or their cross-attention to an input) and `x + MLP(LN(x))` run as a
short fixed sequence of kernels with a backward written out: the LayerNorm and the MLP activation are Triton kernels
(the LayerNorm's backward also adds the residual gradient and sums it over the rows, which is the output
projection's bias gradient; the activation's backward writes the activation's output again, so the MLP keeps only
its first projection's output), projections are single GEMMs on weights converted once per forward (the encoder
converts every branch's together; the cross-attention folds its input norm into the key/value projection by one
kernel), the residual add takes the output projection's bias in one vectorised kernel, attention is PyTorch's cuDNN
(or FlashAttention-2) kernel called directly, and weight and bias gradients come out of the GEMMs and one-kernel
column sums in fp32, so no cast kernels follow them; a branch hands its input gradient on in half precision too, for
the branch below. Of its input a branch keeps only the normalised rows, in fp16, for its backward (which writes the
norm's output again from them, in the LayerNorm backward kernel): not the fp32 residual stream and the norm's output,
which the module path keeps. Built module by module, the same branch launches about three times as many kernels, each
with its own autograd, autocast and Python overhead: that overhead, not the GPU, bounds an eager training step of the
Perceiver's small latent arrays.

The values are those of the modules under autocast up to rounding order (weight gradients are better: they skip
the round trip through the half-precision dtype). [`PerceiverBlock`] takes this path only where it computes the
same function: CUDA, autocast (or half-precision weights), plain `nn.Linear` projections and LayerNorms (not
PEFT-wrapped or hooked ones), no attention maps, no rotary, the sdpa/varlen backends (a padded input to a
cross-attention: sdpa, through cuDNN), no chunked or context-parallel input, and not under `torch.compile` (Inductor
fuses the module path itself). Attention dropout is the attention kernel's own, as SDPA's is on the module path.
Everything else, and every CPU, runs the modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import Tensor, nn

from .attention_backends import CUDNN_AVAILABLE, FUSED_MAX_HEAD_DIM, flash_beats_cudnn
from .cross_attention import CrossInput, _fused_backward, _fused_forward
from .fused_activation import activation_backward, activation_forward
from .fused_norm import (
    FusedLayerNorm,
    column_sum,
    fold_affine,
    norm_backward,
    norm_forward,
    stack_heads,
    stack_heads_column_sum,
    tl,
    triton,
    unfold_affine_grads,
)
from .shared_gradients import GradientSums
from .shared_gradients import current as current_sums
from .weight_cast import BackwardCopies, cast_tensors, plain, shared_copies

# "auto": fuse branches with enough work per launch (below); True: every branch that fits; False (default): the
# module path everywhere. Read in each forward; `fused_branches(...)` below sets it for a block of code.
# Why opt-in: fused, a step launches about a quarter fewer kernels and keeps the GPU busy up to a third less, but each
# Triton kernel is launched from Python at several times the host cost of a PyTorch op, and eager steps of these
# models are host-bound, so wall time improves only where device time dominates (wide latents, large batches).
enabled: bool | str = False

# A fused branch trades many cheap C++ launches for a few Python-launched ones: it saves device time in proportion to
# the branch's work (about rows x width^2) but costs a fixed host time. Below this much work per branch an eager step
# is bound by launch overhead, and the module path is the faster of the two. Above it fusing can still lose where the
# whole step stays host-bound (the pretrained vision shape clears this bar and ran slower fused): a necessary
# condition, not a sufficient one, which is why "auto" is not the default.
MIN_WORK = 2**32

HALF = (torch.bfloat16, torch.float16)


@contextmanager
def fused_branches(setting: bool | str = True) -> Iterator[None]:
    """Run the enclosed forwards with `enabled = setting` (True, "auto" or False), restoring the previous value after,
    even on error. The setting is read in the forward, where each branch picks its path; a backward outside the block
    follows the path its forward took."""
    global enabled
    if setting not in (True, False, "auto"):
        raise ValueError(f"fused_branches takes True, False or 'auto', got {setting!r}.")
    previous, enabled = enabled, setting
    try:
        yield
    finally:
        enabled = previous


def fused_dtype(x: Tensor) -> torch.dtype | None:
    """The half-precision dtype a fused branch would compute `x` in, or None when the fused path does not apply
    (off CUDA, no Triton, fp32 compute, under torch.compile)."""
    if not enabled or triton is None or not x.is_cuda or torch.compiler.is_compiling():
        return None
    if enabled == "auto" and x.numel() * x.shape[-1] < MIN_WORK:
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype if dtype in HALF and x.dtype in (torch.float32, *HALF) else None


def _plain(norm: nn.Module, *linears: nn.Module) -> bool:
    # A LayerNorm and `nn.Linear`s, none subclassed or hooked: the branch computes with their weights and never calls
    # them, so it must not stand in for a module whose call does more.
    return any(plain(norm, cls) for cls in (FusedLayerNorm, nn.LayerNorm)) and all(plain(m, nn.Linear) for m in linears)


@lru_cache(maxsize=None)
def _takes_wide_heads(device_index: int) -> bool:
    # cuDNN's attention takes heads up to FUSED_MAX_HEAD_DIM (256) wide forward and backward on Hopper and later (the
    # language Perceiver's 160-wide latent heads, say), as does FlashAttention-2, the fallback; 128 is what both take
    # on every GPU.
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _head_dim_fits(head_dim: int, weight: Tensor) -> bool:
    if head_dim <= 128:
        return True
    if head_dim > FUSED_MAX_HEAD_DIM or not weight.is_cuda:
        return False
    return _takes_wide_heads(weight.device.index if weight.device.index is not None else torch.cuda.current_device())


def _attention_fits(attn: nn.Module, output_attentions: bool, weight: Tensor) -> bool:
    # What both attention branches need: a kernel they call directly takes the call (one head width that it
    # supports, no rotary, a backend whose kernels these are) and no attention map is asked for.
    return (
        not output_attentions
        and attn.rotary is None
        and (attn.config._attn_implementation or "sdpa") in ("sdpa", "varlen")
        and attn.head_dim == attn.v_head_dim
        and attn.head_dim % 8 == 0
        and _head_dim_fits(attn.head_dim, weight)
    )


def self_attention_fits(norm: nn.Module, attn: nn.Module, output_attentions: bool) -> bool:
    """Whether `x + attn(norm(x))` of a [`PerceiverSelfAttention`] runs fused: see the module docstring."""
    return _attention_fits(attn, output_attentions, attn.qkv_proj.weight) and _plain(norm, attn.qkv_proj, attn.o_proj)


def cross_attention_fits(norm: nn.Module, attn: nn.Module, context_norm: nn.Module | None,
                         output_attentions: bool) -> bool:
    """Whether `x + attn(norm(x), input)` of a [`PerceiverCrossAttention`] runs fused for any input (see
    [`cross_input_fits`] for the input's part): besides the self-attention's conditions, the regular path (not the
    chunked one) and an input side computed from the weights of `kv_proj` and the input norm (folded)."""
    affine = context_norm is None or (context_norm.weight is None) == (context_norm.bias is None)
    return (
        not attn.spec.chunked
        and affine
        and attn.folds(context_norm)
        and _attention_fits(attn, output_attentions, attn.q_proj.weight)
        and _plain(norm, attn.q_proj, attn.o_proj)
    )


def cross_input_fits(attn: nn.Module, context: CrossInput) -> bool:
    """The input's part of [`cross_attention_fits`]: not a context-parallel shard, and a padding mask only where the
    module path would run cuDNN's attention with it too (the `sdpa` backend, heads up to 128 wide; `varlen` packs the
    keys instead)."""
    if context.shard is not None:
        return False
    if context.mask is None:
        return True
    return (
        (attn.config._attn_implementation or "sdpa") == "sdpa"
        and attn.head_dim <= 128
        and CUDNN_AVAILABLE
        and torch.backends.cuda.cudnn_sdp_enabled()
    )


def mlp_fits(norm: nn.Module, mlp: nn.Module) -> bool:
    """Whether `x + mlp(norm(x))` runs fused: see the module docstring."""
    return _plain(norm, mlp.fc1, mlp.fc2)


# ---------------------------------------------------------------------------------------------------- projections


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _linear_backward(dy: Tensor, x: Tensor, weight: Tensor, grad_dtype: torch.dtype, want_x: bool, want_w: bool,
                     want_b: bool, into: tuple[GradientSums, int] | None = None
                     ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`(dx, d_weight, d_bias)` of `x @ weight.T + bias` from the half-precision `dy`; the parameter gradients in
    `grad_dtype` (the parameters' own), straight from the GEMM / reduction. Given `into` (a [`GradientSums`] and the
    weight's slot there), the weight gradient's GEMM adds to that sum instead, and `d_weight` is None."""
    dx = torch.mm(dy, weight) if want_x else None
    dw = db = None
    if want_w and into is not None:
        into[0].gemm(into[1], dy, x, grad_dtype)
    elif want_w:
        dw = torch.mm(dy.t(), x, out_dtype=grad_dtype) if grad_dtype != dy.dtype else torch.mm(dy.t(), x)
    if want_b:
        db = column_sum(dy, grad_dtype)
    return dx, dw, db


_ADD_BLOCK = 2048


def _residual_add(x2: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`x2 + a @ weight.T + bias`, a residual stream `x2` (in its dtype) plus a projection (GEMM in the compute
    dtype): the sum and the bias in fp32 by one vectorised kernel rather than the GEMM's bias epilogue and PyTorch's
    add of two dtypes, which is not vectorised."""
    o = torch.mm(a, weight.t())
    if not x2.is_contiguous():
        return torch.add(x2, o if bias is None else o + bias.to(o.dtype))
    y = torch.empty_like(x2)
    _add_rows[(triton.cdiv(x2.numel(), _ADD_BLOCK),)](
        x2, o, bias if bias is not None else x2, y, x2.numel(), x2.shape[1], HAS_BIAS=bias is not None,
        BLOCK=_ADD_BLOCK, num_warps=4,
    )
    return y


if triton is not None:

    @triton.jit
    def _add_rows(X, O, B, Y, n, width, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        y = tl.load(X + i, mask=ok, other=0.0).to(tl.float32) + tl.load(O + i, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(B + i % width, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + i, y.to(Y.dtype.element_ty), mask=ok)


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---------------------------------------------------------------------------------------------------- attention


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout: float, bias: Tensor | None = None,
                       flash: bool = False) -> tuple[Tensor, Tensor, tuple]:
    # cuDNN where available (what SDPA picks on Hopper for these shapes), else FlashAttention-2 (or where `flash`
    # asks for it: a few query tiles over a long input); a key bias (padding mask) always goes to cuDNN. Each keeps
    # the log-sum-exp for the backward and, under dropout, the RNG seed and offset the backward regenerates the mask
    # from.
    if bias is None and not flash and CUDNN_AVAILABLE and torch.backends.cuda.cudnn_sdp_enabled():
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, dropout, False, False,
                                                                  scale=scale)
        return res[0], res[1], ("cudnn", *res[2:8])
    out, lse, aux = _fused_forward(q, k, v, bias, scale, dropout)
    return out, lse, ("fused", *aux)


def _attention_backward(dout, q, k, v, out, lse, aux, scale, dropout, bias=None) -> tuple[Tensor, Tensor, Tensor]:
    if aux[0] == "fused":
        return _fused_backward(dout, q, k, v, out, lse, bias, scale, aux[1:], dropout)
    _, cum_q, cum_k, max_q, max_k, seed, offset = aux
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, dropout, False, scale=scale
    )


def _like_output(dout: Tensor, out: Tensor) -> Tensor:
    # The kernels' backward reads the output gradient in the output's layout.
    return dout if dout.stride() == out.stride() else torch.empty_like(out).copy_(dout)


# ---------------------------------------------------------------------------------------------------- branches
# A branch's backward needs the gradient of its output twice: in fp32, added to the input gradient, and in half
# precision, for the output projection's GEMMs. Where a branch's input is another fused branch's output (the latent
# stream from block to block), the LayerNorm backward kernel that writes the input gradient also writes its half
# precision copy, and the copy travels with the gradient to the branch below, which then converts nothing. The copy
# is used only while the gradient is the very tensor it was written beside and unmodified (autograd passes a lone
# gradient on as it is; a sum with another gradient, or a hook, makes another tensor or bumps its version).
_HALF_COPY = "_hf_flash_perceiver_half_copy"


def _takes_branch_output(x: Tensor) -> bool:
    # In forward: whether `x` comes straight out of a fused branch, whose backward will read the half copy.
    return x.grad_fn is not None and type(x.grad_fn) in _BRANCH_BACKWARDS


def _half_grad(dy: Tensor, dy2: Tensor, dtype: torch.dtype) -> Tensor:
    """`dy2` (the rows of `dy`) in `dtype`: the copy handed on with `dy` where it still matches, else converted."""
    handed = getattr(dy, _HALF_COPY, None)
    if handed is not None:
        copy, version = handed
        if version == dy._version and copy.dtype == dtype and copy.shape == dy2.shape:
            return copy
    return dy2.to(dtype)


def _normalize(ctx, x2: Tensor, ln_w: Tensor | None, ln_b: Tensor | None, eps: float,
               dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The LayerNorm of a branch: `(h, x_hat, stats)`, its output in the compute dtype and its normalised rows
    before the affine in fp16. The branch keeps `x_hat` for its backward, which writes `h` again from it (for the
    weight gradient of the projection reading `h`): neither the branch's fp32 input nor `h` is kept, four bytes an
    element less than keeping both. fp16 whatever the compute dtype: a normalised row's entries are bounded by the
    square root of its width (90 at the widest fused one), well inside fp16's range, where fp16 carries three more
    bits than bf16; the `h` written again from it differs from the forward's by at most a last-bit rounding."""
    ctx.x_dtype, ctx.has_ln_bias = x2.dtype, ln_b is not None
    x_hat = torch.empty(x2.shape, dtype=torch.float16, device=x2.device)
    h, stats = norm_forward(x2, ln_w, ln_b, eps, dtype, x_hat=x_hat)
    return h, x_hat, stats


def _input_grad(ctx, x_hat: Tensor, dh: Tensor, ln_w: Tensor | None, ln_b: Tensor | None, stats: Tensor,
                dy2: Tensor | None, residual_sum: bool, dtype: torch.dtype,
                rewrite: bool) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The LayerNorm backward of a branch from its [`_normalize`]d rows, `dy2` being the residual gradient (None
    without the residual): `(dx, d_ln_w, d_ln_b, row sum of dy2, h)`, `dx` shaped like the branch's input and
    carrying its half copy where the branch below reads it, `h` the norm's output written again where `rewrite`
    asks for it (else None)."""
    copy = torch.empty(x_hat.shape, dtype=dtype, device=x_hat.device) if ctx.hand_on else None
    h = torch.empty(x_hat.shape, dtype=dtype, device=x_hat.device) if rewrite else None
    dx, d_ln_w, d_ln_b, row_sum = norm_backward(
        x_hat, dh, ln_w, stats, ctx.has_ln_bias, residual_grad=dy2, residual_sum=residual_sum, dx_copy=copy,
        normalized=True, dx_dtype=ctx.x_dtype, bias=ln_b, output=h,
    )
    dx = dx.view(ctx.shape)
    if copy is not None:
        setattr(dx, _HALF_COPY, (copy, dx._version))
    return dx, d_ln_w, d_ln_b, row_sum, h


def _keep_weights(ctx, recast: BackwardCopies | None, weights: tuple[Tensor, ...],
                  copies: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
    """What a branch saves of the compute-dtype `copies` of `weights` for backward: the copies, or nothing where
    `recast` converts the weights again in backward (those are saved anyway, for their gradients' dtype)."""
    ctx.recast = recast
    if recast is None:
        return copies
    ctx.recast_part = recast.add(*weights)
    return (None,) * len(copies)


def _share_gradients(ctx, shared: tuple[GradientSums, Tensor] | None, *params: Tensor | None) -> None:
    """Forward: the slots in this forward's [`GradientSums`] (`shared`, with its token) of a branch's `params`, in
    the order of its backward's parameter gradients; None for each that autograd sums."""
    ctx.sums = None if shared is None else shared[0]
    ctx.slots = (None,) * len(params) if shared is None else shared[0].slots(*params)


def _into(ctx, i: int) -> tuple[GradientSums, int] | None:
    """Where the GEMM of the branch's `i`-th parameter gradient adds to (`_linear_backward`'s `into`), if anywhere."""
    return None if ctx.slots[i] is None else (ctx.sums, ctx.slots[i])


def _hand_over(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """Backward: the branch's parameter gradients for autograd, those summed in this forward's [`GradientSums`]
    handed to it instead (None in their place)."""
    if ctx.sums is None:
        return grads
    out = []
    for g, slot in zip(grads, ctx.slots):
        if slot is not None and g is not None:
            ctx.sums.add(slot, g)
            g = None
        out.append(g)
    return tuple(out)


def _weights(ctx, *saved: Tensor | None) -> tuple[Tensor, ...]:
    """The weight copies a branch's backward reads: those it saved, or those converted again now."""
    return tuple(saved) if ctx.recast is None else tuple(ctx.recast.take(ctx.recast_part))


class _SelfAttentionBranch(torch.autograd.Function):
    """`x + o_proj(attention(qkv_proj(LN(x))))` for `x (batch, len, dim)`."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w_qkv, b_qkv, w_o, b_o, eps, heads, head_dim, dropout, copies, recast, shared,
                token):
        batch, length, _ = x.shape
        _share_gradients(ctx, shared, ln_w, ln_b, w_qkv, b_qkv, w_o, b_o)
        x2 = _rows(x)
        w_qkv_c, b_qkv_c, w_o_c, _ = copies  # o_proj's bias enters in fp32, with the residual add
        h, x_hat, stats = _normalize(ctx, x2, ln_w, ln_b, eps, w_qkv_c.dtype)
        qkv = _linear(h, w_qkv_c, b_qkv_c)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, length, 3, heads, head_dim).unbind(2))
        scale = head_dim**-0.5
        out, lse, aux = _attention_forward(q, k, v, scale, dropout)
        a = out.transpose(1, 2).reshape(batch * length, heads * head_dim)
        y = _residual_add(x2, a, w_o_c, b_o)
        w_qkv_c, w_o_c = _keep_weights(ctx, recast, (w_qkv, w_o), (w_qkv_c, w_o_c))
        ctx.save_for_backward(x_hat, ln_w, ln_b, stats, w_qkv_c, qkv, out, lse, a, w_o_c, w_qkv, w_o)
        ctx.aux, ctx.scale, ctx.dropout, ctx.shape = aux, scale, dropout, x.shape
        ctx.hand_on = _takes_branch_output(x)
        ctx.has_qkv_bias, ctx.has_o_bias = b_qkv is not None, b_o is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_hat, ln_w, ln_b, stats, w_qkv_c, qkv, out, lse, a, w_o_c, w_qkv, w_o = ctx.saved_tensors
        w_qkv_c, w_o_c = _weights(ctx, w_qkv_c, w_o_c)
        need = ctx.needs_input_grad
        batch, length, _ = ctx.shape
        heads, head_dim = out.shape[1], out.shape[3]
        dy2 = _rows(dy)
        do = _half_grad(dy, dy2, w_o_c.dtype)
        # o_proj's bias gradient is the row sum of `dy`, which the LayerNorm backward below reads anyway.
        da, dw_o, _ = _linear_backward(do, a, w_o_c, w_o.dtype, True, need[5], False, _into(ctx, 4))
        dout = _like_output(da.view(batch, length, heads, head_dim).transpose(1, 2), out)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, length, 3, heads, head_dim).unbind(2))
        dq, dk, dv = _attention_backward(dout, q, k, v, out, lse, ctx.aux, ctx.scale, ctx.dropout)[:3]
        want_qkv_bias = need[4] and ctx.has_qkv_bias
        if want_qkv_bias:  # the bias gradient from the same pass as the rows' stacking
            dqkv, db_qkv = stack_heads_column_sum((dq, dk, dv))
        else:
            dqkv, db_qkv = stack_heads((dq, dk, dv)), None
        dh = torch.mm(dqkv, w_qkv_c)
        dx, d_ln_w, d_ln_b, db_o, h = _input_grad(ctx, x_hat, dh, ln_w, ln_b, stats, dy2,
                                                  need[6] and ctx.has_o_bias, do.dtype, need[3])
        _, dw_qkv, _ = _linear_backward(dqkv, h, w_qkv_c, w_qkv.dtype, False, need[3], False, _into(ctx, 2))
        return (dx, *_hand_over(ctx, d_ln_w, d_ln_b, dw_qkv, db_qkv, dw_o, db_o)) + (None,) * 8


class _CrossAttentionBranch(torch.autograd.Function):
    """`x + o_proj(attention(q_proj(LN(x)), kv_proj(x_in)))` (without the `x +` when `residual` is off) for latents
    `x (batch, len, dim)` over an input `x_in (batch, kv_len, width)`, normalised without affine when the input norm
    is there: its gamma/beta are folded into `kv_proj` here (`fold_affine`, fp32) and unfolded in backward."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w_q, b_q, w_kv, b_kv, cn_w, cn_b, w_o, b_o, x_in, key_bias, has_keys, eps, heads,
                head_dim, dropout, residual, flash, copies, recast):
        batch, length, _ = x.shape
        kv_len = x_in.shape[1]
        x2, x_in2 = _rows(x), _rows(x_in)
        w_q_c, b_q_c, w_o_c, b_o_c = copies
        dtype = w_q_c.dtype
        # The input norm's affine folded into kv_proj, in fp32, written in the compute dtype.
        w_kv_c, b_kv_c = cast_tensors(dtype, w_kv, b_kv) if cn_w is None else fold_affine(w_kv, b_kv, cn_w, cn_b, dtype)
        h, x_hat, stats = _normalize(ctx, x2, ln_w, ln_b, eps, dtype)
        q_rows = _linear(h, w_q_c, b_q_c)
        kv = _linear(x_in2, w_kv_c, b_kv_c)
        q = q_rows.view(batch, length, heads, head_dim).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in kv.view(batch, kv_len, 2, heads, head_dim).unbind(2))
        scale = head_dim**-0.5
        out, lse, aux = _attention_forward(q, k, v, scale, dropout, key_bias, flash)
        a = out.transpose(1, 2).reshape(batch, length, heads * head_dim)
        if has_keys is not None:  # a sample without any valid key gets no attention output
            a = torch.where(has_keys.view(-1, 1, 1), a, 0.0)
        a = a.view(batch * length, -1)
        y = _residual_add(x2, a, w_o_c, b_o) if residual else _linear(a, w_o_c, b_o_c).to(x.dtype)
        # The folded key/value weights stay saved: converting them again would mean folding them again.
        w_q_c, w_o_c = _keep_weights(ctx, recast, (w_q, w_o), (w_q_c, w_o_c))
        ctx.save_for_backward(x_hat, ln_w, ln_b, stats, w_q_c, q_rows, x_in2, w_kv_c, kv, out, lse, a, w_o_c,
                              key_bias, has_keys, cn_w, cn_b, w_kv, w_q, w_o)
        ctx.aux, ctx.scale, ctx.dropout, ctx.residual = aux, scale, dropout, residual
        ctx.shape, ctx.in_shape, ctx.heads = x.shape, x_in.shape, heads
        ctx.has_q_bias, ctx.has_kv_bias, ctx.has_o_bias = b_q is not None, b_kv_c is not None, b_o is not None
        ctx.kv_proj_bias = b_kv is not None
        ctx.hand_on = _takes_branch_output(x)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        (x_hat, ln_w, ln_b, stats, w_q_c, q_rows, x_in2, w_kv_c, kv, out, lse, a, w_o_c, key_bias, has_keys, cn_w,
         cn_b, w_kv, w_q, w_o) = ctx.saved_tensors
        w_q_c, w_o_c = _weights(ctx, w_q_c, w_o_c)
        need = ctx.needs_input_grad
        batch, length, _ = ctx.shape
        kv_len, heads = ctx.in_shape[1], ctx.heads
        head_dim = out.shape[3]
        dy2 = _rows(dy)
        do = _half_grad(dy, dy2, w_o_c.dtype)
        # With the residual, o_proj's bias gradient (the row sum of `dy`) comes out of the LayerNorm backward below.
        sum_in_norm = ctx.residual and need[10] and ctx.has_o_bias
        da, dw_o, db_o = _linear_backward(do, a, w_o_c, w_o.dtype, True, need[9],
                                          need[10] and ctx.has_o_bias and not sum_in_norm)
        if has_keys is not None:
            da = torch.where(has_keys.view(-1, 1, 1), da.view(batch, length, -1), 0.0)
        dout = _like_output(da.view(batch, length, heads, head_dim).transpose(1, 2), out)
        q = q_rows.view(batch, length, heads, head_dim).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in kv.view(batch, kv_len, 2, heads, head_dim).unbind(2))
        dq, dk, dv = _attention_backward(dout, q, k, v, out, lse, ctx.aux, ctx.scale, ctx.dropout, key_bias)[:3]
        dq_rows = dq.transpose(1, 2).reshape(batch * length, heads * head_dim)
        dkv = torch.stack([dk.transpose(1, 2), dv.transpose(1, 2)], dim=2).view(batch * kv_len, -1)
        # dk and dv are input-sized at long inputs: dropped once stacked, before the input's gradient is allocated
        # beside `dkv` (dq lives on as `dq_rows`, a view of it).
        del dq, dk, dv
        # The folded projection's gradients in fp32, then through the fold to kv_proj and the input norm.
        fold_grads = any(need[5:9])
        d_in, dw_kv_f, db_kv_f = _linear_backward(dkv, x_in2, w_kv_c, torch.float32, need[11], fold_grads,
                                                  fold_grads and ctx.has_kv_bias)
        d_cn_w = d_cn_b = None
        dw_kv = dw_kv_f
        if fold_grads and cn_w is not None:
            d_cn_w, d_cn_b, dw_kv = unfold_affine_grads(dw_kv_f, db_kv_f, w_kv, cn_w, cn_b)
        # The fold adds to kv_proj's bias: its gradient is the folded bias's.
        db_kv = db_kv_f if ctx.kv_proj_bias else None
        dw_kv, db_kv = (None if g is None else g.to(w_kv.dtype) for g in (dw_kv, db_kv))
        dh = torch.mm(dq_rows, w_q_c)
        dx, d_ln_w, d_ln_b, db_o_sum, h = _input_grad(
            ctx, x_hat, dh, ln_w, ln_b, stats, dy2 if ctx.residual else None, sum_in_norm, do.dtype, need[3]
        )
        _, dw_q, db_q = _linear_backward(dq_rows, h, w_q_c, w_q.dtype, False, need[3], need[4] and ctx.has_q_bias)
        if sum_in_norm:
            db_o = db_o_sum
        d_in = None if d_in is None else d_in.view(ctx.in_shape)
        return (dx, d_ln_w, d_ln_b, dw_q, db_q, dw_kv, db_kv, d_cn_w, d_cn_b, dw_o, db_o, d_in) + (None,) * 10


class _MLPBranch(torch.autograd.Function):
    """`x + fc2(act(fc1(LN(x))))` (without the `x +` when `residual` is off), gated or not."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, eps, gate, residual, copies, recast, shared, token):
        x2 = _rows(x)
        _share_gradients(ctx, shared, ln_w, ln_b, w1, b1, w2, b2)
        w1_c, b1_c, w2_c, b2_c = copies
        h, x_hat, stats = _normalize(ctx, x2, ln_w, ln_b, eps, w1_c.dtype)
        pre = _linear(h, w1_c, b1_c)
        act = activation_forward(pre, gate)
        y = _residual_add(x2, act, w2_c, b2) if residual else _linear(act, w2_c, b2_c).to(x.dtype)
        # Not `act`: the activation's backward kernel writes it again (the MLP's widest activation, not kept).
        w1_c, w2_c = _keep_weights(ctx, recast, (w1, w2), (w1_c, w2_c))
        ctx.save_for_backward(x_hat, ln_w, ln_b, stats, w1_c, pre, w2_c, w1, w2)
        ctx.gate, ctx.residual, ctx.shape = gate, residual, x.shape
        ctx.hand_on = _takes_branch_output(x)
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_hat, ln_w, ln_b, stats, w1_c, pre, w2_c, w1, w2 = ctx.saved_tensors
        w1_c, w2_c = _weights(ctx, w1_c, w2_c)
        need = ctx.needs_input_grad
        dy2 = _rows(dy)
        do = _half_grad(dy, dy2, w2_c.dtype)
        d_act = torch.mm(do, w2_c)
        d_pre, act = activation_backward(d_act, pre, ctx.gate, recompute_output=need[5])
        # With the residual, fc2's bias gradient (the row sum of `dy`) comes out of the LayerNorm backward below.
        sum_in_norm = ctx.residual and need[6] and ctx.has_b2
        _, dw2, db2 = _linear_backward(do, act, w2_c, w2.dtype, False, need[5],
                                       need[6] and ctx.has_b2 and not sum_in_norm, _into(ctx, 4))
        dh = torch.mm(d_pre, w1_c)
        dx, d_ln_w, d_ln_b, db2_sum, h = _input_grad(
            ctx, x_hat, dh, ln_w, ln_b, stats, dy2 if ctx.residual else None, sum_in_norm, do.dtype, need[3]
        )
        _, dw1, db1 = _linear_backward(d_pre, h, w1_c, w1.dtype, False, need[3], need[4] and ctx.has_b1,
                                       _into(ctx, 2))
        if sum_in_norm:
            db2 = db2_sum
        return (dx, *_hand_over(ctx, d_ln_w, d_ln_b, dw1, db1, dw2, db2)) + (None,) * 7


_BRANCH_BACKWARDS = frozenset(f._backward_cls for f in (_SelfAttentionBranch, _CrossAttentionBranch, _MLPBranch))


# The branches' weights in the compute dtype are converted here, outside the autograd nodes (whose forward runs
# without grad): with grad on, a forward's copies are shared, and the encoder converts them all at once
# (weight_cast.shared_copies). They enter the nodes inside a tuple, which autograd does not track. Given `recast` (a
# block's `BackwardCopies`), a branch keeps none of them for backward, which converts them again.


def self_attention_branch(norm: nn.LayerNorm, attn: nn.Module, x: Tensor, dtype: torch.dtype,
                          recast: BackwardCopies | None = None) -> Tensor:
    """`x + attn(norm(x))` for a [`PerceiverSelfAttention`] that [`self_attention_fits`]."""
    qkv, o = attn.qkv_proj, attn.o_proj
    copies = tuple(shared_copies(dtype, qkv.weight, qkv.bias, o.weight, o.bias))
    shared = current_sums()
    return _SelfAttentionBranch.apply(
        x, norm.weight, norm.bias, qkv.weight, qkv.bias, o.weight, o.bias, norm.eps, attn.num_heads, attn.head_dim,
        attn.spec.dropout if attn.training else 0.0, copies, recast, shared, None if shared is None else shared[1],
    )


def cross_attention_branch(norm: nn.LayerNorm, attn: nn.Module, x: Tensor, context: CrossInput,
                           context_norm: nn.LayerNorm | None, dtype: torch.dtype, residual: bool,
                           recast: BackwardCopies | None = None) -> Tensor:
    """`x + attn(norm(x), context)` (`attn(...)` alone without `residual`) for a [`PerceiverCrossAttention`] that
    [`cross_attention_fits`] over a `context` that [`cross_input_fits`]."""
    x_in = context.materialize() if context_norm is None else context.normalized(context_norm.eps)
    if x_in.dtype != dtype:
        x_in = x_in.to(dtype)
    mask = context.mask
    batch, length = x.shape[:2]
    flash = mask is None and flash_beats_cudnn(batch, attn.num_heads, length, x_in.shape[1])
    q, kv, o = attn.q_proj, attn.kv_proj, attn.o_proj
    cn_w, cn_b = (None, None) if context_norm is None else (context_norm.weight, context_norm.bias)
    return _CrossAttentionBranch.apply(
        x, norm.weight, norm.bias, q.weight, q.bias, kv.weight, kv.bias, cn_w, cn_b, o.weight, o.bias, x_in,
        None if mask is None else mask.key_bias(dtype), None if mask is None else mask.has_keys, norm.eps,
        attn.num_heads, attn.head_dim, attn.spec.dropout if attn.training else 0.0, residual, flash,
        tuple(shared_copies(dtype, q.weight, q.bias, o.weight, o.bias)), recast,
    )


def mlp_branch(norm: nn.LayerNorm, mlp: nn.Module, x: Tensor, dtype: torch.dtype, residual: bool,
               recast: BackwardCopies | None = None) -> Tensor:
    """`x + mlp(norm(x))` (`mlp(norm(x))` without `residual`) for a [`PerceiverMLP`] that [`mlp_fits`]."""
    gate = mlp.gate_activation_name if mlp.gated else None
    fc1, fc2 = mlp.fc1, mlp.fc2
    shared = current_sums()
    return _MLPBranch.apply(
        x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, norm.eps, gate, residual,
        tuple(shared_copies(dtype, fc1.weight, fc1.bias, fc2.weight, fc2.bias)), recast, shared,
        None if shared is None else shared[1],
    )


__all__ = [
    "cross_attention_branch", "cross_attention_fits", "cross_input_fits", "fused_dtype", "mlp_branch", "mlp_fits",
    "self_attention_branch", "self_attention_fits",
]

"""The latent path's two residual branches, each as one autograd node on CUDA in half precision.

`x + Attn(LN(x))` (self-attention) and `x + MLP(LN(x))` run as a short fixed sequence of kernels with a backward
written out: the LayerNorm and the MLP activation are Triton kernels (the LayerNorm's backward also adds the residual
gradient and sums it over the rows, which is the output projection's bias gradient; the activation's backward
writes the activation's output again, so the MLP keeps only its first projection's output), projections are single
`addmm`s on weights converted once per forward (the encoder converts every branch's together), attention is
PyTorch's cuDNN (or FlashAttention-2) kernel called directly, and weight and bias gradients come out of the GEMMs
and one-kernel column sums in fp32, so no cast kernels follow them. Built module by module, the same branch launches
about three times as many kernels, each with its own autograd, autocast and Python overhead: that overhead, not the
GPU, bounds an eager training step of the Perceiver's small latent arrays.

The values are those of the modules under autocast up to rounding order (weight gradients are better: they skip
the round trip through the half-precision dtype). [`PerceiverBlock`] takes this path only where it computes the
same function: CUDA, autocast (or half-precision weights), plain `nn.Linear` projections and LayerNorms (not
PEFT-wrapped or hooked ones), no attention maps, no rotary, the sdpa/varlen backends, and not under `torch.compile`
(Inductor fuses the module path itself). Attention dropout is the attention kernel's own, as SDPA's is on the module
path. Everything else, and every CPU, runs the modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import Tensor, nn

from .attention_backends import CUDNN_AVAILABLE, FUSED_MAX_HEAD_DIM
from .cross_attention import _fused_backward, _fused_forward
from .fused_activation import activation_backward, activation_forward
from .fused_norm import FusedLayerNorm, column_sum, norm_backward, norm_forward, triton
from .weight_cast import plain, shared_copies

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


def self_attention_fits(norm: nn.Module, attn: nn.Module, output_attentions: bool) -> bool:
    """Whether `x + attn(norm(x))` of a [`PerceiverSelfAttention`] runs fused: see the module docstring."""
    return (
        not output_attentions
        and attn.rotary is None
        and (attn.config._attn_implementation or "sdpa") in ("sdpa", "varlen")
        and attn.head_dim == attn.v_head_dim
        and attn.head_dim % 8 == 0
        and _head_dim_fits(attn.head_dim, attn.qkv_proj.weight)
        and _plain(norm, attn.qkv_proj, attn.o_proj)
    )


def mlp_fits(norm: nn.Module, mlp: nn.Module) -> bool:
    """Whether `x + mlp(norm(x))` runs fused: see the module docstring."""
    return _plain(norm, mlp.fc1, mlp.fc2)


# ---------------------------------------------------------------------------------------------------- projections


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _linear_backward(dy: Tensor, x: Tensor, weight: Tensor, param: Tensor, want_x: bool, want_w: bool,
                     want_b: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`(dx, d_weight, d_bias)` of `x @ weight.T + bias` from the half-precision `dy`; the parameter gradients in
    the parameter's dtype (`param`: the fp32 weight), straight from the GEMM / reduction."""
    dx = torch.mm(dy, weight) if want_x else None
    dw = db = None
    if want_w:
        dw = torch.mm(dy.t(), x, out_dtype=param.dtype) if param.dtype != dy.dtype else torch.mm(dy.t(), x)
    if want_b:
        db = column_sum(dy, param.dtype)
    return dx, dw, db


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


# ---------------------------------------------------------------------------------------------------- attention


def _attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float,
                       dropout: float) -> tuple[Tensor, Tensor, tuple]:
    # cuDNN where available (what SDPA picks on Hopper for these shapes), else FlashAttention-2; both keep the
    # log-sum-exp for the backward and, under dropout, the RNG seed and offset the backward regenerates the mask from.
    if CUDNN_AVAILABLE and torch.backends.cuda.cudnn_sdp_enabled():
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, dropout, False, False,
                                                                  scale=scale)
        return res[0], res[1], ("cudnn", *res[2:8])
    out, lse, aux = _fused_forward(q, k, v, None, scale, dropout)
    return out, lse, ("flash", *aux)


def _attention_backward(dout, q, k, v, out, lse, aux, scale, dropout) -> tuple[Tensor, Tensor, Tensor]:
    if aux[0] == "flash":
        return _fused_backward(dout, q, k, v, out, lse, None, scale, aux[1:], dropout)
    _, cum_q, cum_k, max_q, max_k, seed, offset = aux
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, dropout, False, scale=scale
    )


class _SelfAttentionBranch(torch.autograd.Function):
    """`x + o_proj(attention(qkv_proj(LN(x))))` for `x (batch, len, dim)`."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w_qkv, b_qkv, w_o, b_o, eps, heads, head_dim, dropout, copies):
        batch, length, _ = x.shape
        x2 = _rows(x)
        w_qkv_c, b_qkv_c, w_o_c, b_o_c = copies
        h, stats = norm_forward(x2, ln_w, ln_b, eps, w_qkv_c.dtype)
        qkv = _linear(h, w_qkv_c, b_qkv_c)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, length, 3, heads, head_dim).unbind(2))
        scale = head_dim**-0.5
        out, lse, aux = _attention_forward(q, k, v, scale, dropout)
        a = out.transpose(1, 2).reshape(batch * length, heads * head_dim)
        y = torch.add(x2, _linear(a, w_o_c, b_o_c))
        ctx.save_for_backward(x2, ln_w, stats, h, w_qkv_c, qkv, out, lse, a, w_o_c, w_qkv, w_o)
        ctx.aux, ctx.scale, ctx.dropout, ctx.shape = aux, scale, dropout, x.shape
        ctx.has_ln_bias, ctx.has_qkv_bias, ctx.has_o_bias = ln_b is not None, b_qkv is not None, b_o is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, ln_w, stats, h, w_qkv_c, qkv, out, lse, a, w_o_c, w_qkv, w_o = ctx.saved_tensors
        need = ctx.needs_input_grad
        batch, length, _ = ctx.shape
        heads, head_dim = out.shape[1], out.shape[3]
        dy2 = _rows(dy)
        do = dy2.to(w_o_c.dtype)
        # o_proj's bias gradient is the row sum of `dy`, which the LayerNorm backward below reads anyway.
        da, dw_o, _ = _linear_backward(do, a, w_o_c, w_o, True, need[5], False)
        dout = da.view(batch, length, heads, head_dim).transpose(1, 2)
        if dout.stride() != out.stride():
            dout = torch.empty_like(out).copy_(dout)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(batch, length, 3, heads, head_dim).unbind(2))
        dq, dk, dv = _attention_backward(dout, q, k, v, out, lse, ctx.aux, ctx.scale, ctx.dropout)[:3]
        dqkv = torch.stack([t.transpose(1, 2) for t in (dq, dk, dv)], dim=2).view(batch * length, -1)
        dh, dw_qkv, db_qkv = _linear_backward(dqkv, h, w_qkv_c, w_qkv, True, need[3], need[4] and ctx.has_qkv_bias)
        dx, d_ln_w, d_ln_b, db_o = norm_backward(
            x2, dh, ln_w, stats, ctx.has_ln_bias, residual_grad=dy2, residual_sum=need[6] and ctx.has_o_bias
        )
        return (dx.view(ctx.shape), d_ln_w, d_ln_b, dw_qkv, db_qkv, dw_o, db_o) + (None,) * 5


class _MLPBranch(torch.autograd.Function):
    """`x + fc2(act(fc1(LN(x))))` (without the `x +` when `residual` is off), gated or not."""

    @staticmethod
    def forward(ctx, x, ln_w, ln_b, w1, b1, w2, b2, eps, gate, residual, copies):
        x2 = _rows(x)
        w1_c, b1_c, w2_c, b2_c = copies
        h, stats = norm_forward(x2, ln_w, ln_b, eps, w1_c.dtype)
        pre = _linear(h, w1_c, b1_c)
        act = activation_forward(pre, gate)
        o = _linear(act, w2_c, b2_c)
        y = torch.add(x2, o) if residual else o.to(x.dtype)
        # Not `act`: the activation's backward kernel writes it again (the MLP's widest activation, not kept).
        ctx.save_for_backward(x2, ln_w, stats, h, w1_c, pre, w2_c, w1, w2)
        ctx.gate, ctx.residual, ctx.shape = gate, residual, x.shape
        ctx.has_ln_bias, ctx.has_b1, ctx.has_b2 = ln_b is not None, b1 is not None, b2 is not None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, ln_w, stats, h, w1_c, pre, w2_c, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy2 = _rows(dy)
        do = dy2.to(w2_c.dtype)
        d_act = torch.mm(do, w2_c)
        d_pre, act = activation_backward(d_act, pre, ctx.gate, recompute_output=need[5])
        # With the residual, fc2's bias gradient (the row sum of `dy`) comes out of the LayerNorm backward below.
        sum_in_norm = ctx.residual and need[6] and ctx.has_b2
        _, dw2, db2 = _linear_backward(do, act, w2_c, w2, False, need[5], need[6] and ctx.has_b2 and not sum_in_norm)
        dh, dw1, db1 = _linear_backward(d_pre, h, w1_c, w1, True, need[3], need[4] and ctx.has_b1)
        dx, d_ln_w, d_ln_b, db2_sum = norm_backward(
            x2, dh, ln_w, stats, ctx.has_ln_bias, residual_grad=dy2 if ctx.residual else None, residual_sum=sum_in_norm
        )
        if sum_in_norm:
            db2 = db2_sum
        return (dx.view(ctx.shape), d_ln_w, d_ln_b, dw1, db1, dw2, db2) + (None,) * 4


# The branches' weights in the compute dtype are converted here, outside the autograd nodes (whose forward runs
# without grad): with grad on, a forward's copies are shared, and the encoder converts them all at once
# (weight_cast.shared_copies). They enter the nodes inside a tuple, which autograd does not track.


def self_attention_branch(norm: nn.LayerNorm, attn: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
    """`x + attn(norm(x))` for a [`PerceiverSelfAttention`] that [`self_attention_fits`]."""
    qkv, o = attn.qkv_proj, attn.o_proj
    copies = tuple(shared_copies(dtype, qkv.weight, qkv.bias, o.weight, o.bias))
    return _SelfAttentionBranch.apply(
        x, norm.weight, norm.bias, qkv.weight, qkv.bias, o.weight, o.bias, norm.eps, attn.num_heads, attn.head_dim,
        attn.spec.dropout if attn.training else 0.0, copies,
    )


def mlp_branch(norm: nn.LayerNorm, mlp: nn.Module, x: Tensor, dtype: torch.dtype, residual: bool) -> Tensor:
    """`x + mlp(norm(x))` (`mlp(norm(x))` without `residual`) for a [`PerceiverMLP`] that [`mlp_fits`]."""
    gate = mlp.gate_activation_name if mlp.gated else None
    fc1, fc2 = mlp.fc1, mlp.fc2
    return _MLPBranch.apply(
        x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, norm.eps, gate, residual,
        tuple(shared_copies(dtype, fc1.weight, fc1.bias, fc2.weight, fc2.bias)),
    )


__all__ = ["fused_dtype", "mlp_branch", "mlp_fits", "self_attention_branch", "self_attention_fits"]

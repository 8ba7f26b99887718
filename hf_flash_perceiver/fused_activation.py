"""The MLP activation, `value * act(gate)` of `h = [value | gate]` (gated) or `act(h)`, as one kernel each way.

Gated: autograd through `chunk`, the activation and the product runs two kernels forward and three backward, and
keeps `act(gate)` for backward; Inductor fuses them, but writes the gradient of `[value | gate]` as a concatenation
whose every element reads both halves' operands, several times as long as its memory traffic needs (it was the
largest non-GEMM kernel of compiled training steps with gated MLPs). Here, on CUDA with Triton, the forward reads `h`
once and writes the product; the backward reads the output gradient and `h` once and writes both halves of the input
gradient; only `h` is kept. The same Triton kernels run:

- eagerly, launched from one autograd node ([`_TritonGatedActivation`]);
- under `torch.compile`, as the custom op `hf_flash_perceiver::gated_activation` (`torch.library.triton_op`), which
  Inductor launches inside its graph (and inside CUDA graphs): a Triton kernel called from Python would break it;
- inside the fused residual branches (fused_block.py), through [`activation_forward`] / [`activation_backward`].

The values are those of PyTorch's activations computed in fp32 and rounded once to the output dtype (PyTorch rounds
`act(gate)` before the product as well). Off CUDA, without Triton, and on torch releases without `triton_op` under
`torch.compile`, [`gated_activation`] runs PyTorch ops, eagerly as one autograd node ([`_GatedActivation`]).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_norm import triton

if triton is not None:
    import triton.language as tl

GATE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid}
# Kernel codes of the activations (a constexpr of the kernels).
_ACTIVATIONS = {"gelu": 0, "silu": 1, "sigmoid": 2}
_OP_NAMESPACE = "hf_flash_perceiver"

# Off switch for comparisons (benchmarks, tests): PyTorch ops in the MLPs when False (the fused branches keep theirs).
enabled = True


class _GatedActivation(torch.autograd.Function):
    """`value * act(gate)` in PyTorch ops, as one autograd node whose backward writes both halves' gradients straight
    into one tensor: autograd would run the product, the activation and the split as three nodes and concatenate
    the halves' gradients, one more kernel per MLP. The path off CUDA."""

    @staticmethod
    def forward(ctx, h: Tensor, name: str) -> Tensor:
        value, gate = h.chunk(2, dim=-1)
        act = GATE_ACTIVATIONS[name](gate)
        ctx.save_for_backward(value, gate, act)
        ctx.name = name
        return value * act

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:
        value, gate, act = ctx.saved_tensors
        half = value.shape[-1]
        d_h = torch.empty((*dy.shape[:-1], 2 * half), dtype=value.dtype, device=dy.device)
        torch.mul(dy, act, out=d_h[..., :half])
        d_act, d_gate = dy * value, d_h[..., half:]
        if ctx.name == "gelu":
            torch.ops.aten.gelu_backward.grad_input(d_act, gate, grad_input=d_gate)
        elif ctx.name == "silu":
            torch.ops.aten.silu_backward.grad_input(d_act, gate, grad_input=d_gate)
        else:
            torch.ops.aten.sigmoid_backward.grad_input(d_act, act, grad_input=d_gate)
        return d_h, None


# ---------------------------------------------------------------------------------------------------- launches


def _tile(hidden: int) -> tuple[int, int]:
    """(rows, columns) of one program's tile: about 2048 output elements, columns a power of two up to 256."""
    columns = min(256, triton.next_power_of_2(hidden))
    return max(1, 2048 // columns), columns


def _launch_forward(kernel, pre: Tensor, out: Tensor, gated: bool, act: int) -> None:
    rows, width = pre.shape
    hidden = out.shape[1]
    tile_rows, tile_cols = _tile(hidden)
    grid = (triton.cdiv(rows, tile_rows), triton.cdiv(hidden, tile_cols))
    kernel[grid](pre, out, rows, hidden, width, GATED=gated, ACT=act, ROWS=tile_rows, COLS=tile_cols)


def _launch_backward(kernel, d_out: Tensor, pre: Tensor, d_pre: Tensor, gated: bool, act: int,
                     out: Tensor | None = None) -> None:
    rows, width = pre.shape
    hidden = d_out.shape[1]
    tile_rows, tile_cols = _tile(hidden)
    grid = (triton.cdiv(rows, tile_rows), triton.cdiv(hidden, tile_cols))
    kernel[grid](d_out, pre, d_pre, out if out is not None else d_pre, rows, hidden, width, GATED=gated, ACT=act,
                 WRITE_OUT=out is not None, ROWS=tile_rows, COLS=tile_cols)


def activation_forward(pre: Tensor, gate: str | None) -> Tensor:
    """`value * act(gate)` of the rows of `pre = [value | gate] (rows, 2 * hidden)` (gated), else exact GELU of
    `pre`, into a new tensor of `pre`'s dtype. `pre` must be contiguous."""
    rows, width = pre.shape
    hidden = width // 2 if gate is not None else width
    out = torch.empty((rows, hidden), dtype=pre.dtype, device=pre.device)
    _launch_forward(_activation_forward, pre, out, gate is not None, _ACTIVATIONS[gate or "gelu"])
    return out


def activation_backward(d_out: Tensor, pre: Tensor, gate: str | None,
                        recompute_output: bool = False) -> tuple[Tensor, Tensor | None]:
    """`(d_pre, output)`: the gradient of [`activation_forward`] with respect to `pre`, from the output gradient
    `d_out`, and with `recompute_output` the forward's output again (else None), written by the same kernel from the
    operands it reads anyway, so that a caller needing the output in backward (the next projection's weight
    gradient) need not keep it from the forward."""
    d_out = d_out.contiguous()
    d_pre = torch.empty_like(pre)
    out = torch.empty_like(d_out) if recompute_output else None
    _launch_backward(_activation_backward, d_out, pre, d_pre, gate is not None, _ACTIVATIONS[gate or "gelu"], out)
    return d_pre, out


def _rows(h: Tensor) -> Tensor:
    return h.reshape(-1, h.shape[-1]).contiguous()


class _TritonGatedActivation(torch.autograd.Function):
    """The eager CUDA path: one Triton kernel forward, one backward, `h` the only tensor kept."""

    @staticmethod
    def forward(ctx, h: Tensor, name: str) -> Tensor:
        pre = _rows(h)
        ctx.save_for_backward(pre)
        ctx.name, ctx.shape = name, h.shape
        return activation_forward(pre, name).view(*h.shape[:-1], h.shape[-1] // 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor, None]:
        (pre,) = ctx.saved_tensors
        return activation_backward(dy.reshape(-1, dy.shape[-1]), pre, ctx.name)[0].view(ctx.shape), None


def _register_ops() -> None:
    """Register the compiled path's custom ops (forward, and backward through `register_autograd`)."""
    from torch.library import register_autograd, triton_op, wrap_triton

    @triton_op(f"{_OP_NAMESPACE}::gated_activation_backward", mutates_args=())
    def gated_activation_backward(dy: Tensor, h: Tensor, act: int) -> Tensor:
        pre = _rows(h)
        d_pre = torch.empty_like(pre)
        _launch_backward(wrap_triton(_activation_backward), _rows(dy), pre, d_pre, True, act)
        return d_pre.view(h.shape)

    @triton_op(f"{_OP_NAMESPACE}::gated_activation", mutates_args=())
    def gated_activation(h: Tensor, act: int) -> Tensor:
        pre = _rows(h)
        out = torch.empty((pre.shape[0], pre.shape[1] // 2), dtype=h.dtype, device=h.device)
        _launch_forward(wrap_triton(_activation_forward), pre, out, True, act)
        return out.view(*h.shape[:-1], h.shape[-1] // 2)

    def setup_context(ctx, inputs, output):
        h, act = inputs
        ctx.save_for_backward(h)
        ctx.act = act

    def backward(ctx, dy):
        (h,) = ctx.saved_tensors
        return getattr(torch.ops, _OP_NAMESPACE).gated_activation_backward(dy, h, ctx.act), None

    register_autograd(f"{_OP_NAMESPACE}::gated_activation", backward, setup_context=setup_context)


def gated_activation(h: Tensor, name: str) -> Tensor:
    """The gated MLP's activation, on the fastest path the call allows (see the module docstring).

    Args:
        h (`torch.Tensor` of shape `(..., 2 * hidden)`): the first projection's output, `[value | gate]`.
        name (`str`): the gate's activation, a key of `GATE_ACTIVATIONS` (`"gelu"`, `"silu"`, `"sigmoid"`).

    Returns:
        `torch.Tensor` of shape `(..., hidden)` and `h`'s dtype: `value * act(gate)`.
    """
    if enabled and triton is not None and h.is_cuda and h.is_floating_point():
        if not torch.compiler.is_compiling():
            return _TritonGatedActivation.apply(h, name)
        if _compiled_op is not None:
            return _compiled_op(h, _ACTIVATIONS[name])
    if torch.compiler.is_compiling():
        value, gate = h.chunk(2, dim=-1)
        return value * GATE_ACTIVATIONS[name](gate)
    return _GatedActivation.apply(h, name)


# ---------------------------------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _act(x, ACT: tl.constexpr):
        if ACT == 0:
            return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        elif ACT == 1:
            return x * tl.sigmoid(x)
        else:
            return tl.sigmoid(x)

    @triton.jit
    def _act_grad(x, ACT: tl.constexpr):
        if ACT == 0:
            cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
            return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
        elif ACT == 1:
            s = tl.sigmoid(x)
            return s * (1.0 + x * (1.0 - s))
        else:
            s = tl.sigmoid(x)
            return s * (1.0 - s)

    # Programs tile (rows, hidden columns): no division or modulo per element, and each row segment is contiguous.
    @triton.jit
    def _activation_forward(Pre, Out, rows, hidden, width, GATED: tl.constexpr, ACT: tl.constexpr,
                            ROWS: tl.constexpr, COLS: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        col = tl.program_id(1) * COLS + tl.arange(0, COLS)
        ok = (row < rows)[:, None] & (col < hidden)[None, :]
        row64 = row[:, None].to(tl.int64)
        src = Pre + row64 * width + col[None, :]
        if GATED:
            value = tl.load(src, mask=ok, other=0.0).to(tl.float32)
            gate = tl.load(src + hidden, mask=ok, other=0.0).to(tl.float32)
            y = value * _act(gate, ACT)
        else:
            y = _act(tl.load(src, mask=ok, other=0.0).to(tl.float32), ACT)
        tl.store(Out + row64 * hidden + col[None, :], y.to(Out.dtype.element_ty), mask=ok)

    @triton.jit
    def _activation_backward(DOut, Pre, DPre, Out, rows, hidden, width, GATED: tl.constexpr, ACT: tl.constexpr,
                             WRITE_OUT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        col = tl.program_id(1) * COLS + tl.arange(0, COLS)
        ok = (row < rows)[:, None] & (col < hidden)[None, :]
        row64 = row[:, None].to(tl.int64)
        dy = tl.load(DOut + row64 * hidden + col[None, :], mask=ok, other=0.0).to(tl.float32)
        src = Pre + row64 * width + col[None, :]
        dst = DPre + row64 * width + col[None, :]
        if GATED:
            value = tl.load(src, mask=ok, other=0.0).to(tl.float32)
            gate = tl.load(src + hidden, mask=ok, other=0.0).to(tl.float32)
            act = _act(gate, ACT)
            tl.store(dst, (dy * act).to(DPre.dtype.element_ty), mask=ok)
            tl.store(dst + hidden, (dy * value * _act_grad(gate, ACT)).to(DPre.dtype.element_ty), mask=ok)
            if WRITE_OUT:
                # As the forward computes it: `act` rounded into the product only at the end, never on its own.
                tl.store(Out + row64 * hidden + col[None, :], (value * act).to(Out.dtype.element_ty), mask=ok)
        else:
            x = tl.load(src, mask=ok, other=0.0).to(tl.float32)
            tl.store(dst, (dy * _act_grad(x, ACT)).to(DPre.dtype.element_ty), mask=ok)
            if WRITE_OUT:
                tl.store(Out + row64 * hidden + col[None, :], _act(x, ACT).to(Out.dtype.element_ty), mask=ok)


# The custom op of the compiled path, registered at import (None where torch lacks `triton_op` or Triton is absent).
# A second copy of this file (the Hub's remote code beside the installed package) reuses the registered op.
_compiled_op = None
if triton is not None and hasattr(torch.library, "triton_op"):
    if not hasattr(getattr(torch.ops, _OP_NAMESPACE), "gated_activation"):
        _register_ops()
    _compiled_op = getattr(torch.ops, _OP_NAMESPACE).gated_activation


__all__ = ["GATE_ACTIVATIONS", "activation_backward", "activation_forward", "enabled", "gated_activation"]

"""The gradients of parameters that several fused branch calls of one forward share, summed where they are made.

A latent stack repeated with shared weights (transformers' vision Perceivers apply 6 self-attention layers 8 times)
calls each of its fused branches (fused_block.py) several times per forward. Autograd sums a parameter's gradients
from those calls with one addition kernel per call past the first: over 500 per step at the vision shape, most of
them over vectors of a thousand entries, where each kernel costs its launch rather than its bytes. Instead, the
branches of such a forward hand those gradients to a [`GradientSums`]: a weight's gradient GEMM accumulates into the
sum of the calls before it (`beta = 1`, in the GEMM), and the vectors' gradients are kept and summed together, one
multi-tensor addition per call past the first for all of them. One autograd node (`_Sums`) that every such branch
call takes as an input, and that autograd therefore runs only after all of them, returns the sums as the
parameters' gradients.

Only where the backward pass is known to reach every call: the captured encoder (encoder_graphs.py), whose backward
takes the gradients of the encoder's output for all its parameters at once ([`summed`]). An eager backward may stop
short of the node (`torch.autograd.grad` of an intermediate output with `retain_graph`), after which sums kept for
the next pass would count calls twice; there autograd sums the gradients itself, as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_allowed: ContextVar[bool] = ContextVar("_allowed", default=False)
# The current forward's sums and the token its branch calls take (not kept on the sums: the token's node holds the
# sums, and a reference back would make a cycle through autograd's graph that Python's collector cannot see).
_current: ContextVar[tuple[GradientSums, Tensor] | None] = ContextVar("_current", default=None)


@contextmanager
def summed() -> Iterator[None]:
    """Forwards inside may sum their shared parameters' gradients ([`GradientSums`]): only around a forward whose
    backward runs through all of it, once per forward."""
    token = _allowed.set(True)
    try:
        yield
    finally:
        _allowed.reset(token)


@contextmanager
def gradient_sums(uses: Mapping[Tensor, int]) -> Iterator[GradientSums | None]:
    """The [`GradientSums`] of one forward for the parameters that `uses` counts more than one call of (those that
    require grad), current for the fused branches inside ([`current`]); None (and nothing current) outside
    [`summed`], without grad, or where no such parameter is."""
    shared = [t for t, n in uses.items() if n > 1 and t.requires_grad]
    sums = GradientSums(shared) if shared and _allowed.get() and torch.is_grad_enabled() else None
    reset = _current.set(None if sums is None else (sums, _Sums.apply(sums, *shared)))
    try:
        yield sums
    finally:
        _current.reset(reset)


def current() -> tuple[GradientSums, Tensor] | None:
    """The [`GradientSums`] the fused branches of this forward hand their shared parameters' gradients to, and the
    token their autograd nodes take as an input."""
    return _current.get()


class GradientSums:
    """The summed gradients of `params` over the calls of one forward. Branches look their parameters up
    ([`slots`]), pass the forward's token ([`current`]) to their autograd node as an input, and in backward hand a
    weight's gradient over as its GEMM ([`gemm`]) and any other gradient as a tensor ([`add`]), returning None for
    those parameters."""

    def __init__(self, params: list[Tensor]) -> None:
        self._slot = {id(p): i for i, p in enumerate(params)}
        self._sums: list[Tensor | list[Tensor] | None] = [None] * len(params)
        self.params = params  # kept: while they live, their ids name no other tensor

    def slots(self, *params: Tensor | None) -> tuple[int | None, ...]:
        """Each parameter's slot here, None for those that are not summed here."""
        return tuple(None if p is None else self._slot.get(id(p)) for p in params)

    def gemm(self, slot: int, dy: Tensor, x: Tensor, grad_dtype: torch.dtype) -> None:
        """Add `dy.T @ x` (in `grad_dtype`) to the sum in `slot`: in the GEMM once a sum is there."""
        s = self._sums[slot]
        if isinstance(s, Tensor):
            if grad_dtype != dy.dtype:
                torch.addmm(s, dy.t(), x, out_dtype=grad_dtype, out=s)
            else:
                torch.addmm(s, dy.t(), x, out=s)
            return
        g = torch.mm(dy.t(), x, out_dtype=grad_dtype) if grad_dtype != dy.dtype else torch.mm(dy.t(), x)
        if s is None:
            self._sums[slot] = g
        else:
            s.append(g)

    def add(self, slot: int, grad: Tensor) -> None:
        """Add `grad` to the sum in `slot` (kept, and summed with the others' when the node runs)."""
        s = self._sums[slot]
        if s is None:
            self._sums[slot] = [grad]
        elif isinstance(s, list):
            s.append(grad)
        else:
            s.add_(grad)

    def take(self) -> list[Tensor | None]:
        """The sums, one per parameter (None for one no call handed a gradient), and a fresh start: a second backward
        through the same graph (`retain_graph`) sums anew."""
        lists = [s for s in self._sums if isinstance(s, list)]
        # The kept gradients are the branches' own new tensors: the first of each is summed into in place.
        for r in range(1, max((len(s) for s in lists), default=0)):
            todo = [s for s in lists if len(s) > r]
            torch._foreach_add_([s[0] for s in todo], [s[r] for s in todo])
        sums = [s[0] if isinstance(s, list) else s for s in self._sums]
        self._sums = [None] * len(sums)
        return sums


class _Sums(torch.autograd.Function):
    """Takes the summed parameters as inputs and returns an empty token that the branch calls take: its backward
    runs after theirs and returns the sums."""

    @staticmethod
    def forward(ctx, sums: GradientSums, *params: Tensor) -> Tensor:
        ctx.set_materialize_grads(False)
        ctx.sums = sums
        return params[0].new_empty(0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _: Tensor | None) -> tuple[Tensor | None, ...]:
        return (None, *ctx.sums.take())


__all__ = ["GradientSums", "current", "gradient_sums", "summed"]

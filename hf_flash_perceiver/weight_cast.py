"""Projection weights in the autocast dtype, converted by one multi-tensor kernel per block instead of one per tensor.

Under autocast every `nn.Linear` converts its fp32 weight and bias to the half-precision dtype, one cast kernel each,
and backward converts each gradient back, one more kernel and one more autograd node each: on the latent path of a
Perceiver (short, narrow matrices, dozens of blocks) these conversions were over a quarter of a training step's
kernels, and each costs host time. Here a block converts the weights of its projections together
([`cast_projections`]): one `torch._foreach_copy_` forward, one for the gradients in backward, the gradients coming
back in the parameters' dtype. [`project`] then calls the projection on those copies; autocast leaves tensors
already in its dtype alone, so the values are those of the modules under autocast (the same rounding of the same
weights). Inside [`shared_casts`] (the encoder's forward) a projection that several blocks call (tied layers,
repeated latent stacks) is converted once per forward, as autocast's own cache does; the fused branches of a block
called once per forward convert theirs again in backward rather than keep them ([`BackwardCopies`]). A projection
whose weights are computed from parameters (the cross-attention's key/value projection with the input norm's affine
folded in) is computed in the parameters' precision and converted by the same copy
([`cast_projections`]`(computed=...)`, read back with [`converted`]).

Only where it computes the same function: autocast on, a half-precision autocast dtype, plain `nn.Linear` modules
with parameters of another dtype and no hooks of their own (a PEFT-wrapped or hooked projection is called as a
module), not under `torch.compile` (Inductor fuses the casts itself) and not in a block under activation
checkpointing (its recompute in backward runs outside the forward's scope, so it keeps the module path both times).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

# Off switch for comparisons (benchmarks, tests): the module path everywhere when False.
enabled = True

HALF = (torch.bfloat16, torch.float16)

# The converted `(weight, bias)` of each projection: `_active` is what `project` reads (set by a block while it
# runs), `_shared` the store kept for a whole forward by `shared_casts` (one per grad mode, and one of plain copies
# per dtype for `shared_copies`). Context variables, not globals: threads (nn.DataParallel's replicas) each see their
# own.
_active: ContextVar[dict[Hashable, tuple[Tensor, Tensor | None]] | None] = ContextVar("_active", default=None)
_shared: ContextVar[dict[Hashable, dict] | None] = ContextVar("_shared", default=None)


def cast_tensors(dtype: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    """`tensors` in `dtype` (None stays None), converted by one multi-tensor kernel rather than one launch each;
    returned as they are when all already are in `dtype`. Not differentiable: see [`cast_projections`] for that."""
    present = [t for t in tensors if t is not None]
    if all(t.dtype == dtype for t in present):
        return list(tensors)
    copies = [torch.empty_like(t, dtype=dtype) for t in present]
    with torch.no_grad():
        torch._foreach_copy_(copies, present)
    it = iter(copies)
    return [None if t is None else next(it) for t in tensors]


def _plain_store(dtype: torch.dtype) -> dict[int, tuple[Tensor, Tensor]] | None:
    # Plain copies are kept for the enclosing `shared_casts` scope only while grad is on: then the fused branches save
    # every copy for backward anyway, and keeping them from the start costs no memory; without grad a forward frees
    # each after use.
    shared = _shared.get()
    if shared is None or not torch.is_grad_enabled():
        return None
    return shared.setdefault(("plain", dtype), {})


def shared_copies(dtype: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    """[`cast_tensors`] for the fused residual branches (fused_block.py), whose autograd nodes compute the parameters'
    gradients themselves: inside [`shared_casts`] with grad on, a tensor converted earlier in the scope (by
    [`prefetch_copies`], or by a block sharing its modules) is not converted again."""
    store = _plain_store(dtype)
    if store is None:
        return cast_tensors(dtype, *tensors)
    missing = [t for t in dict.fromkeys(tensors) if t is not None and id(t) not in store]
    if missing:
        prefetch_copies(dtype, missing)
    return [None if t is None else store[id(t)][1] for t in tensors]


def prefetch_copies(dtype: torch.dtype | None, tensors: Iterable[Tensor] | Mapping[Tensor, int]) -> None:
    """Convert `tensors` to `dtype` by one multi-tensor copy and keep the copies for [`shared_copies`] in the
    enclosing [`shared_casts`] scope (a no-op outside one, without grad, or with `dtype` None): the encoder converts
    every fused branch's weights of a forward together rather than one launch per branch. Given as a mapping, each
    tensor's value is the number of calls in this forward that will read its copy ([`converted_once`])."""
    store = None if dtype is None else _plain_store(dtype)
    if store is None:
        return
    if isinstance(tensors, Mapping):
        uses = store.setdefault("uses", {})
        for t, n in tensors.items():
            uses[id(t)] = uses.get(id(t), 0) + n
    todo = [t for t in dict.fromkeys(tensors, None) if id(t) not in store]
    # The source is kept beside its copy: while it lives, its id names no other tensor.
    store.update((id(t), (t, c)) for t, c in zip(todo, cast_tensors(dtype, *todo)))


def converted_once(dtype: torch.dtype, weight: Tensor) -> bool:
    """Whether `weight`'s copy in `dtype` serves a single call in this forward, as [`prefetch_copies`] was told (False
    where it was not told: outside the encoder, or without grad)."""
    store = _plain_store(dtype)
    return store is not None and store.get("uses", {}).get(id(weight)) == 1


class BackwardCopies:
    """The half-precision weight copies that one block's fused branches (fused_block.py) read in their backward,
    converted there again rather than kept from forward to backward: all of the block's by one multi-tensor copy when
    the first of its branches' backwards asks, dropped once each branch has taken its own. Kept, every block's copies
    (half the size of the fp32 weights) would be alive at the start of the backward, where the activations peak."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._sources: list[Tensor] = []
        self._copies: list[Tensor | None] | None = None
        self._waiting = 0

    def add(self, *weights: Tensor) -> slice:
        """Register one branch's `weights`; its backward takes their copies with the returned slice."""
        start = len(self._sources)
        self._sources.extend(weights)
        self._waiting += 1
        return slice(start, len(self._sources))

    def take(self, part: slice) -> list[Tensor | None]:
        """The copies of the weights registered as `part`, converted (with the block's others) on first use. A
        second backward through the same graph (`retain_graph`) converts them again."""
        if self._copies is None:
            self._copies = cast_tensors(self.dtype, *self._sources)
        copies = self._copies[part]
        self._waiting -= 1
        if self._waiting <= 0:
            self._copies = None
        return copies


class _CastParameters(torch.autograd.Function):
    """Differentiable [`cast_tensors`]: the gradients of the copies come back in each input's dtype, converted
    together as well."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.dtypes = [t.dtype for t in tensors]
        return tuple(cast_tensors(dtype, *tensors))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        keep = [g if g is not None and ctx.needs_input_grad[i + 1] else None for i, g in enumerate(grads)]
        present = [(i, g) for i, g in enumerate(keep) if g is not None]
        out: list[Tensor | None] = [None] * len(grads)
        if present:
            full = [torch.empty_like(g, dtype=ctx.dtypes[i]) for i, g in present]
            torch._foreach_copy_(full, [g for _, g in present])
            for (i, _), f in zip(present, full):
                out[i] = f
        return (None, *out)


def _target_dtype(x: Tensor) -> torch.dtype | None:
    if not enabled or torch.compiler.is_compiling():
        return None
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype in HALF else None


def plain(module: nn.Module | None, cls: type[nn.Module]) -> bool:
    """`module` is exactly a `cls` without hooks of its own, so that computing with its parameters is calling it (a
    subclass, such as a PEFT wrapper, or a hooked module has to be called)."""
    return type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)


def _castable(linear: nn.Module, dtype: torch.dtype) -> bool:
    """A plain `nn.Linear` without hooks (so calling it is exactly `F.linear`) whose parameters autocast would
    convert to `dtype`."""
    if not plain(linear, nn.Linear):
        return False
    weight = linear.weight
    if type(weight) not in (nn.Parameter, Tensor) or weight.dtype == dtype or not weight.is_floating_point():
        return False
    return linear.bias is None or type(linear.bias) in (nn.Parameter, Tensor)


@contextmanager
def shared_casts() -> Iterator[None]:
    """Keep the conversions made by the blocks inside for the whole block of code (one model forward): a projection
    called by several blocks is converted once, and so is a fused branch's weight ([`shared_copies`]). Nested scopes
    share the outermost one."""
    if not enabled or torch.compiler.is_compiling() or _shared.get() is not None:
        yield
        return
    token = _shared.set({})
    try:
        yield
    finally:
        _shared.reset(token)


@contextmanager
def unshared() -> Iterator[None]:
    """No [`shared_casts`] scope inside: for a block under activation checkpointing, whose forward frees what it
    converts (its recompute in backward converts again)."""
    token = _shared.set(None)
    try:
        yield
    finally:
        _shared.reset(token)


@contextmanager
def cast_projections(
    linears: Iterable[nn.Module], x: Tensor,
    computed: Mapping[Hashable, Callable[[], tuple[Tensor, Tensor | None]]] | None = None,
) -> Iterator[None]:
    """Within the block, [`project`] calls each of `linears` that qualifies (see the module docstring) on its
    weight and bias converted to the autocast dtype of `x`'s device, all converted by one differentiable
    multi-tensor copy (or taken from the enclosing [`shared_casts`] scope).

    `computed` maps keys to functions returning a projection's `(weight, bias)` derived from parameters (a
    LayerNorm's affine folded into the Linear after it): each is computed with autocast off, in the parameters'
    precision, and converted by the same copy; [`converted`] returns the result by its key. Under autocast the ops
    inside would each convert their operands, and the projection its result, one kernel each way per tensor."""
    dtype = _target_dtype(x)
    if dtype is None or (_module._global_forward_hooks or _module._global_forward_pre_hooks):
        yield
        return
    # Copies made without grad carry none: a scope keeps one store per grad mode.
    grad = torch.is_grad_enabled()
    shared = _shared.get()
    store = {} if shared is None else shared.setdefault(grad, {})
    entries = {m: (m.weight, m.bias) for m in dict.fromkeys(linears) if m not in store and _castable(m, dtype)}
    if computed:
        with torch.autocast(x.device.type, enabled=False):
            for key, compute in computed.items():
                if key not in store:
                    weight, bias = compute()
                    if weight.dtype == dtype:  # half-precision parameters: nothing to convert, keep the result
                        store[key] = (weight, bias)
                    else:
                        entries[key] = (weight, bias)
    if entries:
        tensors = [t for pair in entries.values() for t in pair if t is not None]
        # Frozen parameters get plain copies: a copy that required grad would make the projection's backward compute
        # a weight gradient nobody reads.
        trained = [t for t in tensors if grad and t.requires_grad]
        frozen = [t for t in tensors if not (grad and t.requires_grad)]
        copies = dict(zip(map(id, trained), _CastParameters.apply(dtype, *trained))) if trained else {}
        copies.update(zip(map(id, frozen), cast_tensors(dtype, *frozen)))
        for key, (weight, bias) in entries.items():
            store[key] = (copies[id(weight)], None if bias is None else copies[id(bias)])
    token = _active.set(store)
    try:
        yield
    finally:
        _active.reset(token)


def converted(key: Hashable) -> tuple[Tensor, Tensor | None] | None:
    """The converted `(weight, bias)` stored under `key` (a Linear, or a key of `computed`) by the enclosing
    [`cast_projections`], or None where it converted none."""
    # (Dynamo does not trace context variables; compiled code never converts here.)
    active = None if torch.compiler.is_compiling() else _active.get()
    return active.get(key) if active is not None else None


def project(linear: nn.Module, x: Tensor) -> Tensor:
    """`linear(x)`, on the weights converted by the enclosing [`cast_projections`] when it converted them."""
    cast = converted(linear)
    if cast is None:
        return linear(x)
    return F.linear(x, *cast)


__all__ = [
    "BackwardCopies", "cast_projections", "cast_tensors", "converted", "converted_once", "enabled", "plain",
    "prefetch_copies", "project", "shared_casts", "shared_copies", "unshared",
]

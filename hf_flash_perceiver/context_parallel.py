"""Context parallelism for inputs longer than one device holds: each rank holds a slice of the input sequence.

Inside `with context_parallel(group):`, every encoder cross-attention treats the inputs (and masks) it is given as
this rank's slice of one long sequence, in rank order; the latents, and so everything after the cross-attentions,
are replicated on every rank. Each rank computes its partial attention (output and log-sum-exp) over its own keys,
chunk by chunk as `cross_attention_checkpointing` does, and the ranks merge the partials exactly through their
log-sum-exp with `torch.distributed` all-reduces. Backward is written out: each rank recomputes its chunks against
the merged output, the query gradient and the gradients of the input-side parameters (LayerNorm, key/value
projection) are summed over the ranks, and the input gradient stays local. After `backward()` every rank holds the
same, complete parameter gradients: the same optimizer step keeps the replicas identical without DDP.

Every rank must call the model with the same structure (the same inputs in the same places, the same batch and
latents); slices may differ in length. Zero tokens are attended on rank 0; rotary positions are global.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .attention_backends import KeyPaddingMask


# A plain module-level slot, not a ContextVar: torch.compile cannot trace `ContextVar.get` (transformers' output
# capturing falls back to a global for the same reason). One context-parallel region per process at a time.
_STATE: dict[str, object | None] = {"group": None}


@contextmanager
def context_parallel(group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """Run the Perceiver encoders called inside this block context-parallel over `group` (default: the world).

    Args:
        group (`torch.distributed.ProcessGroup`, *optional*): the ranks that share the sequence; each passes its own
            slice of every input (and of its mask), in rank order.

    Example:

    ```python
    >>> with context_parallel():
    ...     out = model(local_slice, attention_mask=local_mask)  # the same `out` on every rank
    ...     out.last_hidden_state.sum().backward()                # the same, complete gradients on every rank
    ```
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context_parallel() needs an initialised torch.distributed process group (init_process_group).")
    previous = _STATE["group"]
    _STATE["group"] = group if group is not None else dist.group.WORLD
    try:
        yield
    finally:
        _STATE["group"] = previous


def current_group() -> object | None:
    """The process group of the enclosing `context_parallel` block, or None outside one."""
    return _STATE["group"]


@dataclass(frozen=True)
class SequenceShard:
    """Where this rank's slice sits in the whole sequence.

    Attributes:
        group: the process group the slices are spread over.
        key_offset: how many input tokens the ranks before this one hold (rotary positions are global).
        is_first: whether this rank holds the start of the sequence. Every rank carries the zero tokens (so that
            each ends up with their gradient), but only the first attends to them.
    """

    group: object
    key_offset: int
    is_first: bool


def shard_input(x: Tensor, mask: Tensor | None, group) -> tuple[SequenceShard, KeyPaddingMask | None]:
    """This rank's `SequenceShard` and key-padding mask for its slice `x (batch, local_len, dim)`.

    The mask's `has_keys` is global (a sample counts as empty only if it has no valid key on any rank): a slice in
    which a sample has no valid key contributes nothing to it through the merge, instead of being forced to attend
    its padding as a sample without any key would be. Collectives: one all-gather of the slice lengths and one
    all-reduce of `has_keys`, on every rank alike.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    lengths = [torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([x.shape[1]], dtype=torch.int64, device=x.device), group=group)
    before = int(sum(int(n) for n in lengths[:rank]))
    shard = SequenceShard(group=group, key_offset=before, is_first=rank == 0)
    local = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask
    has_keys = local.any(dim=-1).to(torch.int32)
    dist.all_reduce(has_keys, op=dist.ReduceOp.MAX, group=group)
    has_keys = has_keys.bool()
    if mask is None and bool(has_keys.all()):
        return shard, None
    # Samples without a key anywhere attend to their (zeroed) padding, finite, and are zeroed after the merge.
    return shard, KeyPaddingMask(mask=local | ~has_keys[:, None], has_keys=has_keys)


def merge_partials(out: Tensor, lse: Tensor, group) -> tuple[Tensor, Tensor]:
    """Merge every rank's partial attention `out (batch, heads, q, head_dim)` (fp32) with its log-sum-exp
    `lse (batch, heads, q)` into the attention over all keys: the same result on every rank."""
    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    weight = torch.exp(lse - top)
    total = weight.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    merged = out * (weight / total)[..., None]
    dist.all_reduce(merged, op=dist.ReduceOp.SUM, group=group)
    return merged, top + torch.log(total)


def sum_over_ranks(tensors: list[Tensor | None], group) -> None:
    """Sum each tensor over the ranks, in place (None entries are skipped, alike on every rank)."""
    for t in tensors:
        if t is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


__all__ = ["SequenceShard", "context_parallel", "current_group", "merge_partials", "shard_input", "sum_over_ranks"]

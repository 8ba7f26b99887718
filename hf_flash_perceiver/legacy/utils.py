"""Helpers of the `flash-perceiver` 0.2.0 API (`flash_perceiver.utils`): masks, parameter counts, coordinate grids.

`utils.encodings` is the positional-encoding module, as in the seed (`utils.encodings.NeRFPositionalEncoding`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# `utils.encodings` is importable as a module path (`from hf_flash_perceiver.utils.encodings import X`, the seed's
# `flash_perceiver.utils.encodings`) through the `sys.modules` aliases that `hf_flash_perceiver.legacy` installs.
from . import encodings


def random_mask(x: Tensor) -> Tensor:
    """A random key-padding mask for `x` of shape `(batch, seq_len, ...)`: sample `b` keeps its first `L_b` tokens,
    `L_b` uniform in `[1, seq_len]` (so no sample is fully masked).

    Returns:
        `torch.BoolTensor` of shape `(batch, seq_len)`, True = attend.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"`random_mask` expects a tensor of shape (batch, seq_len, ...), got {got}.")
    batch, seq_len = x.shape[:2]
    lengths = torch.randint(1, seq_len + 1, (batch,), device=x.device)
    return torch.arange(seq_len, device=x.device)[None, :] < lengths[:, None]


def numel(m: nn.Module, only_trainable: bool = True) -> int:
    """Number of parameters of `m` (only those with `requires_grad` unless `only_trainable=False`).

    Shared parameters are counted once (`nn.Module.parameters` deduplicates them).
    """
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not only_trainable)


def meshgrid(*size: int, batch_size: int | None = None) -> Tensor:
    """Coordinates of a regular grid in `[-1, 1]^d`, as flash-perceiver 0.2.0 computed them.

    Each axis is `torch.linspace(-1, 1, n)`, the seed's code, so a one-point axis sits at -1 (seed checkpoints were
    trained on that), as in the core image adapter's grid ([`fourier_position_features`]).

    Args:
        size (`int`...): points per axis, e.g. `meshgrid(h, w)`.
        batch_size (`int`, *optional*): prepend a batch axis of this size.

    Returns:
        `torch.FloatTensor` of shape `(*size, len(size))` (`(batch_size, *size, len(size))` with `batch_size`), where
        `grid[i, j] = (y_i, x_j)` ("ij" indexing).
    """
    if not size or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in size):
        raise ValueError(f"`meshgrid` expects one positive int per axis, got {size!r}.")
    axes = [torch.linspace(-1, 1, n) for n in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    if batch_size is not None:
        grid = grid.expand(batch_size, *grid.shape).clone()
    return grid


__all__ = ["random_mask", "numel", "meshgrid", "encodings"]

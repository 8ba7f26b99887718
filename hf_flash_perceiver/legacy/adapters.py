"""Input adapters of the `flash-perceiver` 0.2.0 API (`flash_perceiver.adapters`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .encodings import BasePositionalEncoding
from .utils import meshgrid


class ImageAdapter(nn.Module):
    r"""Turns images into Perceiver input tokens: optional patching, optional positional encoding of the (patch)
    grid, then `LayerNorm -> Linear -> LayerNorm` to `embed_dim`.

    Token layout and parameter names match the seed (`proj.0/1/2`, `pos_encoding.*`), so a seed adapter's
    `state_dict` loads here unchanged: a patch's features are ordered (row in patch, column in patch, channel),
    followed by the encoding of the patch's grid position; tokens are in row-major order.

    Args:
        embed_dim (`int`): width of the output tokens (the Perceiver's `input_dim`).
        num_channels (`int`, *optional*, defaults to 3): image channels.
        pos_encoding ([`~encodings.BasePositionalEncoding`], *optional*):
            Encoding of the grid coordinates in `[-1, 1]^2` (its `in_dim` must be 2). None: no position features.
        patch_size (`int` or `tuple[int, int]`, *optional*):
            Patch size, `(along height, along width)` for a tuple (the seed's code order). None: one token per pixel.
        channel_first (`bool`, *optional*, defaults to `True`): images are `(B, C, H, W)`; `(B, H, W, C)` otherwise.

    Returns (forward): `torch.FloatTensor` of shape `(batch, (H / p_h) * (W / p_w), embed_dim)`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_channels: int = 3,
        pos_encoding: BasePositionalEncoding | None = None,
        patch_size: int | tuple[int, int] | None = None,
        channel_first: bool = True,
    ):
        super().__init__()
        if isinstance(patch_size, int):
            patch_size = (patch_size, patch_size)
        if patch_size is not None and (len(patch_size) != 2 or any(p <= 0 for p in patch_size)):
            raise ValueError(f"`patch_size` must be a positive int or a pair of them, got {patch_size!r}.")
        if pos_encoding is not None and pos_encoding.in_dim != 2:
            raise ValueError(f"`pos_encoding` encodes 2-D grid coordinates and needs in_dim=2, got {pos_encoding.in_dim}.")
        self.embed_dim = embed_dim
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.pos_encoding = pos_encoding
        self.channel_first = channel_first
        self.patch_dim = (math.prod(patch_size) if patch_size else 1) * num_channels
        if pos_encoding is not None:
            self.patch_dim += pos_encoding.out_dim
        self.proj = nn.Sequential(
            nn.LayerNorm(self.patch_dim), nn.Linear(self.patch_dim, embed_dim), nn.LayerNorm(embed_dim)
        )

    def patchify(self, x: Tensor) -> Tensor:
        """`(B, H, W, C)` -> `(B, H/p_h, W/p_w, p_h * p_w * C)`."""
        if self.patch_size is None:
            return x
        (ph, pw), (b, h, w, c) = self.patch_size, x.shape
        if h % ph or w % pw:
            raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {ph}x{pw}.")
        x = x.reshape(b, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h // ph, w // pw, ph * pw * c)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            layout = "(B, C, H, W)" if self.channel_first else "(B, H, W, C)"
            raise ValueError(f"ImageAdapter expects images of shape {layout}, got {got}.")
        if self.channel_first:
            x = x.permute(0, 2, 3, 1)
        if x.shape[-1] != self.num_channels:
            raise ValueError(f"ImageAdapter expects {self.num_channels} channels, got {x.shape[-1]} (shape {tuple(x.shape)}).")
        x = self.patchify(x)
        if self.pos_encoding is not None:
            b, h, w, _ = x.shape
            # The grid always spans [-1, 1] for the current size (the seed cropped a grid cached for a larger image).
            grid = meshgrid(h, w).to(device=x.device, dtype=x.dtype)
            x = torch.cat([x, self.pos_encoding(grid).expand(b, -1, -1, -1)], dim=-1)
        return self.proj(x).flatten(1, 2)


__all__ = ["ImageAdapter"]

"""Input adapters: turn images and token ids into the `(batch, seq_len, width)` features the Perceiver encoder reads.

Raw features need no adapter (the encoder validates them itself). Each adapter validates its own input and raises a
`ValueError`/`TypeError` naming what it expected, so that a bad batch fails here rather than deep inside torch.
Position features are computed on the fly (nothing non-persistent to rebuild after a meta-device load).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .configuration_perceiver import PerceiverConfig


def fourier_features(positions: Tensor, num_bands: int, max_resolution: Sequence[float]) -> Tensor:
    r"""
    Fourier features of points, as in the Perceiver paper.

    Per axis: the position itself, then `sin(pi * f * x)` and `cos(pi * f * x)` for `num_bands` frequencies `f`
    spaced linearly from 1 to the axis' Nyquist frequency `max_resolution / 2`.

    Args:
        positions (`torch.Tensor` of shape `(..., num_axes)`): coordinates, each axis scaled to `[-1, 1]`.
        num_bands (`int`): frequencies per axis.
        max_resolution (`Sequence[float]`): per axis, the number of samples the frequencies are chosen for.

    Returns:
        `torch.Tensor` of shape `(..., num_axes * (2 * num_bands + 1))` in float32: positions, then all sines, then all
        cosines.
    """
    if len(max_resolution) != positions.shape[-1]:
        raise ValueError(
            f"`max_resolution` needs one entry per axis ({positions.shape[-1]}), got {tuple(max_resolution)}."
        )
    positions = positions.float()
    freqs = torch.stack(
        [torch.linspace(1.0, max(res / 2, 1.0), num_bands, device=positions.device) for res in max_resolution]
    )  # (axes, bands)
    angles = (math.pi * positions[..., None] * freqs).flatten(-2)  # (..., axes * bands)
    return torch.cat([positions, angles.sin(), angles.cos()], dim=-1)


def fourier_position_features(
    shape: Sequence[int],
    num_bands: int,
    max_resolution: Sequence[int] | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    r"""
    [`fourier_features`] of every point of an N-d grid, each axis spanning `[-1, 1]`.

    Args:
        shape (`Sequence[int]`): the grid, e.g. `(height, width)`.
        num_bands (`int`): frequencies per axis.
        max_resolution (`Sequence[int]`, *optional*): the resolution the frequencies are chosen for (defaults to
            `shape`). Fixing it lets one model read grids of other sizes with the same frequencies.
        device, dtype: of the result (computed in float32).

    Returns:
        `torch.Tensor` of shape `(prod(shape), len(shape) * (2 * num_bands + 1))`, row-major over the grid.
    """
    max_resolution = tuple(shape) if max_resolution is None else tuple(max_resolution)
    # A one-point axis sits at the centre, 0 (the legacy `utils.meshgrid` keeps the seed's -1 there).
    axes = [torch.linspace(-1.0, 1.0, n, device=device) if n > 1 else torch.zeros(1, device=device) for n in shape]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))
    return fourier_features(positions, num_bands, max_resolution).to(dtype)


def fourier_feature_dim(num_axes: int, num_bands: int) -> int:
    """Width of [`fourier_position_features`] for `num_axes` axes."""
    return num_axes * (2 * num_bands + 1)


class PerceiverImageAdapter(nn.Module):
    r"""
    Images to tokens: `pixel_values (batch, num_channels, height, width)` are cut into `patch_size` x `patch_size`
    patches (one token per pixel when `patch_size=1`), 2-D positions are added, and each token is projected to
    `width`.

    Positions are Fourier features concatenated to the patch (`config.num_fourier_bands > 0`; frequencies fixed by
    `config.image_size`, so other sizes divisible by the patch size also work) or a learned table added after the
    projection (`num_fourier_bands=0`; then the image must be `image_size` x `image_size`).
    """

    def __init__(self, config: PerceiverConfig, width: int):
        super().__init__()
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        self.num_bands = config.num_fourier_bands
        self.grid_size = config.image_size // config.patch_size
        patch_dim = config.num_channels * config.patch_size**2
        if self.num_bands:
            self.proj = nn.Linear(patch_dim + fourier_feature_dim(2, self.num_bands), width)
            self.position_embeddings = None
        else:
            self.proj = nn.Linear(patch_dim, width)
            self.position_embeddings = nn.Embedding(self.grid_size**2, width)

    def check(self, pixel_values: Tensor) -> None:
        expected = f"(batch, {self.num_channels}, height, width)"
        if not isinstance(pixel_values, Tensor):
            raise TypeError(f"`pixel_values` must be a tensor of shape {expected}, got {type(pixel_values).__name__}.")
        if pixel_values.dim() != 4:
            raise ValueError(f"`pixel_values` must have shape {expected}, got {tuple(pixel_values.shape)}.")
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"`pixel_values` must be floating point (an image processor's output), got dtype {pixel_values.dtype}."
            )
        if pixel_values.is_meta:
            raise ValueError("`pixel_values` is on the meta device (no data); move it to a real device first.")
        channels, height, width = pixel_values.shape[1:]
        if height == 0 or width == 0 or pixel_values.shape[0] == 0:
            raise ValueError(
                f"`pixel_values` must hold at least one image of at least one pixel, got {tuple(pixel_values.shape)}."
            )
        if channels != self.num_channels:
            raise ValueError(
                f"`pixel_values` has {channels} channels but the model expects config.num_channels="
                f"{self.num_channels}: shape {expected}, got {tuple(pixel_values.shape)}."
            )
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by config.patch_size={self.patch_size}."
            )
        if self.position_embeddings is not None and (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"Learned positions (num_fourier_bands=0) need {self.image_size}x{self.image_size} images "
                f"(config.image_size), got {height}x{width}."
            )

    def patchify(self, pixel_values: Tensor) -> Tensor:
        """`(batch, C, H, W)` -> `(batch, (H/p) * (W/p), C * p * p)`, patches row-major."""
        p = self.patch_size
        batch, channels, height, width = pixel_values.shape
        x = pixel_values.reshape(batch, channels, height // p, p, width // p, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), channels * p * p)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """`pixel_values (batch, num_channels, H, W)` -> tokens `(batch, (H/p) * (W/p), width)`."""
        self.check(pixel_values)
        # Processors emit float32; a model loaded in bf16/fp16 takes the pixels in its own dtype.
        tokens = self.patchify(pixel_values.to(self.proj.weight.dtype))
        if self.position_embeddings is None:
            grid = (pixel_values.shape[2] // self.patch_size, pixel_values.shape[3] // self.patch_size)
            positions = fourier_position_features(
                grid, self.num_bands, (self.grid_size, self.grid_size), tokens.device, tokens.dtype
            )
            tokens = torch.cat([tokens, positions.expand(tokens.shape[0], -1, -1)], dim=-1)
            return self.proj(tokens)
        return self.proj(tokens) + self.position_embeddings.weight.to(tokens.dtype)


INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class PerceiverTextAdapter(nn.Module):
    r"""
    Token ids to tokens: a token embedding (`config.vocab_size` entries) plus a learned position embedding
    (`config.max_position_embeddings` entries), both of width `width`.
    """

    def __init__(self, config: PerceiverConfig, width: int):
        super().__init__()
        self.max_positions = config.max_position_embeddings
        self.token_embeddings = nn.Embedding(config.vocab_size, width)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, width)

    def check(self, input_ids: Tensor) -> None:
        if not isinstance(input_ids, Tensor):
            raise TypeError(f"`input_ids` must be a tensor of shape (batch, seq_len), got {type(input_ids).__name__}.")
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must have shape (batch, seq_len), got {tuple(input_ids.shape)}.")
        if input_ids.dtype not in INTEGER_DTYPES:
            raise TypeError(f"`input_ids` must be integer token ids (torch.long), got dtype {input_ids.dtype}.")
        if input_ids.is_meta:
            raise ValueError("`input_ids` is on the meta device (no data); move it to a real device first.")
        if input_ids.shape[1] > self.max_positions:
            raise ValueError(
                f"Sequence length {input_ids.shape[1]} exceeds config.max_position_embeddings={self.max_positions}."
            )
        # An out-of-range id would otherwise surface as an IndexError (CPU) or a device-side assert (CUDA). Eager
        # mode only: the check syncs with the host, which a compiled graph cannot do.
        if not torch.compiler.is_compiling() and input_ids.numel():
            # The table's own size, not a copy of config.vocab_size: resize_token_embeddings replaces the table.
            vocab_size = self.token_embeddings.num_embeddings
            low, high = torch.aminmax(input_ids)  # one host sync for both bounds
            low, high = int(low), int(high)
            if low < 0 or high >= vocab_size:
                raise ValueError(
                    f"`input_ids` must be in [0, {vocab_size}) (config.vocab_size), got values in [{low}, {high}]."
                )

    def forward(self, input_ids: Tensor) -> Tensor:
        """`input_ids (batch, seq_len)` -> tokens `(batch, seq_len, width)`."""
        self.check(input_ids)
        positions = self.position_embeddings.weight[: input_ids.shape[1]]
        return self.token_embeddings(input_ids) + positions


__all__ = [
    "PerceiverImageAdapter",
    "PerceiverTextAdapter",
    "fourier_features",
    "fourier_position_features",
    "fourier_feature_dim",
]

"""Input adapters: turn images, frame pairs (optical flow) and token ids into the `(batch, seq_len, width)` features
the Perceiver encoder reads.

Raw features need no adapter (the encoder validates them itself). Each adapter validates its own input and raises a
`ValueError`/`TypeError` naming what it expected, so that a bad batch fails here rather than deep inside torch.
Position features are computed on the fly (nothing non-persistent to rebuild after a meta-device load).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configuration_perceiver import PerceiverConfig
from .fused_concat import concat_positions
from .weight_cast import plain


def fourier_features(positions: Tensor, num_bands: int, max_resolution: Sequence[float]) -> Tensor:
    r"""
    Fourier features of points, as in the Perceiver paper.

    Per axis: the position itself, then `sin(pi * f * x)` and `cos(pi * f * x)` for `num_bands` frequencies `f`
    spaced linearly from 1 to the axis' Nyquist frequency `max_resolution / 2` (the Perceiver papers' encoding, as
    transformers' `generate_fourier_features` computes it, so that its pretrained checkpoints see the same features).

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
        [torch.linspace(1.0, res / 2, num_bands, device=positions.device) for res in max_resolution]
    )  # (axes, bands)
    # pi * (x * f), not (pi * x) * f: transformers' `generate_fourier_features` rounds in this order, and a
    # converted checkpoint should see the same float32 angles.
    angles = (math.pi * (positions[..., None] * freqs)).flatten(-2)  # (..., axes * bands)
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
    # `linspace(-1, 1, n)` on every axis, a one-point axis at -1: as transformers' Perceiver and flash-perceiver 0.2.0
    # build their grids, whose checkpoints were trained on it.
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in shape]
    positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))
    return fourier_features(positions, num_bands, max_resolution).to(dtype)


def fourier_feature_dim(num_axes: int, num_bands: int) -> int:
    """Width of [`fourier_position_features`] for `num_axes` axes."""
    return num_axes * (2 * num_bands + 1)


# --------------------------------------------------------------------------------------------- image adapters

# transformers' `Conv2dSamePadding` pads (left/top, right/bottom) = (k//2 + (k - 2*(k//2)) - 1, k//2): (3, 3) for the
# 7x7 kernel. That is symmetric, not TensorFlow's stride-aware "same" ((2, 3) on even sizes at stride 2); it is
# reproduced as is because a checkpoint converted from transformers must give transformers' outputs.
CONV_KERNEL, CONV_STRIDE, POOL_KERNEL, POOL_STRIDE = 7, 2, 3, 2
CONV_PAD = (CONV_KERNEL // 2 + (CONV_KERNEL - 2 * (CONV_KERNEL // 2)) - 1, CONV_KERNEL // 2)


def _conv_grid_axis(size: int) -> int:
    """Tokens along one axis of `size` pixels after the "conv" adapter's padded 7x7/2 conv and unpadded 3x3/2 pool
    (0 when too small). 224 gives 55 (transformers' checkpoints nevertheless choose Fourier frequencies for 56)."""
    conv = (size + sum(CONV_PAD) - CONV_KERNEL) // CONV_STRIDE + 1
    return (conv - POOL_KERNEL) // POOL_STRIDE + 1 if conv >= POOL_KERNEL else 0


def _max_resolution(config: PerceiverConfig, default: tuple[int, int] | None) -> tuple[int, int] | None:
    if config.fourier_max_resolution is None:
        return default
    if len(config.fourier_max_resolution) != 2:
        raise ValueError(
            f"Image inputs have 2 spatial axes (height, width), so `config.fourier_max_resolution` needs 2 entries, "
            f"got {config.fourier_max_resolution!r}."
        )
    return tuple(int(r) for r in config.fourier_max_resolution)


def image_adapter_width(config: PerceiverConfig, width: int | None = None) -> int:
    r"""
    Width of the tokens [`PerceiverImageAdapter`] makes from `config`.

    Args:
        config ([`PerceiverConfig`]): reads `image_adapter` and the fields of that variant.
        width (`int`, *optional*): the projection width of the `"linear"` adapter, which is free (returned as given);
            when unset, `config.input_dim` (or `latent_dim` when that is unset), as the heads choose it.

    Returns:
        `int`: `"linear"`: `width`; `"conv1x1"`: `image_embed_dim + image_position_dim` (learned positions,
        `num_fourier_bands=0`) or `image_embed_dim + 2 * (2 * num_fourier_bands + 1)`; `"pixels"`:
        `num_channels + 2 * (2 * num_fourier_bands + 1)`; `"conv"`: `image_embed_dim + 2 * (2 * num_fourier_bands + 1)`.
    """
    kind = config.image_adapter
    if kind == "linear":
        if width is not None:
            return width
        if isinstance(config.input_dim, list):
            raise ValueError(
                f"An image adapter makes one input: `input_dim` must be an int or None, got {config.input_dim}."
            )
        return config.latent_dim if config.input_dim is None else config.input_dim
    positions = fourier_feature_dim(2, config.num_fourier_bands)
    if kind == "conv1x1":
        return config.image_embed_dim + (config.image_position_dim if config.num_fourier_bands == 0 else positions)
    if kind == "pixels":
        return config.num_channels + positions
    if kind == "conv":
        return config.image_embed_dim + positions
    raise ValueError(f"Unknown `config.image_adapter` {kind!r}; expected one of 'linear', 'conv1x1', 'pixels', 'conv'.")


def _check_floating_tensor(name: str, value, expected: str, dims: int) -> None:
    """The checks every pixel input shares: a real, non-empty floating-point tensor of `dims` dimensions."""
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a tensor of shape {expected}, got {type(value).__name__}.")
    if value.dim() != dims:
        raise ValueError(f"`{name}` must have shape {expected}, got {tuple(value.shape)}.")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must be floating point (an image processor's output), got dtype {value.dtype}.")
    if value.is_meta:
        raise ValueError(f"`{name}` is on the meta device (no data); move it to a real device first.")
    # Batch and pixel axes only: a channel or frame count of 0 gets the more specific mismatch message.
    if value.shape[0] == 0 or 0 in value.shape[-2:]:
        raise ValueError(f"`{name}` must hold at least one image of at least one pixel, got {tuple(value.shape)}.")


class PerceiverImageAdapter(nn.Module):
    r"""
    Images to tokens: `pixel_values (batch, num_channels, height, width)` become `(batch, tokens, width)`, tokens
    row-major over the (possibly downsampled) pixel grid, features channels-last. `config.image_adapter` picks how:

    - `"linear"`: the image is cut into `patch_size` x `patch_size` patches (one token per pixel when `patch_size=1`)
      and each patch is projected to `width` by `proj`. Positions are Fourier features concatenated to the patch
      before the projection (`num_fourier_bands > 0`) or a learned table `position_embeddings` added after it
      (`num_fourier_bands=0`; then the image must be `image_size` x `image_size`).
    - `"conv1x1"` (transformers' `PerceiverForImageClassificationLearned`): a 1x1 convolution `conv` to
      `image_embed_dim` channels, then positions concatenated: a learned table `position_embeddings` of width
      `image_position_dim` (`num_fourier_bands=0`, images must be `image_size` x `image_size`) or Fourier features.
    - `"pixels"` (`PerceiverForImageClassificationFourier`): the raw pixels, Fourier positions concatenated. No
      parameters, so the tokens keep the input's floating dtype.
    - `"conv"` (`PerceiverForImageClassificationConvProcessing`): a 7x7 stride-2 convolution `conv` (no bias, zero
      "same" padding of 3 on every side as transformers pads it), `batchnorm`, ReLU and a 3x3 stride-2 max-pool
      without padding, then Fourier positions over the pooled grid. A 224 image gives a 55 x 55 grid.

    Fourier frequencies are chosen for `config.fourier_max_resolution` when set, else for the adapter's token grid at
    `image_size` (so other image sizes read with the same frequencies). The non-`"linear"` adapters set their width
    themselves ([`image_adapter_width`]); `width` must equal it.

    Args:
        config ([`PerceiverConfig`]): the image fields (`image_adapter`, `num_channels`, `image_size`, `patch_size`,
            `num_fourier_bands`, `image_embed_dim`, `image_position_dim`, `fourier_max_resolution`).
        width (`int`): token width; free for `"linear"`, else must be `image_adapter_width(config)`.
    """

    def __init__(self, config: PerceiverConfig, width: int):
        super().__init__()
        self.kind = config.image_adapter
        self.num_channels = config.num_channels
        self.patch_size = config.patch_size
        self.image_size = config.image_size
        self.num_bands = config.num_fourier_bands
        expected = image_adapter_width(config, width)
        if width != expected:
            raise ValueError(
                f"`image_adapter={self.kind!r}` makes tokens of width {expected} (image_adapter_width(config)), "
                f"but the adapter was asked for width {width}."
            )
        self.width = width
        if self.kind == "linear":
            self.grid_size = config.image_size // config.patch_size
            patch_dim = config.num_channels * config.patch_size**2
            if self.num_bands:
                self.proj = nn.Linear(patch_dim + fourier_feature_dim(2, self.num_bands), width)
                self.position_embeddings = None
            else:
                self.proj = nn.Linear(patch_dim, width)
                self.position_embeddings = nn.Embedding(self.grid_size**2, width)
        else:
            if self.kind in ("pixels", "conv") and not self.num_bands:
                # The config refuses this too; repeated for a config edited after validation.
                raise ValueError(f"`image_adapter={self.kind!r}` needs Fourier positions: num_fourier_bands > 0.")
            self.grid_size = _conv_grid_axis(config.image_size) if self.kind == "conv" else config.image_size
            self.position_embeddings = None
            if self.kind == "conv1x1":
                self.conv = nn.Conv2d(config.num_channels, config.image_embed_dim, kernel_size=1)
                if not self.num_bands:
                    self.position_embeddings = nn.Embedding(config.image_size**2, config.image_position_dim)
            elif self.kind == "conv":
                self.conv = nn.Conv2d(
                    config.num_channels, config.image_embed_dim, kernel_size=CONV_KERNEL, stride=CONV_STRIDE, bias=False
                )
                self.batchnorm = nn.BatchNorm2d(config.image_embed_dim)
                self.max_pool = nn.MaxPool2d(kernel_size=POOL_KERNEL, stride=POOL_STRIDE)
        self.max_resolution = _max_resolution(config, (self.grid_size, self.grid_size))

    def grid(self, pixel_values: Tensor) -> tuple[int, int]:
        """The `(rows, columns)` token grid this adapter makes from `pixel_values` (tokens = rows * columns)."""
        height, width = pixel_values.shape[-2:]
        if self.kind == "linear":
            return height // self.patch_size, width // self.patch_size
        if self.kind == "conv":
            return _conv_grid_axis(height), _conv_grid_axis(width)
        return height, width

    def check(self, pixel_values: Tensor) -> None:
        expected = f"(batch, {self.num_channels}, height, width)"
        _check_floating_tensor("pixel_values", pixel_values, expected, dims=4)
        channels, height, width = pixel_values.shape[1:]
        if channels != self.num_channels:
            raise ValueError(
                f"`pixel_values` has {channels} channels but the model expects config.num_channels="
                f"{self.num_channels}: shape {expected}, got {tuple(pixel_values.shape)}."
            )
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by config.patch_size={self.patch_size}."
            )
        if self.kind == "conv" and 0 in self.grid(pixel_values):
            raise ValueError(
                f"`image_adapter='conv'` (7x7/2 conv and 3x3/2 max-pool) needs images of at least 5x5 pixels to leave "
                f"one token, got {height}x{width}."
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

    def _positions(self, grid: tuple[int, int], like: Tensor) -> Tensor:
        return fourier_position_features(grid, self.num_bands, self.max_resolution, like.device, like.dtype)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """`pixel_values (batch, num_channels, H, W)` -> tokens `(batch, rows * columns, width)` ([`grid`])."""
        self.check(pixel_values)
        if self.kind == "linear":
            return self._forward_linear(pixel_values)
        if self.kind != "pixels":
            # Processors emit float32; a model loaded in bf16/fp16 takes the pixels in its own dtype.
            pixel_values = pixel_values.to(self.conv.weight.dtype)
        if self.kind == "conv1x1" and plain(self.conv, nn.Conv2d):
            # A 1x1 convolution is a Linear over the channels: computed channels-last, it writes the tokens
            # contiguous, where the convolution's (batch, channels, rows * columns) output would be transposed by the
            # concatenation below, an uncoalesced copy of one of the step's largest tensors (and so its backward).
            grid = pixel_values.shape[-2:]
            pixels = pixel_values.flatten(2).transpose(1, 2).contiguous()  # (batch, rows * columns, channels)
            tokens = F.linear(pixels, self.conv.weight.flatten(1), self.conv.bias)
        else:
            if self.kind == "conv1x1":
                features = self.conv(pixel_values)
            elif self.kind == "conv":
                padded = F.pad(pixel_values, (*CONV_PAD, *CONV_PAD))
                features = self.max_pool(F.relu(self.batchnorm(self.conv(padded))))
            else:
                features = pixel_values
            grid = features.shape[-2:]
            tokens = features.flatten(2).transpose(1, 2)  # row-major over (rows, columns), channels last
        if self.position_embeddings is not None:
            positions = self.position_embeddings.weight.to(tokens.dtype)
        else:
            positions = self._positions(tuple(grid), tokens)
        return concat_positions(tokens, positions)

    def _forward_linear(self, pixel_values: Tensor) -> Tensor:
        # Processors emit float32; a model loaded in bf16/fp16 takes the pixels in its own dtype.
        tokens = self.patchify(pixel_values.to(self.proj.weight.dtype))
        if self.position_embeddings is None:
            tokens = concat_positions(tokens, self._positions(self.grid(pixel_values), tokens))
            return self.proj(tokens)
        return self.proj(tokens) + self.position_embeddings.weight.to(tokens.dtype)


class PerceiverFlowAdapter(nn.Module):
    r"""
    Frame pairs to tokens for optical flow, as transformers' `PerceiverForOpticalFlow` preprocesses them:
    `pixel_values (batch, num_frames, num_channels, height, width)` give one token per pixel, row-major. Each pixel's
    features are all frames' channels, frame-major (frame 0's channels, then frame 1's: transformers'
    `space_to_depth` with `temporal_block_size=num_frames`, `spatial_block_size=1`), projected to `image_embed_dim` by
    `proj`, with 2-D Fourier positions over (height, width) concatenated.

    transformers' flow model reads `num_channels=27`: each pixel's 3x3 neighbourhood of 3 colour channels, extracted
    outside the model. Fourier frequencies are chosen for `config.fourier_max_resolution` (transformers:
    `train_size`) when set, else for the input's own grid.

    Args:
        config ([`PerceiverConfig`]): reads `num_frames`, `num_channels`, `image_embed_dim`, `num_fourier_bands`
            (> 0) and `fourier_max_resolution`.
    """

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        if not config.num_fourier_bands:
            raise ValueError("`PerceiverFlowAdapter` concatenates Fourier positions: `num_fourier_bands` must be > 0.")
        self.num_frames = config.num_frames
        self.num_channels = config.num_channels
        self.num_bands = config.num_fourier_bands
        self.max_resolution = _max_resolution(config, None)
        self.proj = nn.Linear(config.num_frames * config.num_channels, config.image_embed_dim)
        self.width = config.image_embed_dim + fourier_feature_dim(2, config.num_fourier_bands)

    def grid(self, pixel_values: Tensor) -> tuple[int, int]:
        """The `(height, width)` token grid (one token per pixel): a flow decoder queries the same grid."""
        return tuple(pixel_values.shape[-2:])

    def check(self, pixel_values: Tensor) -> None:
        expected = f"(batch, {self.num_frames}, {self.num_channels}, height, width)"
        _check_floating_tensor("pixel_values", pixel_values, expected, dims=5)
        frames, channels = pixel_values.shape[1:3]
        if frames != self.num_frames:
            raise ValueError(
                f"`pixel_values` has {frames} frames but the model expects config.num_frames={self.num_frames}: shape "
                f"{expected}, got {tuple(pixel_values.shape)}."
            )
        if channels != self.num_channels:
            raise ValueError(
                f"`pixel_values` has {channels} channels but the model expects config.num_channels="
                f"{self.num_channels}: shape {expected}, got {tuple(pixel_values.shape)}."
            )

    def forward(self, pixel_values: Tensor) -> Tensor:
        """`pixel_values (batch, num_frames, num_channels, H, W)` -> tokens `(batch, H * W, width)`."""
        self.check(pixel_values)
        batch, frames, channels, height, width = pixel_values.shape
        # Processors emit float32; a model loaded in bf16/fp16 takes the pixels in its own dtype.
        x = pixel_values.to(self.proj.weight.dtype)
        x = x.permute(0, 3, 4, 1, 2).reshape(batch, height * width, frames * channels)
        tokens = self.proj(x)
        positions = fourier_position_features(
            (height, width), self.num_bands, self.max_resolution, tokens.device, tokens.dtype
        )
        return concat_positions(tokens, positions)


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
    "PerceiverFlowAdapter",
    "PerceiverImageAdapter",
    "PerceiverTextAdapter",
    "fourier_features",
    "fourier_position_features",
    "fourier_feature_dim",
    "image_adapter_width",
]

"""Positional encodings of `flash-perceiver` 0.2.0 (`flash_perceiver.utils.encodings`), in plain torch.

Output layouts and buffer names match the seed, so an adapter trained with the seed's encodings keeps its meaning (and
its `state_dict`) here. Two seed bugs are fixed: `NeRFPositionalEncoding.in_dim` was always 1, and
`GaussianFourierFeatureTransform.from_proj_matrix` failed on a misspelt attribute.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn


def _check_last_dim(x: Tensor, expected: int, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}.")
    if x.shape[-1] != expected:
        raise ValueError(f"{name} expects inputs with {expected} channels in the last dim, got shape {tuple(x.shape)}.")


class BasePositionalEncoding(nn.Module, ABC):
    """Base class of positional encodings: maps `(..., in_dim)` coordinates to `(..., out_dim)` features.

    Attributes:
        in_dim (`int`): number of input coordinates.
        out_dim (`int`): number of output features.
    """

    in_dim: int
    out_dim: int

    @abstractmethod
    def forward(self, x: Tensor) -> Tensor:
        """Encode `x` of shape `(..., in_dim)` into `(..., out_dim)`."""


class FourierPositionalEncoding(BasePositionalEncoding):
    r"""`sin(2π · x @ P)` for a projection matrix `P` of shape `(in_dim, out_dim)`.

    Args:
        proj_matrix (`torch.Tensor` of shape `(in_dim, out_dim)`):
            The projection. Stored as buffer `proj_matrix` (or parameter when trainable).
        is_trainable (`bool`, *optional*, defaults to `False`):
            Learn the projection.
    """

    def __init__(self, proj_matrix: Tensor, is_trainable: bool = False):
        super().__init__()
        if not isinstance(proj_matrix, Tensor) or proj_matrix.dim() != 2:
            got = tuple(proj_matrix.shape) if isinstance(proj_matrix, Tensor) else type(proj_matrix).__name__
            raise ValueError(f"`proj_matrix` must be a 2-D tensor (in_dim, out_dim), got {got}.")
        self.is_trainable = is_trainable
        if is_trainable:
            self.proj_matrix = nn.Parameter(proj_matrix)
        else:
            self.register_buffer("proj_matrix", proj_matrix)
        self.in_dim, self.out_dim = proj_matrix.shape

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim(x, self.in_dim, type(self).__name__)
        return torch.sin(2 * math.pi * (x @ self.proj_matrix.to(x.dtype)))


class IdentityPositionalEncoding(BasePositionalEncoding):
    """Returns the coordinates unchanged (`out_dim == in_dim`).

    Args:
        in_dim (`int`): number of coordinates.
    """

    def __init__(self, in_dim: int):
        super().__init__()
        self.in_dim = self.out_dim = in_dim

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim(x, self.in_dim, type(self).__name__)
        return x


class GaussianFourierFeatureTransform(FourierPositionalEncoding):
    """Random Fourier features (Tancik et al., 2020): a [`FourierPositionalEncoding`] with `P ~ N(0, sigma²)`.

    As in the seed, the output is `sin(2π x P)` only, so `out_dim == mapping_size` (the seed's docstring said twice
    that; its code, which trained models embody, did not).

    Args:
        in_dim (`int`): number of coordinates.
        mapping_size (`int`, *optional*, defaults to 32): number of features.
        sigma (`float`, *optional*, defaults to 1.0): standard deviation of the projection.
        is_trainable (`bool`, *optional*, defaults to `False`): learn the projection.
        seed (`int`, *optional*): seed of the projection's random generator.
    """

    def __init__(
        self,
        in_dim: int,
        mapping_size: int = 32,
        sigma: float = 1.0,
        is_trainable: bool = False,
        seed: int | None = None,
    ):
        super().__init__(self.get_proj_matrix(in_dim, mapping_size, sigma, seed=seed), is_trainable=is_trainable)
        self.mapping_size = mapping_size
        self.sigma = sigma
        self.seed = seed

    @classmethod
    def get_proj_matrix(cls, in_dim: int, mapping_size: int, sigma: float, seed: int | None = None) -> Tensor:
        """A `(in_dim, mapping_size)` matrix of N(0, sigma²) entries (reproducible when `seed` is given)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        return torch.randn(in_dim, mapping_size, generator=generator) * sigma

    @classmethod
    def from_proj_matrix(cls, projection_matrix: Tensor) -> GaussianFourierFeatureTransform:
        """Build the transform around a given `(in_dim, mapping_size)` projection."""
        in_dim, mapping_size = projection_matrix.shape
        transform = cls(in_dim, mapping_size)
        with torch.no_grad():
            transform.proj_matrix.copy_(projection_matrix)
        return transform


class NeRFPositionalEncoding(FourierPositionalEncoding):
    r"""NeRF encoding (Mildenhall et al., 2020): for every coordinate `x_i` and band `k`, `sin(π 2^k x_i)` and
    `cos(π 2^k x_i)`.

    Feature layout, as in the seed: per coordinate, all sines then all cosines (`[sin_0..sin_{K-1}, cos_0..cos_{K-1}]`),
    coordinates one after the other; `out_dim = in_dim * 2 * num_frequency_bands`.

    Args:
        in_dim (`int`): number of coordinates.
        num_frequency_bands (`int`, *optional*, defaults to 10): number of bands `K` (frequencies `2^0 .. 2^{K-1}`).
    """

    def __init__(self, in_dim: int, num_frequency_bands: int = 10):
        # Buffer `proj_matrix` of shape (1, K) holds the frequencies, as in the seed's state dict.
        super().__init__((2.0 ** torch.arange(num_frequency_bands, dtype=torch.float32))[None, :])
        self.num_frequency_bands = num_frequency_bands
        self.in_dim = in_dim
        self.out_dim = num_frequency_bands * 2 * in_dim

    def forward(self, x: Tensor) -> Tensor:
        _check_last_dim(x, self.in_dim, type(self).__name__)
        angles = math.pi * x[..., None] * self.proj_matrix[0].to(x.dtype)  # (..., in_dim, K)
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)


ENCODERS: dict[str, type[BasePositionalEncoding]] = {
    "identity": IdentityPositionalEncoding,
    "gaussian_fourier_features": GaussianFourierFeatureTransform,
    "nerf": NeRFPositionalEncoding,
}


def get_encoder(name: str, in_dim: int, **kwargs) -> BasePositionalEncoding:
    """Build a positional encoding by name: `"identity"`, `"gaussian_fourier_features"` or `"nerf"`.

    Args:
        name (`str`): the encoding.
        in_dim (`int`): number of coordinates.
        kwargs: passed to the encoding's constructor.
    """
    if name not in ENCODERS:
        raise ValueError(f"Unknown encoder {name!r}; expected one of {sorted(ENCODERS)}.")
    return ENCODERS[name](in_dim, **kwargs)


__all__ = [
    "BasePositionalEncoding",
    "FourierPositionalEncoding",
    "IdentityPositionalEncoding",
    "GaussianFourierFeatureTransform",
    "NeRFPositionalEncoding",
    "get_encoder",
]

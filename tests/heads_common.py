"""Helpers shared by the head, Trainer and Hub tests."""

from __future__ import annotations

import torch

from hf_flash_perceiver import PerceiverConfig


def tiny(**overrides) -> PerceiverConfig:
    """A config small enough for CPU tests, with every head's fields set to small values."""
    base = dict(
        depth=2, num_latents=4, latent_dim=16, cross_heads=2, cross_head_dim=8, latent_heads=2, latent_head_dim=8,
        query_heads=2, query_head_dim=8, image_size=8, patch_size=2, num_fourier_bands=3, max_position_embeddings=16,
    )
    base.update(overrides)
    return PerceiverConfig(**base)


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value (LayerNorm ones/zeros included), so that a mix-up between two of
    them cannot hide; returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()

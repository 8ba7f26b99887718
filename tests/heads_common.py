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


# "Identical after loading" means: every weight and buffer bit-equal, and outputs equal up to fp32 rounding. Loaded
# weights are bit-equal to the saved ones, but they sit inside the loaded file's buffer at addresses that need not be
# 64-byte aligned, where fresh parameters are; some CPUs' vectorised kernels then split their sums differently, so
# outputs may differ in the last bits (seen: up to 1.6e-6 on O(1) outputs). The tolerance is the one the suite uses
# for "only the summation order differs" (FP32_TOL in test_core.py), a few hundred fp32 ulps at the outputs' scale,
# and far below any real change of a weight (the heads are perturbed by 0.1).
RELOAD_RTOL = 1e-5
RELOAD_ATOL = 1e-5


def weights_and_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, non-persistent buffers (rebuilt on load, not saved) included."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def assert_same_weights(loaded: torch.nn.Module, model: torch.nn.Module) -> None:
    """The same parameter and buffer names, each tensor bit-equal (same dtype, shape and values)."""
    got, expected = weights_and_buffers(loaded), weights_and_buffers(model)
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def assert_close_outputs(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=RELOAD_RTOL, atol=RELOAD_ATOL)


def assert_same_weights_and_close_outputs(loaded: torch.nn.Module, model: torch.nn.Module, outputs) -> None:
    """`loaded` (a reloaded `model`) has bit-equal weights and buffers, and `outputs(m)` (a tensor) agrees for both
    within fp32 rounding (see RELOAD_RTOL)."""
    assert_same_weights(loaded, model)
    with torch.no_grad():
        assert_close_outputs(outputs(loaded), outputs(model))

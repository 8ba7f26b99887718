"""flash-perceiver 0.2.0 helpers: `utils` (masks, counts, grids), `utils.encodings` and `adapters.ImageAdapter`."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hf_flash_perceiver import fourier_position_features, utils
from hf_flash_perceiver.adapters import ImageAdapter
from hf_flash_perceiver.encodings import BasePositionalEncoding


def test_random_mask_is_a_nonempty_prefix():
    torch.manual_seed(0)
    x = torch.randn(500, 7, 3)
    mask = utils.random_mask(x)
    assert mask.dtype == torch.bool and mask.shape == (500, 7)
    lengths = mask.sum(1)
    assert torch.equal(mask, torch.arange(7)[None] < lengths[:, None])  # True prefix, then False
    assert set(lengths.tolist()) == set(range(1, 8))  # every length from 1 to seq_len occurs, never 0
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len, \.\.\.\)"):
        utils.random_mask(torch.zeros(3))


def test_numel_counts_trainable_and_shared_once():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[1].weight.requires_grad_(False)
    assert utils.numel(model) == 3 * 4 + 4 + 2
    assert utils.numel(model, only_trainable=False) == 3 * 4 + 4 + 4 * 2 + 2
    shared = nn.Sequential(model[0], model[0])
    assert utils.numel(shared) == 16


def test_meshgrid():
    grid = utils.meshgrid(3, 5)
    assert grid.shape == (3, 5, 2)
    assert torch.equal(grid[0, 0], torch.tensor([-1.0, -1.0])) and torch.equal(grid[-1, -1], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(grid[1, 3], torch.tensor([0.0, 0.5]))  # "ij": first coordinate follows the row
    batched = utils.meshgrid(2, 2, 2, batch_size=4)
    assert batched.shape == (4, 2, 2, 2, 3) and torch.equal(batched[3], utils.meshgrid(2, 2, 2))
    with pytest.raises(ValueError, match="one positive int per axis"):
        utils.meshgrid(0, 2)


def test_one_point_axis_legacy_grid_and_core_grid():
    # Both grids are the seed's (and transformers') `torch.linspace(-1, 1, n)`: a one-point axis sits at -1.
    legacy = utils.meshgrid(1, 3)
    assert torch.equal(legacy[..., 0], torch.full((1, 3), -1.0))
    core_positions = fourier_position_features((1, 3), num_bands=2)[:, :2]  # the positions come first
    assert torch.equal(core_positions[:, 0], torch.full((3,), -1.0))
    assert torch.equal(core_positions[:, 1], legacy[0, :, 1])
    assert torch.equal(legacy[0, :, 1], torch.tensor([-1.0, 0.0, 1.0]))


def test_fourier_and_gaussian_encodings():
    enc = utils.encodings
    proj = torch.randn(2, 6)
    fourier = enc.FourierPositionalEncoding(proj)
    x = torch.rand(4, 5, 2)
    torch.testing.assert_close(fourier(x), torch.sin(2 * math.pi * torch.einsum("...i,ij->...j", x, proj)))
    assert (fourier.in_dim, fourier.out_dim) == (2, 6) and "proj_matrix" in dict(fourier.named_buffers())
    assert "proj_matrix" in dict(enc.FourierPositionalEncoding(proj, is_trainable=True).named_parameters())
    gauss = enc.GaussianFourierFeatureTransform(3, mapping_size=8, sigma=2.0, seed=7)
    again = enc.GaussianFourierFeatureTransform(3, mapping_size=8, sigma=2.0, seed=7)
    assert torch.equal(gauss.proj_matrix, again.proj_matrix) and gauss.out_dim == 8
    big = enc.GaussianFourierFeatureTransform(2, mapping_size=20000, sigma=2.0, seed=1)
    assert abs(big.proj_matrix.std().item() - 2.0) < 0.05  # N(0, sigma^2), 40000 draws: std error ~0.007
    rebuilt = enc.GaussianFourierFeatureTransform.from_proj_matrix(gauss.proj_matrix)
    x3 = torch.rand(5, 3)
    torch.testing.assert_close(rebuilt(x3), gauss(x3))
    with pytest.raises(ValueError, match=r"2-D tensor"):
        enc.FourierPositionalEncoding(torch.zeros(3))
    with pytest.raises(ValueError, match="expects inputs with 2 channels"):
        fourier(torch.rand(4, 3))


def test_nerf_encoding_layout():
    nerf = utils.encodings.NeRFPositionalEncoding(2, num_frequency_bands=3)
    assert (nerf.in_dim, nerf.out_dim) == (2, 12) and nerf.proj_matrix.shape == (1, 3)
    x = torch.tensor([[0.25, -0.5]])
    out = nerf(x)
    # Per coordinate: sin(pi 2^k x) for k = 0..2, then cos(pi 2^k x); coordinates one after the other.
    expected = []
    for value in (0.25, -0.5):
        angles = [math.pi * 2**k * value for k in range(3)]
        expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    torch.testing.assert_close(out, torch.tensor([expected]), atol=1e-6, rtol=0)


def test_identity_and_get_encoder():
    enc = utils.encodings
    x = torch.rand(3, 2)
    assert enc.get_encoder("identity", 2)(x) is x
    assert isinstance(enc.get_encoder("nerf", 2, num_frequency_bands=4), enc.NeRFPositionalEncoding)
    gauss = enc.get_encoder("gaussian_fourier_features", 2, mapping_size=5)
    assert isinstance(gauss, BasePositionalEncoding) and gauss.out_dim == 5
    with pytest.raises(ValueError, match=r"Unknown encoder 'rope'; expected one of"):
        enc.get_encoder("rope", 2)


def _adapter_input(adapter, x):
    """The features entering the adapter's projection (captured with a hook)."""
    seen = {}
    handle = adapter.proj[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    adapter(x)
    handle.remove()
    return seen["x"]


def test_image_adapter_patches_and_positions():
    torch.manual_seed(0)
    nerf = utils.encodings.NeRFPositionalEncoding(2, num_frequency_bands=2)
    adapter = ImageAdapter(embed_dim=16, num_channels=3, pos_encoding=nerf, patch_size=(2, 4))
    assert adapter.patch_dim == 2 * 4 * 3 + 8
    # The seed's parameter names, so its adapter state dicts load unchanged.
    assert set(adapter.state_dict()) == {"proj.0.weight", "proj.0.bias", "proj.1.weight", "proj.1.bias",
                                         "proj.2.weight", "proj.2.bias", "pos_encoding.proj_matrix"}
    images = torch.randn(2, 3, 6, 8)
    out = adapter(images)
    assert out.shape == (2, 3 * 2, 16)
    feats = _adapter_input(adapter, images)
    assert feats.shape == (2, 3, 2, 32)
    # Patch (row 1, col 0) of image 1: features ordered (row in patch, column in patch, channel).
    b, i, j = 1, 1, 0
    patch = images[b, :, 2 * i: 2 * i + 2, 4 * j: 4 * j + 4].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(feats[b, i, j, :24], patch)
    torch.testing.assert_close(feats[b, i, j, 24:], nerf(utils.meshgrid(3, 2)[i, j]))
    # Token order is row-major over the patch grid.
    torch.testing.assert_close(out[b, i * 2 + j], adapter.proj(feats[b, i, j]))


def test_image_adapter_channel_last_and_int_patch():
    torch.manual_seed(0)
    first = ImageAdapter(embed_dim=8, num_channels=2, patch_size=2)
    last = ImageAdapter(embed_dim=8, num_channels=2, patch_size=2, channel_first=False)
    last.load_state_dict(first.state_dict())
    images = torch.randn(3, 2, 4, 6)
    torch.testing.assert_close(first(images), last(images.permute(0, 2, 3, 1)))
    pixels = ImageAdapter(embed_dim=8, num_channels=2)
    assert pixels(images).shape == (3, 24, 8)


def test_image_adapter_grid_spans_each_size():
    """Unlike the seed (which cropped a grid cached for a larger image), every size gets a [-1, 1] grid."""
    adapter = ImageAdapter(embed_dim=4, num_channels=1, pos_encoding=utils.encodings.IdentityPositionalEncoding(2))
    _adapter_input(adapter, torch.randn(1, 1, 8, 8))
    small = _adapter_input(adapter, torch.randn(1, 1, 2, 2))
    torch.testing.assert_close(small[0, :, :, 1:], utils.meshgrid(2, 2))


@pytest.mark.parametrize(
    "kwargs, images, match",
    [
        ({}, torch.randn(2, 3, 4), r"expects images of shape \(B, C, H, W\), got \(2, 3, 4\)"),
        ({}, torch.randn(2, 4, 4, 4), "expects 3 channels, got 4"),
        ({"patch_size": 3}, torch.randn(2, 3, 4, 6), r"4x6 is not divisible by the patch size 3x3"),
    ],
)
def test_image_adapter_bad_input(kwargs, images, match):
    with pytest.raises(ValueError, match=match):
        ImageAdapter(embed_dim=4, **kwargs)(images)


def test_image_adapter_bad_config():
    with pytest.raises(ValueError, match="needs in_dim=2"):
        ImageAdapter(embed_dim=4, pos_encoding=utils.encodings.IdentityPositionalEncoding(3))
    with pytest.raises(ValueError, match="positive int or a pair"):
        ImageAdapter(embed_dim=4, patch_size=(2, 0))


def test_seed_import_paths():
    """The seed's module paths, with the package name changed."""
    import hf_flash_perceiver
    from hf_flash_perceiver.adapters import ImageAdapter as FromAdapters
    from hf_flash_perceiver.utils.encodings import NeRFPositionalEncoding

    assert NeRFPositionalEncoding is utils.encodings.NeRFPositionalEncoding is hf_flash_perceiver.encodings.NeRFPositionalEncoding
    assert FromAdapters is hf_flash_perceiver.adapters.ImageAdapter
    assert {"random_mask", "numel", "meshgrid", "encodings"} <= set(dir(hf_flash_perceiver.utils))


# Former flat-layout module paths -> the modules of the legacy subpackage.
FORMER_PATHS = {
    "hf_flash_perceiver.utils": "hf_flash_perceiver.legacy.utils",
    "hf_flash_perceiver.utils.encodings": "hf_flash_perceiver.legacy.encodings",
    "hf_flash_perceiver.encodings": "hf_flash_perceiver.legacy.encodings",
    "hf_flash_perceiver.adapters": "hf_flash_perceiver.legacy.adapters",
    "hf_flash_perceiver.seed_api": "hf_flash_perceiver.legacy.seed_api",
    "hf_flash_perceiver.convert_flash_perceiver": "hf_flash_perceiver.legacy.convert_flash_perceiver",
    "hf_flash_perceiver.legacy.utils.encodings": "hf_flash_perceiver.legacy.encodings",
}


@pytest.mark.parametrize("former", list(FORMER_PATHS))
def test_former_module_paths_are_the_legacy_modules(former):
    assert importlib.import_module(former) is importlib.import_module(FORMER_PATHS[former])


def test_former_names_are_the_legacy_objects():
    import hf_flash_perceiver
    from hf_flash_perceiver.adapters import ImageAdapter as FormerImageAdapter
    from hf_flash_perceiver.convert_flash_perceiver import convert_flash_perceiver_checkpoint as former_convert
    from hf_flash_perceiver.convert_flash_perceiver import main as former_main
    from hf_flash_perceiver.encodings import BasePositionalEncoding as FormerBase
    from hf_flash_perceiver.legacy import adapters, convert_flash_perceiver, encodings, seed_api
    from hf_flash_perceiver.legacy import utils as legacy_utils
    from hf_flash_perceiver.seed_api import Perceiver as FormerPerceiver
    from hf_flash_perceiver.utils.encodings import NeRFPositionalEncoding as FormerNeRF

    assert hf_flash_perceiver.utils is utils is legacy_utils
    assert (hf_flash_perceiver.adapters, hf_flash_perceiver.encodings) == (adapters, encodings)
    assert hf_flash_perceiver.Perceiver is FormerPerceiver is seed_api.Perceiver
    assert hf_flash_perceiver.PerceiverIO is seed_api.PerceiverIO
    assert FormerImageAdapter is adapters.ImageAdapter
    assert FormerBase is encodings.BasePositionalEncoding and FormerNeRF is encodings.NeRFPositionalEncoding
    assert former_main is convert_flash_perceiver.main
    assert former_convert is convert_flash_perceiver.convert_flash_perceiver_checkpoint
    assert hf_flash_perceiver.convert_flash_perceiver_checkpoint is former_convert


def test_former_paths_import_first_in_a_fresh_interpreter():
    # As a user's script or the console script does: the former path is the first import of the package.
    code = (
        "from hf_flash_perceiver.utils.encodings import NeRFPositionalEncoding\n"
        "from hf_flash_perceiver.convert_flash_perceiver import main\n"
        "import hf_flash_perceiver.legacy.encodings as e, hf_flash_perceiver.legacy.convert_flash_perceiver as c\n"
        "assert NeRFPositionalEncoding is e.NeRFPositionalEncoding and main is c.main\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr

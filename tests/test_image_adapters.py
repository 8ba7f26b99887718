"""The image adapters against transformers' own Perceiver preprocessing.

transformers' `PerceiverImagePreprocessor` is built as each of its pretrained models builds it (image classification
with learned positions / Fourier positions / conv processing, optical flow), its weights are copied into this
package's adapter under the names a checkpoint converter maps them to, and both must give the same tokens. Inputs
and weights are fresh random draws every run; the seed is printed with any failure so that it can be replayed.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import PerceiverConfig as HFPerceiverConfig
from transformers.models.perceiver import modeling_perceiver as hf

from hf_flash_perceiver import PerceiverConfig
from hf_flash_perceiver.input_adapters import (
    PerceiverFlowAdapter,
    PerceiverImageAdapter,
    fourier_position_features,
    image_adapter_width,
)


# fp32 on both sides, the same operations in the same order, so only summation order inside conv/linear kernels can
# differ: a few ulps on values of order 1-10.
FP32 = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def seed() -> int:
    value = random.randrange(2**31)
    torch.manual_seed(value)
    return value


def close(actual, expected, seed, **tolerance):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{m}\n(replay with torch.manual_seed({seed}))",
                               **tolerance)


def ours(**kw) -> PerceiverConfig:
    base = dict(depth=1, num_latents=4, latent_dim=16, cross_head_dim=8, latent_heads=2, latent_head_dim=8)
    return PerceiverConfig(**{**base, **kw})


def hf_config(**kw) -> HFPerceiverConfig:
    base = dict(num_latents=4, d_latents=16, d_model=16, num_blocks=1, num_self_attends_per_block=1,
                num_self_attention_heads=2, num_cross_attention_heads=1, num_labels=3)
    return HFPerceiverConfig(**{**base, **kw})


def fourier_kwargs(bands, max_resolution):
    return dict(fourier_position_encoding_kwargs=dict(num_bands=bands, max_resolution=tuple(max_resolution),
                                                      sine_only=False, concat_pos=True))


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values for every parameter and BatchNorm statistic (post_init leaves BN at 0/1)."""
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            tensor.copy_(torch.rand_like(tensor) + 0.5 if name.endswith("running_var") else torch.randn_like(tensor))
    return module


def adapter_from(preprocessor: hf.PerceiverImagePreprocessor, config: PerceiverConfig) -> torch.nn.Module:
    """This package's adapter with `preprocessor`'s weights, renamed as the checkpoint converter renames them
    (`strict=True`: the names must be exactly these)."""
    theirs = preprocessor.state_dict()
    if config.image_adapter == "conv1x1" and config.num_fourier_bands == 0:
        # transformers projects its learned table on every forward; the converter folds that into the table.
        projection = preprocessor.positions_projection
        table = preprocessor.position_embeddings.position_embeddings.detach()
        state = {"conv.weight": theirs["convnet_1x1.weight"], "conv.bias": theirs["convnet_1x1.bias"],
                 "position_embeddings.weight": table @ projection.weight.detach().T + projection.bias.detach()}
        adapter = PerceiverImageAdapter(config, image_adapter_width(config))
    elif config.image_adapter == "conv1x1":
        state = {"conv.weight": theirs["convnet_1x1.weight"], "conv.bias": theirs["convnet_1x1.bias"]}
        adapter = PerceiverImageAdapter(config, image_adapter_width(config))
    elif config.image_adapter == "conv":
        state = {k.replace("convnet.", "", 1): v for k, v in theirs.items()}
        adapter = PerceiverImageAdapter(config, image_adapter_width(config))
    elif config.image_adapter == "pixels" and preprocessor.prep_type == "pixels":
        state = {}
        adapter = PerceiverImageAdapter(config, image_adapter_width(config))
    else:  # optical flow
        state = {"proj.weight": theirs["conv_after_patches.weight"], "proj.bias": theirs["conv_after_patches.bias"]}
        adapter = PerceiverFlowAdapter(config)
    adapter.load_state_dict(state, strict=True)
    return adapter


# ------------------------------------------------------------------------------------------------- Fourier features


@pytest.mark.parametrize("shape,bands,max_resolution", [
    ((16, 16), 64, (224, 224)),  # PerceiverForImageClassificationFourier's bands and resolution
    ((7, 9), 5, (7, 9)),
    ((5, 12), 3, (56, 56)),
    ((3, 4, 5), 2, (6, 8, 10)),
])
def test_fourier_features_match_transformers(shape, bands, max_resolution):
    encoding = hf.PerceiverFourierPositionEncoding(bands, max_resolution, concat_pos=True, sine_only=False)
    theirs = encoding(list(shape), batch_size=2, device=torch.device("cpu"), dtype=torch.float32)
    got = fourier_position_features(shape, bands, max_resolution)
    assert theirs.shape == (2, *got.shape)
    # Same float32 operations in the same order (angles pi * (x * f)); sin/cos of angles up to ~350 radians.
    torch.testing.assert_close(got, theirs[0], atol=1e-5, rtol=1e-5)


def test_fourier_edge_grids_match_transformers():
    # A one-point axis (linspace(-1, 1, 1) = -1 in both) and max_resolution < 2 (frequencies from 1 down to res/2 in
    # both): same float32 operations as transformers.
    encoding = hf.PerceiverFourierPositionEncoding(3, (2, 8), concat_pos=True, sine_only=False)
    theirs = encoding([1, 8], batch_size=1, device=torch.device("cpu"), dtype=torch.float32)[0]
    got = fourier_position_features((1, 8), 3, (2, 8))
    assert torch.all(got[:, 0] == -1)
    torch.testing.assert_close(got, theirs, atol=1e-6, rtol=1e-6)  # fp32, |values| <= 1
    theirs = hf.PerceiverFourierPositionEncoding(3, (1, 8))([4, 8], 1, torch.device("cpu"), torch.float32)[0]
    torch.testing.assert_close(fourier_position_features((4, 8), 3, (1, 8)), theirs, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- image variants


def image_case(name, size, bands, max_resolution, embed=8, position=6):
    """(transformers preprocessor, this package's config) for one setup."""
    if name == "conv1x1-learned":  # PerceiverForImageClassificationLearned (there: 256 / 256, image_size 224)
        pre = hf.PerceiverImagePreprocessor(
            hf_config(image_size=size), prep_type="conv1x1", spatial_downsample=1, out_channels=embed,
            position_encoding_type="trainable", concat_or_add_pos="concat", project_pos_dim=position,
            # transformers' positions_projection reads `out_channels` features, so the table must be that wide.
            trainable_position_encoding_kwargs=dict(num_channels=embed, index_dims=size**2))
        cfg = ours(image_adapter="conv1x1", num_fourier_bands=0, image_size=size, image_embed_dim=embed,
                   image_position_dim=position)
    elif name == "conv1x1-fourier":
        pre = hf.PerceiverImagePreprocessor(hf_config(), prep_type="conv1x1", spatial_downsample=1,
                                            out_channels=embed, position_encoding_type="fourier",
                                            **fourier_kwargs(bands, max_resolution))
        cfg = ours(image_adapter="conv1x1", num_fourier_bands=bands, image_size=size, image_embed_dim=embed)
    elif name == "pixels":  # PerceiverForImageClassificationFourier (there: 64 bands at (224, 224))
        pre = hf.PerceiverImagePreprocessor(hf_config(), prep_type="pixels", spatial_downsample=1,
                                            **fourier_kwargs(bands, max_resolution))
        cfg = ours(image_adapter="pixels", num_fourier_bands=bands, image_size=size)
    else:  # "conv": PerceiverForImageClassificationConvProcessing (there: 64 channels, 64 bands at (56, 56))
        pre = hf.PerceiverImagePreprocessor(hf_config(), prep_type="conv", spatial_downsample=1, out_channels=embed,
                                            position_encoding_type="fourier", **fourier_kwargs(bands, max_resolution))
        cfg = ours(image_adapter="conv", num_fourier_bands=bands, image_size=size, image_embed_dim=embed)
    return randomize(pre), cfg


# (setup, image_size, input height x width, bands, transformers' max_resolution, ours: fourier_max_resolution)
# `None` for ours means "the token grid at image_size", which the transformers side spells out.
IMAGE_CASES = [
    ("conv1x1-learned", 16, (16, 16), 0, None, None),
    ("conv1x1-fourier", 16, (16, 16), 4, (16, 16), None),
    ("conv1x1-fourier", 16, (12, 10), 4, (20, 24), [20, 24]),
    ("pixels", 16, (16, 16), 5, (16, 16), None),
    ("pixels", 16, (12, 20), 5, (224, 224), [224, 224]),
    ("conv", 32, (32, 32), 4, (7, 7), None),  # 32 -> conv 16 -> pool 7
    ("conv", 32, (23, 30), 4, (8, 8), [8, 8]),  # odd, non-square: grid 5 x 7
]


@pytest.mark.parametrize("name,size,hw,bands,theirs_res,ours_res", IMAGE_CASES)
def test_image_adapter_matches_transformers(seed, name, size, hw, bands, theirs_res, ours_res):
    pre, cfg = image_case(name, size, bands, theirs_res)
    if ours_res is not None:
        cfg.fourier_max_resolution = ours_res
    adapter = adapter_from(pre, cfg).eval()
    pre.eval()
    x = torch.randn(3, 3, *hw)
    with torch.no_grad():
        expected, modality_sizes, _ = pre(x)
        got = adapter(x)
    assert modality_sizes is None
    assert got.shape == expected.shape == (3, got.shape[1], adapter.width)
    assert got.shape[1] == adapter.grid(x)[0] * adapter.grid(x)[1]
    assert adapter.width == image_adapter_width(cfg) == pre.num_channels  # transformers' own width property
    close(got, expected, seed, **FP32)


@pytest.mark.parametrize("hw", [(32, 32), (23, 30)])
def test_conv_adapter_matches_transformers_in_training(seed, hw):
    # Train mode: BatchNorm normalises with the batch's statistics and updates its running ones; both must agree.
    pre, cfg = image_case("conv", 32, 4, (8, 8))
    cfg.fourier_max_resolution = [8, 8]
    adapter = adapter_from(pre, cfg).train()
    pre.train()
    x = torch.randn(4, 3, *hw)
    expected, _, _ = pre(x)
    got = adapter(x)
    close(got, expected, seed, **FP32)
    theirs_bn, ours_bn = pre.convnet.batchnorm, adapter.batchnorm
    close(ours_bn.running_mean, theirs_bn.running_mean, seed, **FP32)
    close(ours_bn.running_var, theirs_bn.running_var, seed, **FP32)
    assert int(ours_bn.num_batches_tracked) == int(theirs_bn.num_batches_tracked) == 1
    # Gradients through the padding, BatchNorm and max-pool (same ops, fp32: same tolerance).
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    close(adapter.conv.weight.grad, pre.convnet.conv.weight.grad, seed, atol=1e-4, rtol=1e-4)  # sums over 4x3x15x15


def test_conv_grid_matches_transformers_and_224_gives_55():
    downsample = hf.Conv2DDownsample(in_channels=1, out_channels=1).eval()
    cfg = ours(image_adapter="conv", num_channels=1, image_size=224, image_embed_dim=1, num_fourier_bands=1)
    adapter = PerceiverImageAdapter(cfg, image_adapter_width(cfg))
    for size in [*range(5, 41), 223, 224, 225]:
        with torch.no_grad():
            theirs = downsample(torch.randn(1, 1, size, size + 1)).shape[-2:]
        assert adapter.grid(torch.empty(1, 1, size, size + 1)) == tuple(theirs), size
    # The pretrained conv model's frequencies are for 56 x 56 (fourier_max_resolution=[56, 56] reproduces that);
    # left unset, this package chooses them for the grid it actually makes at image_size.
    assert adapter.grid_size == 55 and adapter.max_resolution == (55, 55)


# ---------------------------------------------------------------------------------------- transformers' own models


def test_the_four_pretrained_setups(seed):
    """The preprocessors exactly as transformers' four pretrained classes build them (64 bands, 256/64 channels,
    their hard-coded max resolutions), mapped onto configs as a converter would write them."""
    tc = hf_config(image_size=8, train_size=[6, 7])
    cases = [
        (hf.PerceiverForImageClassificationLearned, (3, 8, 8),
         ours(image_adapter="conv1x1", num_fourier_bands=0, image_size=8, image_embed_dim=256,
              image_position_dim=256)),
        (hf.PerceiverForImageClassificationFourier, (3, 8, 8),
         ours(image_adapter="pixels", num_fourier_bands=64, image_size=8, fourier_max_resolution=[224, 224])),
        (hf.PerceiverForImageClassificationConvProcessing, (3, 24, 20),
         ours(image_adapter="conv", num_fourier_bands=64, image_size=8, image_embed_dim=64,
              fourier_max_resolution=[56, 56])),
        (hf.PerceiverForOpticalFlow, (2, 27, 6, 7),
         ours(num_channels=27, num_frames=2, image_embed_dim=64, num_fourier_bands=64, fourier_max_resolution=[6, 7])),
    ]
    for model_class, shape, cfg in cases:
        pre = randomize(model_class(tc).perceiver.input_preprocessor).eval()
        adapter = adapter_from(pre, cfg).eval()
        x = torch.randn(2, *shape)
        with torch.no_grad():
            expected = pre(x)[0]
            got = adapter(x)
        assert adapter.width == pre.num_channels == got.shape[-1], model_class.__name__
        close(got, expected, seed, **FP32)


# ------------------------------------------------------------------------------------------------- optical flow


@pytest.mark.parametrize("hw,theirs_res,ours_res", [((6, 7), (6, 7), None), ((5, 9), (10, 12), [10, 12])])
def test_flow_adapter_matches_transformers(seed, hw, theirs_res, ours_res):
    channels, embed, bands = 5, 8, 3
    pre = randomize(hf.PerceiverImagePreprocessor(
        hf_config(), prep_type="patches", spatial_downsample=1, conv_after_patching=True,
        conv_after_patching_in_channels=2 * channels, temporal_downsample=2, out_channels=embed,
        position_encoding_type="fourier", **fourier_kwargs(bands, theirs_res))).eval()
    cfg = ours(num_channels=channels, num_frames=2, image_embed_dim=embed, num_fourier_bands=bands,
               fourier_max_resolution=ours_res)
    adapter = adapter_from(pre, cfg)
    x = torch.randn(3, 2, channels, *hw)
    with torch.no_grad():
        expected = pre(x)[0]
        got = adapter(x)
    assert got.shape == (3, hw[0] * hw[1], adapter.width) and adapter.grid(x) == hw
    assert adapter.width == pre.num_channels == embed + 2 * (2 * bands + 1)
    close(got, expected, seed, **FP32)


def test_flow_feature_order_is_frame_major(seed):
    # The per-pixel features the projection reads: frame 0's channels, then frame 1's (space_to_depth's order).
    adapter = PerceiverFlowAdapter(ours(num_channels=3, num_frames=2, image_embed_dim=6, num_fourier_bands=1))
    with torch.no_grad():
        adapter.proj.weight.copy_(torch.eye(6))
        adapter.proj.bias.zero_()
    x = torch.randn(1, 2, 3, 4, 5)
    with torch.no_grad():
        tokens = adapter(x)
    # An identity projection of fp32 values: only a rounding-level difference is possible (values of order 1).
    close(tokens[0, 2 * 5 + 3, :6], torch.cat([x[0, 0, :, 2, 3], x[0, 1, :, 2, 3]]), seed, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- widths, dtypes


VARIANTS = {
    "linear-fourier": dict(image_adapter="linear", num_fourier_bands=3),
    "linear-learned": dict(image_adapter="linear", num_fourier_bands=0),
    "conv1x1-learned": dict(image_adapter="conv1x1", num_fourier_bands=0),
    "conv1x1-fourier": dict(image_adapter="conv1x1", num_fourier_bands=3),
    "pixels": dict(image_adapter="pixels", num_fourier_bands=3),
    "conv": dict(image_adapter="conv", num_fourier_bands=3),
}


def variant(name, **kw):
    cfg = ours(image_size=16, image_embed_dim=8, image_position_dim=5, **{**VARIANTS[name], **kw})
    width = 12 if name.startswith("linear") else image_adapter_width(cfg)
    return PerceiverImageAdapter(cfg, width), cfg


@pytest.mark.parametrize("name", VARIANTS)
def test_width_function_gives_the_produced_width(name):
    adapter, cfg = variant(name)
    tokens = adapter(torch.randn(2, 3, 16, 16))
    expected = {"linear-fourier": 12, "linear-learned": 12, "conv1x1-learned": 8 + 5, "conv1x1-fourier": 8 + 14,
                "pixels": 3 + 14, "conv": 8 + 14}[name]
    assert tokens.shape[-1] == adapter.width == image_adapter_width(cfg, 12) == expected
    if not name.startswith("linear"):
        assert image_adapter_width(cfg) == expected


def test_linear_width_defaults_to_input_dim_then_latent_dim():
    assert image_adapter_width(ours()) == 16
    assert image_adapter_width(ours(input_dim=24)) == 24


@pytest.mark.parametrize("name", ["conv1x1-learned", "conv1x1-fourier", "pixels", "conv"])
def test_wrong_width_names_both(name):
    cfg = variant(name)[1]
    with pytest.raises(ValueError, match=rf"width {image_adapter_width(cfg)} .*width 99"):
        PerceiverImageAdapter(cfg, 99)


def test_linear_unchanged():
    # Parameter names and the computation of today's adapter (Fourier: positions concatenated before the projection,
    # frequencies for the patch grid at image_size).
    adapter, _ = variant("linear-fourier", patch_size=2)
    assert set(adapter.state_dict()) == {"proj.weight", "proj.bias"}
    assert set(variant("linear-learned")[0].state_dict()) == {"proj.weight", "proj.bias", "position_embeddings.weight"}
    x = torch.randn(2, 3, 12, 16)
    positions = fourier_position_features((6, 8), 3, (8, 8))
    expected = adapter.proj(torch.cat([adapter.patchify(x), positions.expand(2, -1, -1)], dim=-1))
    torch.testing.assert_close(adapter(x), expected, **FP32)  # fp32, the same ops: rounding at most


@pytest.mark.parametrize("name", ["conv1x1-learned", "conv1x1-fourier"])
def test_conv1x1_computed_channels_last_is_the_convolution(name):
    # The 1x1 convolution runs as a Linear over channels-last pixels (contiguous tokens): values and the weight and
    # bias gradients are the module's own (fp32: rounding order only). The gradients are sums over 512 pixels of
    # terms of either sign, so an entry can lose most of its digits to cancellation: they are compared as whole
    # tensors, to 1e-5 of their norm (worst 1.0e-6 in 200 random draws: fp32 sums of 512 terms). A hooked `conv` (an
    # adapter's wrapper, say) is called as the module, so its hook runs.
    from core_common import OpCounter, rel_err

    adapter, _ = variant(name)
    x = torch.randn(2, 3, 16, 16)
    with OpCounter() as counter:
        got = adapter(x)
    assert counter.ops["convolution"] == 0, counter.ops  # the Linear, not the module
    features = adapter.conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got[..., :features.shape[-1]], features, **FP32)
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    grads = [p.grad.clone() for p in (adapter.conv.weight, adapter.conv.bias)]
    adapter.zero_grad()
    (features * weights[..., :features.shape[-1]]).sum().backward()
    for g, p in zip(grads, (adapter.conv.weight, adapter.conv.bias)):
        assert rel_err(g, p.grad) <= 1e-5, rel_err(g, p.grad)
    calls = []
    adapter.conv.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    torch.testing.assert_close(adapter(x), got, **FP32)
    assert calls == [(2, adapter.conv.out_channels, 16, 16)]


def test_dtypes():
    conv, _ = variant("conv")
    assert conv.to(torch.bfloat16)(torch.randn(2, 3, 16, 16)).dtype == torch.bfloat16  # pixels cast to the weights
    pixels, _ = variant("pixels")
    for dtype in (torch.float64, torch.bfloat16):  # no weights: the input's floating dtype is kept
        assert pixels(torch.randn(2, 3, 16, 16, dtype=dtype)).dtype == dtype
    learned, _ = variant("conv1x1-learned")
    assert learned.double()(torch.randn(2, 3, 16, 16)).dtype == torch.float64
    flow = PerceiverFlowAdapter(ours(num_channels=3, image_embed_dim=4, num_fourier_bands=2)).to(torch.bfloat16)
    assert flow(torch.randn(2, 2, 3, 4, 4)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------- bad inputs


BAD_IMAGES = [
    ("not a tensor", lambda: [[0.0]], TypeError, r"must be a tensor of shape \(batch, 3, height, width\)"),
    ("3-D", lambda: torch.randn(3, 16, 16), ValueError,
     r"must have shape \(batch, 3, height, width\), got \(3, 16, 16\)"),
    ("integer", lambda: torch.ones(2, 3, 16, 16, dtype=torch.uint8), TypeError, r"floating point.*torch.uint8"),
    ("meta", lambda: torch.randn(2, 3, 16, 16, device="meta"), ValueError, r"meta device"),
    ("no images", lambda: torch.randn(0, 3, 16, 16), ValueError, r"at least one image of at least one pixel"),
    ("no pixels", lambda: torch.randn(2, 3, 0, 16), ValueError, r"at least one image of at least one pixel"),
    ("channels", lambda: torch.randn(2, 4, 16, 16), ValueError, r"4 channels.*config.num_channels=3"),
]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("case,make,error,match", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_images_refused(name, case, make, error, match):
    adapter, _ = variant(name)
    with pytest.raises(error, match=match):
        adapter(make())


def test_conv_needs_five_pixels_and_learned_needs_image_size():
    conv, _ = variant("conv")
    with pytest.raises(ValueError, match=r"at least 5x5 pixels.*got 4x9"):
        conv(torch.randn(1, 3, 4, 9))
    assert conv(torch.randn(1, 3, 5, 5)).shape == (1, 1, conv.width)  # the smallest: one token
    learned, _ = variant("conv1x1-learned")
    with pytest.raises(ValueError, match=r"need 16x16 images.*got 12x16"):
        learned(torch.randn(1, 3, 12, 16))
    fourier, _ = variant("conv1x1-fourier")
    assert fourier(torch.randn(1, 3, 12, 16)).shape == (1, 12 * 16, fourier.width)  # Fourier reads any size


def test_concat_positions_refuses_rows_that_differ():
    # The adapters' concatenation of tokens with batch-shared positions (fused_concat.py) names both shapes.
    from hf_flash_perceiver.fused_concat import concat_positions

    with pytest.raises(ValueError, match=r"position features have 5 rows but the tokens 6.*\(2, 6, 3\).*\(5, 4\)"):
        concat_positions(torch.randn(2, 6, 3), torch.randn(5, 4))
    assert torch.equal(concat_positions(torch.ones(2, 5, 3), torch.zeros(5, 4)),
                       torch.cat([torch.ones(2, 5, 3), torch.zeros(2, 5, 4)], -1))


def test_bad_configs_refused():
    with pytest.raises(ValueError, match=r"fourier_max_resolution` needs 2 entries"):
        variant("pixels", fourier_max_resolution=[8, 8, 8])
    with pytest.raises(ValueError, match=r"num_fourier_bands` must be > 0"):
        PerceiverFlowAdapter(ours(num_fourier_bands=0))


BAD_FLOW = [
    ("not a tensor", lambda: 1.0, TypeError, r"must be a tensor of shape \(batch, 2, 3, height, width\)"),
    ("4-D", lambda: torch.randn(2, 6, 8, 8), ValueError, r"must have shape \(batch, 2, 3, height, width\)"),
    ("frames", lambda: torch.randn(2, 3, 3, 8, 8), ValueError, r"3 frames.*config.num_frames=2"),
    ("channels", lambda: torch.randn(2, 2, 4, 8, 8), ValueError, r"4 channels.*config.num_channels=3"),
    ("integer", lambda: torch.ones(2, 2, 3, 8, 8, dtype=torch.long), TypeError, r"floating point.*torch.int64"),
    ("meta", lambda: torch.randn(2, 2, 3, 8, 8, device="meta"), ValueError, r"meta device"),
    ("no pixels", lambda: torch.randn(2, 2, 3, 8, 0), ValueError, r"at least one image of at least one pixel"),
]


@pytest.mark.parametrize("case,make,error,match", BAD_FLOW, ids=[c[0] for c in BAD_FLOW])
def test_bad_flow_inputs_refused(case, make, error, match):
    adapter = PerceiverFlowAdapter(ours(num_channels=3, image_embed_dim=4, num_fourier_bands=2))
    with pytest.raises(error, match=match):
        adapter(make())

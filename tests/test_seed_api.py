"""The flash-perceiver 0.2.0 API (`Perceiver`, `PerceiverIO`): semantics, mapping to the HF classes, round trips."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification

from hf_flash_perceiver import (
    Perceiver,
    PerceiverForSequenceClassification,
    PerceiverIO,
    PerceiverIOModel,
    PerceiverModel,
)
from hf_flash_perceiver.legacy.seed_api import REQUIRED, SEED_ARGS, seed_args, seed_config


TOL = 1e-5  # fp32 CPU: SDPA vs eager, or the wrapper vs the same math written out


def small_perceiver(**kw):
    base = dict(input_dim=12, depth=2, num_latents=6, latent_dim=32, cross_heads=2, cross_head_dim=8, latent_heads=4,
                latent_head_dim=8)
    torch.manual_seed(0)
    return Perceiver(**{**base, **kw}).eval()


def small_io(**kw):
    base = dict(input_dim=12, query_dim=16, depth=2, num_latents=6, latent_dim=32, cross_heads=2, cross_head_dim=8,
                latent_heads=4, latent_head_dim=8, query_heads=2, query_head_dim=8)
    torch.manual_seed(0)
    return PerceiverIO(**{**base, **kw}).eval()


def data(batch=3, seq=9, width=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, width, generator=g)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    return x, torch.arange(seq)[None] < lengths[:, None]


def test_signatures_match_the_seed():
    params = inspect.signature(Perceiver).parameters
    assert list(params)[:5] == ["input_dim", "depth", "output_dim", "output_mode", "num_latents"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert params["output_mode"].default == "average" and params["use_flash_attn"].default is True
    forward = inspect.signature(Perceiver.forward).parameters
    assert list(forward) == ["self", "data", "mask", "latents", "return_embeddings", "return_attn_weights"]
    io_forward = inspect.signature(PerceiverIO.forward).parameters
    assert list(io_forward) == ["self", "data", "mask", "latents", "queries", "query_mask", "return_attn_weights"]
    io = inspect.signature(PerceiverIO).parameters
    for name in ("query_dim", "proj_dim", "query_heads", "query_head_dim", "query_rotary_emb_dim", "query_attn_dropout"):
        assert name in io


@pytest.mark.parametrize("cls", [Perceiver, PerceiverIO])
def test_signatures_are_the_argument_table(cls):
    # The constructors keep explicit signatures (the public API); the table they must equal drives `seed_config` and
    # the converter, so an argument added or re-defaulted in one place only fails here.
    params = list(inspect.signature(cls).parameters.values())
    table = seed_args(cls.__name__)
    assert [p.name for p in params] == [a.name for a in table] + ["seed_wiring"]
    for param, arg in zip(params, table):
        # Compare types too: `False == 0` and `0 == 0.0` would hide a changed default.
        assert (type(param.default), param.default) == (type(arg.default), arg.default), param.name
    assert params[-1].default is False
    both = set(inspect.signature(Perceiver).parameters) | set(inspect.signature(PerceiverIO).parameters)
    assert {a.name for a in SEED_ARGS} == both - {"seed_wiring"}


def test_seed_config_from_the_table():
    config = seed_config("Perceiver", {"input_dim": 7, "depth": 3, "output_dim": 2, "output_mode": "mean"})
    defaults = {a.name: a.default for a in seed_args("Perceiver") if a.to_config and a.default is not REQUIRED}
    assert {name: getattr(config, name) for name in defaults} == defaults
    assert (config.input_dim, config.depth, config.num_labels, config.pooling) == (7, 3, 2, "average")
    assert config._attn_implementation == "sdpa"
    io_args = {"input_dim": 7, "query_dim": 5, "depth": 3, "proj_dim": 4, "use_flash_attn": False}
    io = seed_config("PerceiverIO", io_args)
    assert (io.depth, io.self_per_cross_attn, io.query_dim, io.output_dim) == (1, 3, 5, 4)
    assert io._attn_implementation == "eager"
    with pytest.raises(TypeError, match=r"Unknown argument\(s\) \['output_dim'\] for flash-perceiver's PerceiverIO"):
        seed_config("PerceiverIO", {"input_dim": 7, "query_dim": 5, "depth": 3, "output_dim": 4})
    with pytest.raises(TypeError, match=r"needs the argument\(s\) \['depth'\]"):
        seed_config("Perceiver", {"input_dim": 7})
    with pytest.raises(ValueError, match=r"`model` must be one of \['Perceiver', 'PerceiverIO'\], got 'Perceiver IO'"):
        seed_config("Perceiver IO", {})


@pytest.mark.parametrize("mode", ["average", "mean", "concat", "first"])
def test_output_head_is_pool_layernorm_linear(mode):
    model = small_perceiver(output_dim=5, output_mode=mode)
    hf = model.to_hf()
    assert type(hf) is PerceiverForSequenceClassification
    assert hf.config.num_labels == 5 and hf.config.pooling == ("average" if mode == "mean" else mode)
    x, mask = data()
    with torch.no_grad():
        latents = model(x, mask, return_embeddings=True)
        assert latents.shape == (3, 6, 32)
        pooled = {"average": latents.mean(1), "mean": latents.mean(1), "concat": latents.flatten(1),
                  "first": latents[:, 0]}[mode]
        head = hf.head
        expected = F.linear(F.layer_norm(pooled, pooled.shape[-1:], head.norm.weight, head.norm.bias, 1e-5),
                            head.classifier.weight, head.classifier.bias)
        out = model(x, mask)
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)


def test_without_output_dim_returns_latents_of_perceiver_model():
    model = small_perceiver()
    assert type(model.to_hf()) is PerceiverModel and model.output_dim is None
    x, mask = data()
    with torch.no_grad():
        expected = model.to_hf()(x, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model(x, mask), expected, atol=0, rtol=0)


def test_unknown_output_mode():
    with pytest.raises(ValueError, match=r"Unknown output_mode 'max'; expected one of"):
        small_perceiver(output_dim=3, output_mode="max")
    with pytest.raises(ValueError, match="pooling='concat'"):
        small_perceiver(output_dim=3, output_mode="concat", latent_drop=0.5)


def test_new_models_use_package_defaults_and_seed_wiring_is_opt_in():
    config = small_perceiver().config
    assert (config.mlp_residual, config.cross_input_norm, config.mlp_gate_activation) == (True, True, "gelu")
    seed = small_perceiver(seed_wiring=True, latent_dim=80, latent_heads=5, latent_head_dim=16).config
    assert (seed.mlp_residual, seed.cross_input_norm, seed.mlp_gate_activation) == (False, False, "sigmoid")
    assert (seed.latent_qkv_bias, seed.mlp_hidden_size) == (True, 384)  # 4 * 80 rounded up to a multiple of 128


def test_properties():
    model = small_perceiver(self_per_cross_attn=3, depth=4)
    assert model.num_attention_layers_per_block == 4
    assert model.num_attention_layers == 16
    assert model.num_self_attention_layers == 12
    assert model.num_cross_attention_layers == 4
    assert (model.num_latents, model.latent_dim, model.input_dims) == (6, 32, [12] * 4)
    assert model.latents is model.to_hf().latents and model.latents.shape == (6, 32)
    io = small_io(depth=3)
    # The seed's Perceiver IO: one cross-attention block holding `depth` self-attentions.
    assert (io.depth, io.self_per_cross_attn, io.num_attention_layers) == (1, 3, 4)
    assert io.to_hf().config.depth == 1 and io.to_hf().config.self_per_cross_attn == 3


def test_set_flash_attn_switches_backend_and_keeps_outputs():
    model = small_perceiver(output_dim=4, use_flash_attn=False)
    assert model.config._attn_implementation == "eager" and model.use_flash_attn is False
    x, mask = data()
    with torch.no_grad():
        eager = model(x, mask)
        model.set_flash_attn(True)
        assert model.config._attn_implementation == "sdpa" and model.use_flash_attn is True
        torch.testing.assert_close(model(x, mask), eager, atol=TOL, rtol=0)
    with pytest.raises(TypeError, match="must be a bool"):
        model.set_flash_attn("yes")


@pytest.mark.parametrize("use_flash_attn", [True, False])
def test_attention_weights_with_every_backend(use_flash_attn):
    model = small_perceiver(output_dim=4, use_flash_attn=use_flash_attn, self_per_cross_attn=2)
    x, mask = data()
    with torch.no_grad():
        out, maps = model(x, mask, return_attn_weights=True)
        torch.testing.assert_close(out, model(x, mask), atol=TOL, rtol=0)
    assert isinstance(maps, list) and len(maps) == model.num_attention_layers == 6
    for i, m in enumerate(maps):
        if i % model.num_attention_layers_per_block == 0:
            assert m.shape == (3, 2, 6, 9)  # (batch, cross_heads, num_latents, seq_len)
            assert (m.masked_select(~mask[:, None, None, :]) == 0).all()
        else:
            assert m.shape == (3, 4, 6, 6)
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), atol=TOL, rtol=0)
    with pytest.raises(TypeError, match="`return_attn_weights` must be a bool"):
        model(x, return_attn_weights="yes")


def test_multiple_inputs_and_masks():
    model = small_perceiver(input_dim=[12, 20], depth=2)
    a, mask_a = data(width=12)
    b, _ = data(seq=5, width=20, seed=1)
    with torch.no_grad():
        out = model([a, b], mask=[mask_a, None])
        torch.testing.assert_close(out, model.to_hf()([a, b], attention_mask=[mask_a, None]).last_hidden_state)
        truncated = model([a[:1, : int(mask_a[0].sum())], b[:1]])
    torch.testing.assert_close(out[:1], truncated, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="Expected 2 inputs"):
        model([a])


def test_custom_latents():
    model = small_perceiver()
    x, _ = data()
    with torch.no_grad():
        assert model(x, latents=torch.randn(11, 32)).shape == (3, 11, 32)
        assert model(x, latents=torch.randn(3, 2, 32)).shape == (3, 2, 32)
    no_latents = small_perceiver(num_latents=None)
    assert no_latents.latents is None
    with pytest.raises(ValueError, match="pass `latents`"):
        no_latents(x)
    with pytest.raises(ValueError, match=r"`latents` must have shape"):
        model(x, latents=torch.randn(4, 31))


def test_cross_rotary_works_and_breaks_permutation_invariance():
    """The seed could not build rotary cross-attention (flash-attn refused it); here it runs and encodes order."""
    x, _ = data()
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain, rotary = small_perceiver(), small_perceiver(cross_rotary_emb_dim=8)
        for model in (plain, rotary):  # sharpen attention (the 0.02-std init makes it nearly uniform)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        reference = plain(x)
        # fp32 summation order over permuted keys: relative to the output scale
        torch.testing.assert_close(plain(x[:, perm]), reference, atol=TOL * reference.abs().max().item(), rtol=0)
        out = rotary(x)
        assert (rotary(x[:, perm]) - out).abs().max() > 1e-2 * out.abs().max()


def test_perceiver_io_queries_and_query_mask():
    model = small_io(proj_dim=5)
    hf = model.to_hf()
    assert type(hf) is PerceiverIOModel and hf.config.output_dim == 5 and model.proj_dim == 5 and model.query_dim == 16
    x, mask = data()
    queries = torch.randn(3, 7, 16)
    query_mask = torch.arange(7)[None] < torch.tensor([7, 3, 1])[:, None]
    with torch.no_grad():
        full = model(x, mask, queries=queries)
        assert full.shape == (3, 7, 5)
        masked = model(x, mask, queries=queries, query_mask=query_mask)
        assert (masked[~query_mask] == 0).all()
        torch.testing.assert_close(masked[query_mask], full[query_mask], atol=TOL, rtol=0)
        # Queries do not attend to each other: shared 2-D queries give every sample the same decoding rule.
        torch.testing.assert_close(model(x, mask, queries=queries[0]), model(x, mask, queries=queries[:1].expand(3, -1, -1)))
        latents = model(x, mask)
        torch.testing.assert_close(latents, hf.perceiver(x, attention_mask=mask).last_hidden_state)
        out, maps = model(x, mask, queries=queries, return_attn_weights=True)
    torch.testing.assert_close(out, full, atol=TOL, rtol=0)
    assert len(maps) == model.num_attention_layers == 3
    with pytest.raises(ValueError, match="`query_mask` was given without `queries`"):
        model(x, query_mask=query_mask)
    with pytest.raises(ValueError, match="query_mask"):
        model(x, queries=queries, query_mask=query_mask[:, :3])


def assert_same_weights(loaded: torch.nn.Module, saved: torch.nn.Module) -> None:
    """Parameters and buffers survive saving exactly."""
    loaded_sd, saved_sd = loaded.state_dict(), saved.state_dict()
    assert loaded_sd.keys() == saved_sd.keys()
    for name, tensor in saved_sd.items():
        assert torch.equal(loaded_sd[name], tensor), name


# Outputs after a save/load round trip: the weights are bit-identical (checked with `torch.equal`), but a loaded tensor
# may sit at a different memory alignment, and CPU kernels may then round fp32 sums differently; so outputs agree to
# fp32 rounding, not bit for bit.
ROUND_TRIP = dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("output_dim", [None, 4])
def test_perceiver_round_trip_through_save_pretrained_and_auto(tmp_path, output_dim):
    model = small_perceiver(output_dim=output_dim)
    x, mask = data()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(x, mask)
        latents = model(x, mask, return_embeddings=True)
        loaded = Perceiver.from_pretrained(tmp_path)
        assert not loaded.training and loaded.output_dim == output_dim
        assert_same_weights(loaded, model)
        torch.testing.assert_close(loaded(x, mask), expected, **ROUND_TRIP)
        auto = AutoModel.from_pretrained(tmp_path)
        assert type(auto) is PerceiverModel
        assert_same_weights(auto, model.encoder_model)
        torch.testing.assert_close(auto(x, attention_mask=mask).last_hidden_state, latents, **ROUND_TRIP)
        if output_dim is not None:
            clf = AutoModelForSequenceClassification.from_pretrained(tmp_path)
            assert_same_weights(clf, model.to_hf())
            torch.testing.assert_close(clf(x, attention_mask=mask).logits, expected, **ROUND_TRIP)
            torch.testing.assert_close(Perceiver.from_hf(clf)(x, mask), expected, **ROUND_TRIP)


def test_perceiver_io_round_trip(tmp_path):
    model = small_io(proj_dim=3)
    model.save_pretrained(tmp_path)
    x, mask = data()
    queries = torch.randn(4, 16)
    with torch.no_grad():
        loaded = PerceiverIO.from_pretrained(tmp_path)
        assert_same_weights(loaded, model)
        torch.testing.assert_close(loaded(x, mask, queries=queries), model(x, mask, queries=queries), **ROUND_TRIP)
        # AutoModel gives the encoder, i.e. what the seed's PerceiverIO returns without queries.
        auto = AutoModel.from_pretrained(tmp_path)
        assert_same_weights(auto, model.encoder_model)
        torch.testing.assert_close(auto(x, attention_mask=mask).last_hidden_state, model(x, mask), **ROUND_TRIP)
    with pytest.raises(ValueError, match="expects a checkpoint of PerceiverModel, PerceiverForSequenceClassification"):
        Perceiver.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="PerceiverIO.from_hf expects a PerceiverIOModel, got PerceiverModel"):
        PerceiverIO.from_hf(auto)


def test_wrapper_shares_parameters_with_hf_model():
    model = small_perceiver(output_dim=3)
    hf = model.to_hf()
    x = data()[0]
    with torch.no_grad():
        before = model(x)
        hf.head.classifier.bias.add_(1.0)  # an edit through the HF model is seen by the wrapper
        torch.testing.assert_close(model(x), before + 1, atol=TOL, rtol=0)
    assert dict(model.named_parameters())["model.head.classifier.bias"] is hf.head.classifier.bias
    assert Perceiver.from_hf(hf).to_hf() is hf


def test_bad_input_from_the_hf_model_surfaces():
    model = small_perceiver()
    with pytest.raises(ValueError, match="feature dim 7 but the model expects input_dim=12"):
        model(torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match=r"Mask 0 must have shape"):
        model(torch.randn(2, 4, 12), mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="`input_dim` is a list of 2 widths but `depth` is 3"):
        Perceiver(input_dim=[3, 4], depth=3)


def test_one_feature_inputs_stay_raw():
    # The seed takes input_dim=1 (e.g. a scalar signal); LayerNorm over one feature would erase it.
    import torch

    from hf_flash_perceiver import Perceiver

    model = Perceiver(input_dim=1, depth=1, num_latents=4, latent_dim=16, latent_heads=2, latent_head_dim=8).eval()
    assert model.model.config.cross_input_norm is False
    x = torch.randn(2, 5, 1)
    assert not torch.allclose(model(x), model(x * 3))

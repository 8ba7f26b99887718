"""Core encoder: config, backends against the fp32 reference, masks, rotary, save/load, checkpointing, bad input."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel

import hf_flash_perceiver
from hf_flash_perceiver import PerceiverConfig, PerceiverModel
from hf_flash_perceiver.attention_backends import (
    FLASH_MIN_KEYS, KeyPaddingMask, attention, flash_beats_cudnn, fused_kernels_fit,
)
from hf_flash_perceiver.input_preparation import prepare_inputs

from core_common import CPU_BACKENDS, FP32_TOL, OpCounter, build, make_inputs, random_config, small_config
from heads_common import assert_close_outputs, assert_same_weights, assert_same_weights_and_close_outputs
from reference import reference_forward


def test_config_defaults_and_auto():
    cfg = AutoConfig.for_model("flash_perceiver")
    assert type(cfg) is PerceiverConfig
    assert (cfg.num_latents, cfg.latent_dim, cfg.cross_heads, cfg.latent_heads, cfg.gated_mlp) == (512, 512, 1, 8, True)
    assert cfg.input_dim is None


def test_config_round_trip(tmp_path):
    cfg = random_config(3)
    cfg.input_names = [f"in{i}" for i in range(cfg.depth)]
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "flash_perceiver"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is PerceiverConfig
    for key, value in cfg.to_dict().items():
        if key.startswith("_") or key in ("transformers_version",):
            continue
        assert getattr(loaded, key) == value, key


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_dim=[4, 5], depth=3), "one width per cross-attention block"),
        (dict(input_dim=[4, 5], depth=2, weight_tie_layers=True), "weight_tie_layers"),
        (dict(cross_rotary_emb_dim=128, cross_head_dim=64), "cross_rotary_emb_dim"),
        (dict(latent_rotary_emb_dim=7), "latent_rotary_emb_dim"),
        (dict(depth=0), "depth"),
        (dict(latent_dim=-4), "latent_dim"),
        (dict(num_latents=0), "num_latents"),
        (dict(input_names=["a"], depth=2), "input_names"),
        (dict(latent_drop=1.0), "latent_drop"),
        (dict(pooling="max"), "pooling"),
        (dict(input_dim=[3, 1], depth=2), "width of 1"),
    ],
)
def test_config_invalid(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PerceiverConfig(**kwargs)


def test_raw_feature_model_needs_input_dim():
    with pytest.raises(ValueError, match="input_dim"):
        PerceiverModel(PerceiverConfig(depth=1, num_latents=4, latent_dim=16))


def test_nothing_resolves_to_transformers_perceiver(tmp_path):
    cfg = small_config()
    assert type(AutoModel.from_config(cfg)) is PerceiverModel
    PerceiverModel(cfg).save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is PerceiverModel
    assert type(AutoConfig.from_pretrained(tmp_path)) is PerceiverConfig
    # transformers resolves some auto classes by config *class name*; every auto class that accepts our config must
    # give one of our classes, never transformers' Perceiver.
    for name in dir(transformers):
        if not name.startswith("AutoModel"):
            continue
        auto = getattr(transformers, name)
        if not hasattr(auto, "from_config"):
            continue
        try:
            model = auto.from_config(cfg)
        except (ValueError, KeyError, TypeError, AttributeError, ImportError):
            continue
        assert type(model).__module__.startswith("hf_flash_perceiver"), (name, type(model))


# ------------------------------------------------------------------ numerics


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("impl", CPU_BACKENDS)
def test_backends_match_reference(seed, impl):
    cfg = random_config(seed)
    model = build(cfg, impl, seed)
    inputs = make_inputs(cfg, seed=seed)
    out = model(inputs).last_hidden_state
    ref, _, _ = reference_forward(model, inputs)
    torch.testing.assert_close(out, ref, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("impl", CPU_BACKENDS)
def test_hidden_states_and_attentions(impl):
    cfg = small_config(cross_rotary_emb_dim=4, latent_rotary_emb_dim=8, self_per_cross_attn=2, num_zero_tokens=2)
    model = build(cfg, impl)
    x = make_inputs(cfg)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[0, 4:] = False
    out = model(x, mask, output_attentions=True, output_hidden_states=True)
    ref, ref_hidden, ref_maps = reference_forward(model, x, mask)
    assert len(out.hidden_states) == 1 + cfg.depth * (1 + cfg.self_per_cross_attn)
    assert len(out.attentions) == cfg.num_attention_layers
    for h, r in zip(out.hidden_states, ref_hidden):
        torch.testing.assert_close(h, r, atol=FP32_TOL, rtol=FP32_TOL)
    for i, (a, r) in enumerate(zip(out.attentions, ref_maps)):
        if i % (1 + cfg.self_per_cross_attn) == 0:
            assert a.shape == (3, cfg.cross_heads, cfg.num_latents, 9 + 2)
            assert torch.all(a[0, :, :, 2 + 4:] == 0)  # masked keys exactly zero
        else:
            assert a.shape == (3, cfg.latent_heads, cfg.num_latents, cfg.num_latents)
        torch.testing.assert_close(a, r, atol=FP32_TOL, rtol=FP32_TOL)
    # the model keeps its backend for later calls
    assert model.config._attn_implementation == impl


def test_output_attentions_via_config_keeps_backend(tmp_path):
    cfg = small_config()
    PerceiverModel(cfg).save_pretrained(tmp_path)
    model = PerceiverModel.from_pretrained(tmp_path, output_attentions=True)
    assert model.config._attn_implementation == "sdpa"
    out = model(make_inputs(cfg))
    assert len(out.attentions) == cfg.num_attention_layers


@pytest.mark.parametrize("impl", CPU_BACKENDS)
@pytest.mark.parametrize("rotary", [0, 4])
def test_mask_equals_truncation(impl, rotary):
    cfg = small_config(cross_rotary_emb_dim=rotary, num_zero_tokens=2)
    model = build(cfg, impl)
    x = make_inputs(cfg, batch=4, seq=10)
    lengths = [10, 7, 3, 1]
    mask = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]
    out = model(x, mask.long()).last_hidden_state  # 0/1 integers, as tokenizers produce
    for b, n in enumerate(lengths):
        alone = model(x[b : b + 1, :n]).last_hidden_state
        torch.testing.assert_close(out[b : b + 1], alone, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("impl", CPU_BACKENDS)
def test_random_mask_equals_compacted_input(impl):
    cfg = small_config()
    model = build(cfg, impl)
    g = torch.Generator().manual_seed(1)
    x = make_inputs(cfg, batch=5, seq=11)
    mask = torch.rand(5, 11, generator=g) < 0.6
    mask[:, 0] = True
    out = model(x, mask).last_hidden_state
    ref, _, _ = reference_forward(model, x, mask)
    torch.testing.assert_close(out, ref, atol=FP32_TOL, rtol=FP32_TOL)
    for b in range(5):
        alone = model(x[b : b + 1, mask[b]]).last_hidden_state
        torch.testing.assert_close(out[b : b + 1], alone, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize("impl", CPU_BACKENDS)
def test_fully_masked_sample_is_finite(impl):
    cfg = small_config()
    model = build(cfg, impl)
    x = make_inputs(cfg)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1] = False
    out = model(x, mask, output_attentions=(impl == "eager")).last_hidden_state
    assert torch.isfinite(out).all()
    ref, _, _ = reference_forward(model, x, mask)
    torch.testing.assert_close(out, ref, atol=FP32_TOL, rtol=FP32_TOL)
    # cross-attention contributed nothing: the sample equals one whose inputs are anything at all
    x2 = x.clone()
    x2[1] = 1e3
    torch.testing.assert_close(model(x2, mask).last_hidden_state[1], out[1])


def test_all_true_mask_is_dropped():
    cfg = small_config()
    model = build(cfg)
    x = make_inputs(cfg)
    contexts = prepare_inputs(cfg, cfg.input_dims, x, torch.ones(3, 9, dtype=torch.long), torch.float32)
    assert all(c.mask is None for c in contexts)
    torch.testing.assert_close(model(x, torch.ones(3, 9, dtype=torch.bool)).last_hidden_state,
                               model(x).last_hidden_state)


@pytest.mark.parametrize("impl", CPU_BACKENDS)
def test_permutation_invariance_without_cross_rotary(impl):
    cfg = small_config(latent_rotary_emb_dim=4, num_zero_tokens=1)
    model = build(cfg, impl)
    x = make_inputs(cfg, seq=10)
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) < 0.7
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(2))
    a = model(x, mask).last_hidden_state
    b = model(x[:, perm], mask[:, perm]).last_hidden_state
    torch.testing.assert_close(a, b, atol=FP32_TOL, rtol=FP32_TOL)


def test_padding_content_never_matters_but_nan_in_tokens_propagates():
    cfg = small_config()
    model = build(cfg)
    x = make_inputs(cfg)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[:, 6:] = False
    x_nan_pad = x.clone()
    x_nan_pad[:, 6:] = float("nan")
    torch.testing.assert_close(model(x_nan_pad, mask).last_hidden_state, model(x, mask).last_hidden_state)
    x_nan = x.clone()
    x_nan[0, 2, 0] = float("nan")
    out = model(x_nan, mask).last_hidden_state
    assert torch.isnan(out[0]).any()  # not silenced
    assert torch.isfinite(out[1:]).all()


def test_multiple_inputs_list_and_dict():
    cfg = small_config(input_dim=[5, 7], input_names=["audio", "video"])
    model = build(cfg)
    a, v = torch.randn(2, 4, 5), torch.randn(2, 6, 7)
    mv = torch.ones(2, 6, dtype=torch.bool)
    mv[1, 3:] = False
    out_list = model([a, v], [None, mv]).last_hidden_state
    out_dict = model({"video": v, "audio": a}, {"video": mv}).last_hidden_state
    torch.testing.assert_close(out_list, out_dict)
    ref, _, _ = reference_forward(model, [a, v], [None, mv])
    torch.testing.assert_close(out_list, ref, atol=FP32_TOL, rtol=FP32_TOL)


def test_custom_latents_and_no_learned_latents():
    cfg = small_config(num_latents=None)
    model = build(cfg)
    x = make_inputs(cfg)
    lat = torch.randn(11, cfg.latent_dim)
    out = model(x, latents=lat).last_hidden_state
    assert out.shape == (3, 11, cfg.latent_dim)
    ref, _, _ = reference_forward(model, x, latents=lat)
    torch.testing.assert_close(out, ref, atol=FP32_TOL, rtol=FP32_TOL)
    per_sample = lat.expand(3, -1, -1).clone()
    torch.testing.assert_close(model(x, latents=per_sample).last_hidden_state, out)
    with pytest.raises(ValueError, match="pass `latents`"):
        model(x)


def test_latent_drop_keeps_floor_fraction():
    cfg = small_config(num_latents=10, latent_drop=0.35)
    model = build(cfg).train()
    out = model(make_inputs(cfg), output_hidden_states=True)
    assert out.last_hidden_state.shape[1] == 6  # floor(0.65 * 10)
    # the kept latents are a subset of the learned ones, in order
    kept = out.hidden_states[0][0]
    idx = [int((model.latents - row).abs().sum(-1).argmin()) for row in kept]
    assert idx == sorted(idx) and len(set(idx)) == 6
    model.eval()
    assert model(make_inputs(cfg)).last_hidden_state.shape[1] == 10


def test_weight_tying_shares_blocks_and_saves(tmp_path):
    cfg = small_config(depth=4, weight_tie_layers=True)
    model = build(cfg)
    assert len(model.encoder.cross_layers) == 2 and len(model.encoder.self_layers) == 2
    untied = sum(p.numel() for p in PerceiverModel(small_config(depth=4)).parameters())
    assert sum(p.numel() for p in model.parameters()) < untied
    model.save_pretrained(tmp_path)
    x = make_inputs(cfg)
    # Bit-equal weights; outputs within fp32 rounding (loaded tensors may be laid out differently: heads_common).
    assert_same_weights_and_close_outputs(AutoModel.from_pretrained(tmp_path).eval(), model,
                                          lambda m: m(x).last_hidden_state)


# ------------------------------------------------------------------ attention entry point


def test_attention_entry_point_matches_across_backends():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 5, 3, 8, generator=g), torch.randn(2, 7, 3, 8, generator=g), torch.randn(2, 7, 3, 8, generator=g)
    mask = KeyPaddingMask.from_mask(torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0] * 7]).bool())
    ref, w = attention(q, k, v, mask, implementation="eager")
    out, none = attention(q, k, v, mask, implementation="sdpa")
    assert none is None
    torch.testing.assert_close(out, ref, atol=FP32_TOL, rtol=FP32_TOL)
    assert torch.all(out[1] == 0) and torch.all(w[1] == 0)
    _, w2 = attention(q, k, v, mask, implementation="sdpa", output_attentions=True)
    torch.testing.assert_close(w2, w)


@pytest.mark.parametrize("batch, heads, q_len, kv_len, flash", [
    (8, 1, 256, 131072, True),  # latents over a long input at a small batch
    (1, 1, 256, 65536, True),
    (2, 8, 256, 524288, True),  # 32 query tiles: the most that still goes to FlashAttention-2
    (2, 8, 257, 524288, False),  # one more query tile per head
    (8, 8, 256, 131072, False),  # enough tiles for cuDNN to fill the GPU
    (16, 1, 256, 32768, False),  # too few keys
    (128, 1, 256, 4096, False),  # the seed benchmark's cross-attention
])
def test_flash_beats_cudnn_rule(batch, heads, q_len, kv_len, flash):
    assert flash_beats_cudnn(batch, heads, q_len, kv_len) is flash


def test_sdpa_dispatch_rule_needs_a_fused_cuda_call():
    # On the CPU (and for fp32, masks, wide heads) SDPA keeps its own choice: the rule only reorders fused kernels.
    q = torch.randn(1, 256, 1, 8)
    k = v = torch.randn(1, FLASH_MIN_KEYS, 1, 8)
    assert flash_beats_cudnn(1, 1, 256, FLASH_MIN_KEYS) and not fused_kernels_fit(q, v)
    out, _ = attention(q, k, v, None, implementation="sdpa")
    ref, _ = attention(q, k, v, None, implementation="eager")
    torch.testing.assert_close(out, ref, atol=FP32_TOL, rtol=FP32_TOL)


# ------------------------------------------------------------------ HF integration


def test_save_load_identical_and_sharded(tmp_path):
    cfg = small_config(latent_rotary_emb_dim=8, cross_rotary_emb_dim=4, num_zero_tokens=2)
    model = build(cfg)
    x = make_inputs(cfg)
    expected = model(x).last_hidden_state
    model.save_pretrained(tmp_path / "one")
    assert (tmp_path / "one" / "model.safetensors").exists()
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    for sub in ("one", "sharded"):
        loaded = AutoModel.from_pretrained(tmp_path / sub).eval()
        assert type(loaded) is PerceiverModel
        # rotary tables are non-persistent buffers: rebuilt by _init_weights after the meta-device build, and
        # compared bit for bit with the parameters; outputs within fp32 rounding (see heads_common)
        assert_same_weights(loaded, model)
        assert_close_outputs(loaded(x).last_hidden_state, expected)


def test_load_bf16_and_device_map(tmp_path):
    cfg = small_config()
    build(cfg).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16, device_map="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    out = model(make_inputs(cfg).bfloat16()).last_hidden_state
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("impl", ["eager", "sdpa", "varlen"])
def test_attn_implementation_selection(tmp_path, impl):
    cfg = small_config()
    model = AutoModel.from_config(cfg, attn_implementation=impl)
    assert model.config._attn_implementation == impl
    model.save_pretrained(tmp_path)
    assert PerceiverModel.from_pretrained(tmp_path, attn_implementation=impl).config._attn_implementation == impl


def test_unknown_attn_implementation():
    with pytest.raises(ValueError, match="Unknown attn_implementation 'fast'.*eager"):
        PerceiverModel._from_config(small_config(), attn_implementation="fast")


def test_flash_attention_2_without_flash_attn(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("flash_attn") else real(name, *a))
    with pytest.raises(ImportError, match="pip install flash-attn --no-build-isolation"):
        PerceiverModel._from_config(small_config(), attn_implementation="flash_attention_2")
    model = PerceiverModel(small_config())
    with pytest.raises(ImportError, match="pip install flash-attn"):
        model.set_attn_implementation("flash_attention_2")


def test_flash_attention_4_without_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("flash_attn") else real(name, *a))
    with pytest.raises(ImportError, match="pip install flash-attn-4"):
        PerceiverModel._from_config(small_config(), attn_implementation="flash_attention_4")


@pytest.mark.parametrize("impl", ["varlen", "flash_attention_4"])
def test_backends_without_dropout_refuse_it(impl):
    q = torch.randn(2, 3, 1, 8)
    mask = KeyPaddingMask.from_mask(torch.tensor([[1, 1, 0], [1, 0, 0]]).bool())
    with pytest.raises(ValueError, match="no attention dropout"):
        attention(q, q, q, mask, implementation=impl, dropout=0.1)


def _grads(model, x, mask):
    model.zero_grad()
    out = model(x, mask).last_hidden_state
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_gradient_checkpointing_same_gradients(method):
    cfg = small_config(num_zero_tokens=1, latent_rotary_emb_dim=4)
    model = build(cfg).train()
    if not hasattr(model, method):
        pytest.skip(f"this transformers version has no {method}")
    x = make_inputs(cfg)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, 5:] = False
    expected = _grads(model, x, mask)
    getattr(model, method)()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    got = _grads(model, x, mask)
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def model():
    return build(small_config(input_dim=[5, 7], input_names=["a", "b"]))


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda m: m([torch.randn(2, 4, 6), torch.randn(2, 4, 7)]), ValueError, "feature dim 6.*input_dim=5"),
        (lambda m: m([torch.randn(2, 4, 5)]), ValueError, "Expected 2 inputs"),
        (lambda m: m({"a": torch.randn(2, 4, 5), "c": torch.randn(2, 4, 7)}), ValueError, r"keys must be exactly \['a', 'b'\]"),
        (lambda m: m([torch.randn(2, 4, 5), torch.randn(3, 4, 7)]), ValueError, "batch size"),
        (lambda m: m([torch.randn(2, 4, 5), torch.randn(2, 4, 7)], [torch.ones(2, 5, dtype=torch.bool), None]), ValueError, r"shape \(batch, seq_len\) = \(2, 4\)"),
        (lambda m: m([torch.randn(2, 4, 5), torch.randn(2, 4, 7)], [torch.full((2, 4), 2), None]), ValueError, "only 0/1"),
        (lambda m: m([torch.randn(2, 4, 5), torch.randn(2, 4, 7)], [torch.ones(2, 4), None]), TypeError, "bool or 0/1 integers"),
        (lambda m: m([torch.randn(2, 4, 5), torch.randn(2, 4, 7)], torch.ones(2, 4)), TypeError, "must be a list like"),
        (lambda m: m([torch.randn(2, 4, 5), torch.randn(2, 4, 7)], latents=torch.randn(3, 8)), ValueError, r"latents.*\(num_latents, 32\)"),
        (lambda m: m([torch.randn(2, 4, 5), torch.randn(2, 4, 7)], latents=torch.randn(3, 6, 32)), ValueError, "batch size 3"),
        (lambda m: m("text"), TypeError, "must be a tensor"),
        (lambda m: m([torch.randn(4, 5), torch.randn(2, 4, 7)]), ValueError, r"shape \(batch, seq_len, 5\)"),
        (lambda m: m([torch.ones(2, 4, 5, dtype=torch.long), torch.randn(2, 4, 7)]), TypeError, "floating-point"),
    ],
)
def test_bad_input(model, call, err, match):
    with pytest.raises(err, match=match):
        call(model)


def test_package_registers_auto_classes():
    assert hf_flash_perceiver.PerceiverModel is PerceiverModel
    assert AutoConfig.for_model("flash_perceiver").__class__.__module__.startswith("hf_flash_perceiver")


def test_dict_inputs_need_names_and_known_mask_keys(model):
    unnamed = build(small_config(input_dim=[5, 7]))
    with pytest.raises(ValueError, match="input_names"):
        unnamed({"a": torch.randn(2, 4, 5), "b": torch.randn(2, 4, 7)})
    inputs = {"a": torch.randn(2, 4, 5), "b": torch.randn(2, 4, 7)}
    with pytest.raises(ValueError, match=r"unknown keys \['c'\]"):
        model(inputs, {"c": torch.ones(2, 4, dtype=torch.bool)})
    with pytest.raises(TypeError, match="must be a dict like `inputs`"):
        model(inputs, [None, None])
    with pytest.raises(TypeError, match="must be a tensor when `inputs` is a tensor"):
        build(small_config())(torch.randn(2, 4, 12), [None, None])


def test_layer_norm_off_cuda_is_pytorch_then_autocast_cast():
    """Off CUDA the block LayerNorm is PyTorch's, cast to the autocast dtype under autocast (what the next Linear
    would cast it to); the GPU tests check the Triton kernels against this path."""
    from hf_flash_perceiver.fused_norm import fused_layer_norm_fits, layer_norm

    x, w, b = torch.randn(2, 5, 16), torch.randn(16), torch.randn(16)
    assert not fused_layer_norm_fits(x)
    ref = torch.nn.functional.layer_norm(x, (16,), w, b, 1e-6)
    y = layer_norm(x, w, b, 1e-6)
    assert y.dtype == torch.float32 and torch.equal(y, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm(x, w, b, 1e-6)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref.to(torch.bfloat16))


def test_column_sum_off_cuda_is_pytorch_sum():
    """Off CUDA `column_sum` (the fused branches' bias-gradient reduction) is PyTorch's sum over the rows in the asked
    dtype, strided rows included; the GPU tests check the Triton kernel against fp64. Exact here: the same op."""
    from hf_flash_perceiver.fused_norm import column_sum

    x = torch.randn(37, 24).to(torch.bfloat16)[:, 4:20]
    got = column_sum(x)
    assert got.dtype == torch.float32 and torch.equal(got, x.sum(0, dtype=torch.float32))
    assert torch.equal(column_sum(x, torch.bfloat16), x.sum(0, dtype=torch.bfloat16))


def test_block_norms_are_layer_norms():
    """The blocks' norms are `nn.LayerNorm`s (same parameters, checkpoint keys and initialisation); off CUDA, and on
    it below `BLOCK_NORM_MIN_ELEMENTS`, their forward is PyTorch's (the GPU tests check the Triton path against it)."""
    from hf_flash_perceiver.fused_norm import FusedLayerNorm

    model = build(small_config(), "sdpa")
    block = model.encoder.self_layers[0][0]
    assert isinstance(block.norm1, FusedLayerNorm) and isinstance(block.norm2, torch.nn.LayerNorm)
    assert {"norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"} <= set(block.state_dict())
    fresh = PerceiverModel(small_config()).encoder.self_layers[0][0].norm1
    assert torch.equal(fresh.weight, torch.ones(fresh.weight.shape)) and torch.equal(fresh.bias, torch.zeros(32))
    norm = FusedLayerNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 5, 16)
    ref = torch.nn.functional.layer_norm(x, (16,), norm.weight, norm.bias, 1e-6)
    assert torch.equal(norm(x), ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x).dtype == torch.float32  # autocast's own LayerNorm policy


def test_fused_branches_are_gpu_half_precision_only():
    """The fused residual branches (fused_block.py) never run off CUDA, in fp32, or on wrapped or hooked modules; the
    GPU tests compare them with the module path that runs here."""
    from hf_flash_perceiver.fused_block import fused_dtype, mlp_fits, self_attention_fits

    model = build(small_config(latent_dim=32, latent_head_dim=8), "sdpa")
    block = model.encoder.self_layers[0][0]
    assert fused_dtype(torch.randn(2, 3, 32)) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_dtype(torch.randn(2, 3, 32)) is None
    assert self_attention_fits(block.norm1, block.attn, False) and mlp_fits(block.norm2, block.mlp)
    assert not self_attention_fits(block.norm1, block.attn, True)  # attention maps: the module path computes them
    # Heads over 128 wide fit only on GPUs whose kernels take them (Hopper and later): never with weights off CUDA.
    wide = build(small_config(latent_dim=32, latent_heads=1, latent_head_dim=160), "sdpa").encoder.self_layers[0][0]
    assert not self_attention_fits(wide.norm1, wide.attn, False)
    # A hook on a norm or a projection must run: the branch, which computes with their weights, would skip it.
    handle = block.norm1.register_forward_hook(lambda *args: None)
    assert not self_attention_fits(block.norm1, block.attn, False)
    handle.remove()
    handle = block.mlp.fc2.register_forward_pre_hook(lambda *args: None)
    assert not mlp_fits(block.norm2, block.mlp)
    handle.remove()
    assert self_attention_fits(block.norm1, block.attn, False) and mlp_fits(block.norm2, block.mlp)

    class Wrapped(torch.nn.Linear):
        pass

    block.mlp.fc1 = Wrapped(32, block.mlp.fc1.out_features)
    assert not mlp_fits(block.norm2, block.mlp)


def test_fused_cross_attention_fits_only_what_it_computes(monkeypatch):
    """The cross-attention branch (fused_block.py) stands in for the module path only where it computes the same
    function from the same weights: plain unhooked projections and norms, an input norm with both gamma and beta (or
    none), no rotary, no chunked path, no attention maps; per input, no context-parallel shard, and a padding mask
    only on `sdpa` through cuDNN (`varlen` packs the keys) with heads up to 128 wide."""
    from hf_flash_perceiver import fused_block
    from hf_flash_perceiver.attention_backends import KeyPaddingMask
    from hf_flash_perceiver.cross_attention import CrossInput
    from hf_flash_perceiver.fused_block import cross_attention_fits, cross_input_fits

    def block_of(impl="sdpa", **kw):
        return build(small_config(latent_dim=32, **kw), impl).encoder.cross_layers[0]

    def fits(block, output_attentions=False):
        return cross_attention_fits(block.norm1, block.attn, block.context_norm, output_attentions)

    block = block_of()
    assert fits(block) and not fits(block, output_attentions=True)
    assert fits(block_of(cross_input_norm=False, cross_query_residual=False, cross_qkv_bias=True))
    assert not fits(block_of(cross_rotary_emb_dim=8))
    assert not fits(block_of(cross_attention_checkpointing=True))
    assert not fits(block_of(cross_v_head_dim=16))  # one head width for queries/keys and values
    handle = block.attn.kv_proj.register_forward_hook(lambda *args: None)
    assert not fits(block)
    handle.remove()
    block.context_norm = torch.nn.LayerNorm(12, bias=False)  # gamma without beta: nothing to fold it as
    assert not fits(block)

    tokens = torch.randn(2, 5, 12)
    mask = KeyPaddingMask.from_mask(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert cross_input_fits(block.attn, CrossInput(tokens))
    monkeypatch.setattr(fused_block, "CUDNN_AVAILABLE", True)  # masked calls need cuDNN, which a CPU build lacks
    assert cross_input_fits(block.attn, CrossInput(tokens, mask))
    assert not cross_input_fits(block_of("varlen").attn, CrossInput(tokens, mask))
    wide = block_of(cross_heads=1, cross_head_dim=160)
    assert cross_input_fits(wide.attn, CrossInput(tokens)) and not cross_input_fits(wide.attn, CrossInput(tokens, mask))
    monkeypatch.setattr(fused_block, "CUDNN_AVAILABLE", False)
    assert not cross_input_fits(block.attn, CrossInput(tokens, mask))
    assert not cross_input_fits(block.attn, CrossInput(tokens, shard=object()))


def test_fused_branches_context_sets_and_restores():
    """`fused_branches(setting)` holds `fused_block.enabled` at the setting inside the block and restores the value
    before it afterwards, also when the block raises; anything but True, False or "auto" is refused."""
    from hf_flash_perceiver import fused_block

    before = fused_block.enabled
    with fused_block.fused_branches("auto"):
        assert fused_block.enabled == "auto"
        with fused_block.fused_branches(True):
            assert fused_block.enabled is True
        assert fused_block.enabled == "auto"
    assert fused_block.enabled is before
    with pytest.raises(RuntimeError, match="boom"), fused_block.fused_branches(True):
        raise RuntimeError("boom")
    assert fused_block.enabled is before
    with pytest.raises(ValueError, match="True, False or 'auto', got 'on'"):
        with fused_block.fused_branches("on"):
            pass
    assert fused_block.enabled is before


def test_fused_branches_auto_needs_work_per_launch():
    """Under "auto" only branches with at least MIN_WORK = rows x width^2 fuse: below it an eager step is
    bound by launch overhead and the module path is faster. Checked on the meta device (no GPU needed)."""
    from hf_flash_perceiver import fused_block

    assert fused_block.enabled is False  # opt-in for now
    small, large = torch.empty(128 * 256, 256, device="meta"), torch.empty(64 * 512, 1024, device="meta")
    assert small.numel() * 256 < fused_block.MIN_WORK <= large.numel() * 1024


@pytest.mark.parametrize("activation", ["gelu", "silu", "sigmoid"])
def test_gated_mlp_backward_writes_both_halves_without_a_concatenation(activation):
    """The gated MLP's `value * act(gate)` is one autograd node whose backward fills the gradient of `[value | gate]`
    in place: the same values as autograd through chunk / activation / product (same ops on the same operands; fp32,
    compared to 1e-6 to allow another summation order), with no `cat` kernel in backward."""
    from hf_flash_perceiver.fused_activation import GATE_ACTIVATIONS
    from hf_flash_perceiver.layers import PerceiverMLP

    torch.manual_seed(4)
    mlp = PerceiverMLP(small_config(gated_mlp=True, mlp_gate_activation=activation), 16)
    x = torch.randn(3, 5, 16, requires_grad=True)
    dy = torch.randn(3, 5, 16)
    with OpCounter() as ops:
        out = mlp(x)
        grads = torch.autograd.grad(out, [x, mlp.fc1.weight, mlp.fc1.bias], dy)
    assert ops.ops["cat"] == 0

    value, gate = mlp.fc1(x).chunk(2, dim=-1)
    expected = mlp.fc2(value * GATE_ACTIVATIONS[activation](gate))
    expected_grads = torch.autograd.grad(expected, [x, mlp.fc1.weight, mlp.fc1.bias], dy)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)

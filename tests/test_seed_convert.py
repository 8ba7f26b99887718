"""flash-perceiver 0.2.0 checkpoint converter: parity with the seed's math, key/shape checks, bad input, CLI.

`seed_state_dict` builds a random checkpoint in the seed's format (anchored to the key/shape listing of a real seed
model below) and `seed_forward` is the seed's forward written from its code with plain tensor ops: it reads the seed
keys directly and shares nothing with the package. Each quirk of the seed it reproduces is marked "Quirk".
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForSequenceClassification

from hf_flash_perceiver import (
    Perceiver,
    PerceiverForSequenceClassification,
    PerceiverIO,
    PerceiverIOModel,
    PerceiverModel,
    convert_flash_perceiver_checkpoint,
)
from hf_flash_perceiver.legacy.convert_flash_perceiver import load_state_dict_file, main


PARITY_TOL = 1e-5  # fp32 CPU, converted model vs the fp32 reference of the seed's math: summation order only
SEED_DEFAULTS = dict(num_latents=512, latent_dim=512, cross_heads=1, cross_head_dim=64, latent_heads=8,
                     latent_head_dim=64, latent_rotary_emb_dim=0, weight_tie_layers=False, gated_mlp=True,
                     self_per_cross_attn=1, num_zero_tokens=None, output_dim=None, output_mode="average", proj_dim=None,
                     query_heads=1, query_head_dim=64)

# Keys and shapes of real flash-perceiver 0.2.0 models (captured once from the seed's code with flash-attn 2.3.6):
# Perceiver(input_dim=12, depth=3, output_dim=5, num_latents=4, latent_dim=32, cross_heads=1, cross_head_dim=16,
# latent_heads=2, latent_head_dim=16, weight_tie_layers=True, num_zero_tokens=2) and PerceiverIO(input_dim=12,
# query_dim=8, depth=2, proj_dim=3, same latents/heads, query_heads=1, query_head_dim=8). Block parts below are
# (name, shape) with L=32 latent width; layers 1 and 2 repeat layer 0's cross and self blocks.
_CROSS = [("mixer.Wq.weight", [16, 32]), ("mixer.Wkv.weight", [32, 12]), ("mixer.out_proj.weight", [32, 16]),
          ("mixer.out_proj.bias", [32]), ("norm1.weight", [32]), ("norm1.bias", [32]), ("mlp.fc1.weight", [512, 32]),
          ("mlp.fc1.bias", [512]), ("mlp.fc2.weight", [32, 256]), ("mlp.fc2.bias", [32]), ("norm2.weight", [32]),
          ("norm2.bias", [32])]
_SELF = [("mixer.Wqkv.weight", [96, 32]), ("mixer.Wqkv.bias", [96]), ("mixer.out_proj.weight", [32, 32]),
         ("mixer.out_proj.bias", [32]), ("norm1.weight", [32]), ("norm1.bias", [32]), ("mlp.fc1.weight", [512, 32]),
         ("mlp.fc1.bias", [512]), ("mlp.fc2.weight", [32, 256]), ("mlp.fc2.bias", [32]), ("norm2.weight", [32]),
         ("norm2.bias", [32])]
REAL_SEED_PERCEIVER = {
    "latents": [4, 32],
    **{f"layers.{i}.0.{k}": s for i in range(3) for k, s in _CROSS},
    **{f"layers.{i}.1.0.{k}": s for i in range(3) for k, s in _SELF},
    "zero_tokens.0": [2, 12], "zero_tokens.1": [2, 12], "zero_tokens.2": [2, 12],
    "out_proj.0.weight": [32], "out_proj.0.bias": [32], "out_proj.1.weight": [5, 32], "out_proj.1.bias": [5],
}
REAL_SEED_PERCEIVER_IO = {
    "latents": [4, 32],
    **{f"layers.0.0.{k}": s for k, s in _CROSS},
    **{f"layers.0.1.{j}.{k}": s for j in range(2) for k, s in _SELF},
    "query_block.mixer.Wq.weight": [8, 8], "query_block.mixer.Wkv.weight": [16, 32],
    "query_block.mixer.out_proj.weight": [8, 8], "query_block.mixer.out_proj.bias": [8],
    "query_block.norm1.weight": [8], "query_block.norm1.bias": [8], "query_block.mlp.fc1.weight": [512, 8],
    "query_block.mlp.fc1.bias": [512], "query_block.mlp.fc2.weight": [8, 256], "query_block.mlp.fc2.bias": [8],
    "query_block.norm2.weight": [8], "query_block.norm2.bias": [8],
    "out_proj.0.weight": [8], "out_proj.0.bias": [8], "out_proj.1.weight": [3, 8], "out_proj.1.bias": [3],
}


# ---------------------------------------------------------------------------------------------------- seed format
def _rand(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def _seed_block(g, prefix, dim, kv_dim, heads, head_dim, gated, hidden):
    """One flash-attn `Block` (MHA mixer + MLP) as the seed built it, with random weights."""
    inner = heads * head_dim
    sd = {f"{prefix}norm1.weight": 1 + _rand(g, dim, scale=0.1), f"{prefix}norm1.bias": _rand(g, dim, scale=0.1)}
    if kv_dim is None:  # self-attention: one fused projection, with bias (flash-attn's default qkv_proj_bias=True)
        sd[f"{prefix}mixer.Wqkv.weight"] = _rand(g, 3 * inner, dim, scale=dim**-0.5)
        sd[f"{prefix}mixer.Wqkv.bias"] = _rand(g, 3 * inner, scale=0.1)
    else:  # cross-attention: the seed passed qkv_proj_bias=False
        sd[f"{prefix}mixer.Wq.weight"] = _rand(g, inner, dim, scale=dim**-0.5)
        sd[f"{prefix}mixer.Wkv.weight"] = _rand(g, 2 * inner, kv_dim, scale=kv_dim**-0.5)
    sd[f"{prefix}mixer.out_proj.weight"] = _rand(g, dim, inner, scale=inner**-0.5)
    sd[f"{prefix}mixer.out_proj.bias"] = _rand(g, dim, scale=0.1)
    sd[f"{prefix}norm2.weight"] = 1 + _rand(g, dim, scale=0.1)
    sd[f"{prefix}norm2.bias"] = _rand(g, dim, scale=0.1)
    width = 2 * hidden if gated else hidden
    sd[f"{prefix}mlp.fc1.weight"] = _rand(g, width, dim, scale=dim**-0.5)
    sd[f"{prefix}mlp.fc1.bias"] = _rand(g, width, scale=0.1)
    sd[f"{prefix}mlp.fc2.weight"] = _rand(g, dim, hidden, scale=hidden**-0.5)
    sd[f"{prefix}mlp.fc2.bias"] = _rand(g, dim, scale=0.1)
    return sd


def seed_cfg(**kw):
    return {**SEED_DEFAULTS, **kw}


def seed_state_dict(cfg, io=False, seed=0, multiple_of=256):
    """A random state dict in the format of the seed's `Perceiver(**cfg)` (or `PerceiverIO`, where `depth` counts
    self-attentions), its gated MLP rounded as flash-attn `multiple_of` (256: flash-attn <= 2.3)."""
    g = torch.Generator().manual_seed(seed)
    L = cfg["latent_dim"]
    blocks = 1 if io else cfg["depth"]
    self_blocks = cfg["depth"] if io else cfg["self_per_cross_attn"]
    dims = cfg["input_dim"] if isinstance(cfg["input_dim"], list) else [cfg["input_dim"]] * blocks
    gated = cfg["gated_mlp"]
    # Quirk: flash-attn's GatedMlp rounds hidden_features=4*latent_dim up to `multiple_of`; its plain Mlp does not.
    hidden = -(-4 * L // multiple_of) * multiple_of if gated else 4 * L
    sd = {}
    if cfg["num_latents"]:
        sd["latents"] = _rand(g, cfg["num_latents"], L)
    for i in range(blocks):
        if cfg["weight_tie_layers"] and i >= 2:
            # Quirk: the seed's weight tying shares block 1's modules from block 2 on; the state dict repeats them.
            sd.update({k.replace("layers.1.", f"layers.{i}.", 1): v for k, v in sd.items() if k.startswith("layers.1.")})
            continue
        sd.update(_seed_block(g, f"layers.{i}.0.", L, dims[i], cfg["cross_heads"], cfg["cross_head_dim"], gated, hidden))
        for j in range(self_blocks):
            sd.update(_seed_block(g, f"layers.{i}.1.{j}.", L, None, cfg["latent_heads"], cfg["latent_head_dim"], gated,
                                  hidden))
    if cfg["num_zero_tokens"]:
        for i in range(blocks):
            sd[f"zero_tokens.{i}"] = _rand(g, cfg["num_zero_tokens"], dims[i])
    if io:
        q = cfg["query_dim"]
        # Quirk: the query block reuses the encoder's MLP class: a gated MLP stays 4*latent_dim wide (not 4*query_dim).
        sd.update(_seed_block(g, "query_block.", q, L, cfg["query_heads"], cfg["query_head_dim"], gated,
                              hidden if gated else 4 * q))
        out = cfg["proj_dim"]
        width = q
    else:
        out = cfg["output_dim"]
        width = L * cfg["num_latents"] if cfg["output_mode"] == "concat" else L
    if out is not None:
        sd.update({"out_proj.0.weight": 1 + _rand(g, width, scale=0.1), "out_proj.0.bias": _rand(g, width, scale=0.1),
                   "out_proj.1.weight": _rand(g, out, width, scale=width**-0.5), "out_proj.1.bias": _rand(g, out, scale=0.1)})
    return sd


# ---------------------------------------------------------------------------------------------------- seed math
def _ln(sd, p, x):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], 1e-5)


def _lin(sd, p, x):
    return F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))


def _rotary(x, dim):
    """flash-attn's RotaryEmbedding (non-interleaved): rotate-half on the first `dim` channels, positions 0..n-1."""
    if not dim:
        return x
    inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = torch.outer(torch.arange(x.shape[1], dtype=torch.float32), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[None, :, None], torch.cat([ang.sin()] * 2, -1)[None, :, None]
    xr, rest = x[..., :dim], x[..., dim:]
    x1, x2 = xr.chunk(2, -1)
    return torch.cat([xr * cos + torch.cat([-x2, x1], -1) * sin, rest], -1)


def _seed_block_forward(sd, p, x, heads, head_dim, gated, kv=None, mask=None, rotary=0):
    h = _ln(sd, p + "norm1", x)
    if kv is None:
        q, k, v = _lin(sd, p + "mixer.Wqkv", h).unflatten(-1, (3, heads, head_dim)).unbind(-3)
        q, k = _rotary(q, rotary), _rotary(k, rotary)
    else:
        # Quirk: only the latents are LayerNorm'd; keys and values come from the raw input (no context norm).
        q = _lin(sd, p + "mixer.Wq", h).unflatten(-1, (heads, head_dim))
        k, v = _lin(sd, p + "mixer.Wkv", kv).unflatten(-1, (2, heads, head_dim)).unbind(-3)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(-2)
    residual = x + _lin(sd, p + "mixer.out_proj", attn)
    y = _lin(sd, p + "mlp.fc1", _ln(sd, p + "norm2", residual))
    # Quirk: the gated MLP is a GLU with sigmoid (F.glu: first half value, second half gate).
    y = F.glu(y, dim=-1) if gated else F.gelu(y)
    # Quirk: flash-attn's Block returns (mlp_out, residual) and the seed keeps element 0 only: no skip around the MLP.
    return _lin(sd, p + "mlp.fc2", y)


def seed_forward(sd, cfg, data, mask=None, latents=None, queries=None, io=False, return_embeddings=False):
    blocks = 1 if io else cfg["depth"]
    self_blocks = cfg["depth"] if io else cfg["self_per_cross_attn"]
    multi = isinstance(data, list)
    datas = data if multi else [data] * blocks
    masks = (mask if mask is not None else [None] * blocks) if multi else [mask] * blocks
    batch = datas[0].shape[0]
    x = sd["latents"] if latents is None else latents
    x = x.expand(batch, -1, -1) if x.dim() == 2 else x
    gated = cfg["gated_mlp"]
    context = None
    for i in range(blocks):
        d, m = datas[i], masks[i]
        if cfg["num_zero_tokens"]:
            z = sd[f"zero_tokens.{i}"].expand(batch, -1, -1)
            d = torch.cat([z, d], 1)
            m = None if m is None else torch.cat([torch.ones(batch, z.shape[1], dtype=torch.bool), m], 1)
        # Quirk: with ONE input tensor the seed builds the cross-attention input in block 0 only and reuses it, so
        # every block sees zero_tokens.0.
        if multi or context is None:
            context = (d, m)
        x = _seed_block_forward(sd, f"layers.{i}.0.", x, cfg["cross_heads"], cfg["cross_head_dim"], gated,
                                kv=context[0], mask=context[1])
        for j in range(self_blocks):
            x = _seed_block_forward(sd, f"layers.{i}.1.{j}.", x, cfg["latent_heads"], cfg["latent_head_dim"], gated,
                                    rotary=cfg["latent_rotary_emb_dim"])
    has_proj = "out_proj.1.weight" in sd
    if io:
        if queries is None:
            return x
        q = queries.expand(batch, -1, -1) if queries.dim() == 2 else queries
        out = _seed_block_forward(sd, "query_block.", q, cfg["query_heads"], cfg["query_head_dim"], gated, kv=x)
        return _lin(sd, "out_proj.1", _ln(sd, "out_proj.0", out)) if has_proj else out
    if return_embeddings or not has_proj:
        return x
    pooled = {"average": lambda t: t.mean(1), "concat": lambda t: t.flatten(1), "first": lambda t: t[:, 0]}
    return _lin(sd, "out_proj.1", _ln(sd, "out_proj.0", pooled[cfg["output_mode"]](x)))


def converter_kwargs(cfg, io=False, **extra):
    keys = ["cross_heads", "cross_head_dim", "latent_heads", "latent_head_dim", "latent_rotary_emb_dim"]
    keys += ["query_heads", "query_head_dim"] if io else []
    kw = {k: cfg[k] for k in keys}
    if not io and cfg["output_dim"] is not None and cfg["output_mode"] != "concat":
        kw["output_mode"] = cfg["output_mode"]
    return {**kw, **extra}


def _inputs(seed, batch, seq, width):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, width, generator=g)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    return x, torch.arange(seq)[None] < lengths[:, None]


# ---------------------------------------------------------------------------------------------------- tests
def test_seed_format_matches_a_real_seed_checkpoint():
    """The test's checkpoint generator produces exactly the keys and shapes of the seed's own models."""
    cfg = seed_cfg(input_dim=12, depth=3, output_dim=5, num_latents=4, latent_dim=32, cross_heads=1, cross_head_dim=16,
                   latent_heads=2, latent_head_dim=16, weight_tie_layers=True, num_zero_tokens=2)
    assert {k: list(v.shape) for k, v in seed_state_dict(cfg).items()} == REAL_SEED_PERCEIVER
    cfg_io = seed_cfg(input_dim=12, query_dim=8, depth=2, proj_dim=3, num_latents=4, latent_dim=32, cross_heads=1,
                      cross_head_dim=16, latent_heads=2, latent_head_dim=16, query_heads=1, query_head_dim=8)
    assert {k: list(v.shape) for k, v in seed_state_dict(cfg_io, io=True).items()} == REAL_SEED_PERCEIVER_IO


PERCEIVER_CASES = {
    "head-average+tied+zero+rotary": (
        seed_cfg(input_dim=12, depth=4, output_dim=5, num_latents=6, latent_dim=32, cross_heads=2, cross_head_dim=8,
                 latent_heads=4, latent_head_dim=8, latent_rotary_emb_dim=4, weight_tie_layers=True, num_zero_tokens=2),
        dict(shared_input=True), "tensor"),
    "head-first+zero+list-same-width": (
        seed_cfg(input_dim=12, depth=3, output_dim=3, output_mode="first", num_latents=5, latent_dim=32, cross_heads=1,
                 cross_head_dim=16, latent_heads=2, latent_head_dim=16, num_zero_tokens=3),
        dict(shared_input=False), "list"),
    "head-concat+2-self+width80": (
        seed_cfg(input_dim=7, depth=2, output_dim=4, output_mode="concat", num_latents=3, latent_dim=80, cross_heads=2,
                 cross_head_dim=8, latent_heads=5, latent_head_dim=16, self_per_cross_attn=2),
        {}, "tensor"),
    "no-head+gelu-mlp+list-widths": (
        seed_cfg(input_dim=[12, 20], depth=2, num_latents=6, latent_dim=32, cross_heads=2, cross_head_dim=8,
                 latent_heads=4, latent_head_dim=8, gated_mlp=False, num_zero_tokens=1),
        {}, "list"),
    "no-learned-latents": (
        seed_cfg(input_dim=12, depth=2, num_latents=None, latent_dim=32, cross_heads=1, cross_head_dim=16,
                 latent_heads=4, latent_head_dim=8, latent_rotary_emb_dim=8),
        {}, "tensor"),
}


@pytest.mark.parametrize("name", list(PERCEIVER_CASES))
def test_converted_perceiver_matches_seed_math(name):
    cfg, extra, call = PERCEIVER_CASES[name]
    sd = seed_state_dict(cfg, seed=1)
    model = convert_flash_perceiver_checkpoint(sd, **converter_kwargs(cfg, **extra))
    hf = model.to_hf()
    expected_class = PerceiverModel if cfg["output_dim"] is None else PerceiverForSequenceClassification
    assert type(hf) is expected_class and not model.training
    dims = cfg["input_dim"] if isinstance(cfg["input_dim"], list) else [cfg["input_dim"]] * cfg["depth"]
    pairs = [_inputs(10 + i, 3, 9 - i, w) for i, w in enumerate(dims)]
    if call == "list":
        data, mask = [p[0] for p in pairs], [p[1] if i % 2 == 0 else None for i, p in enumerate(pairs)]
    else:
        data, mask = pairs[0]
    latents = torch.randn(4, cfg["latent_dim"]) if cfg["num_latents"] is None else None
    for use_flash_attn in (False, True):  # eager, then the fused SDPA path
        model.set_flash_attn(use_flash_attn)
        with torch.no_grad():
            for m in (None, mask):
                expected = seed_forward(sd, cfg, data, m, latents=latents)
                got = model(data, mask=m, latents=latents)
                assert got.shape == expected.shape
                torch.testing.assert_close(got, expected, atol=PARITY_TOL, rtol=0)
                if cfg["output_dim"] is not None:
                    emb = model(data, mask=m, latents=latents, return_embeddings=True)
                    torch.testing.assert_close(emb, seed_forward(sd, cfg, data, m, latents, return_embeddings=True),
                                               atol=PARITY_TOL, rtol=0)


def test_shared_input_quirk_matters():
    """With zero tokens, the seed's one-tensor and list calls differ; `shared_input` picks the one to reproduce."""
    cfg = seed_cfg(input_dim=12, depth=3, num_latents=4, latent_dim=32, cross_heads=1, cross_head_dim=16,
                   latent_heads=2, latent_head_dim=16, num_zero_tokens=2)
    sd = seed_state_dict(cfg, seed=3)
    x, _ = _inputs(0, 2, 6, 12)
    shared = convert_flash_perceiver_checkpoint(sd, **converter_kwargs(cfg, shared_input=True))
    per_block = convert_flash_perceiver_checkpoint(sd, **converter_kwargs(cfg, shared_input=False))
    with torch.no_grad():
        torch.testing.assert_close(shared(x), seed_forward(sd, cfg, x), atol=PARITY_TOL, rtol=0)
        torch.testing.assert_close(per_block([x, x, x]), seed_forward(sd, cfg, [x, x, x]), atol=PARITY_TOL, rtol=0)
        assert (per_block(x) - seed_forward(sd, cfg, x)).abs().max() > 1e-2


IO_CASES = {
    "proj+zero+rotary+gated": seed_cfg(input_dim=12, query_dim=24, depth=3, proj_dim=7, num_latents=6, latent_dim=32,
                                       cross_heads=2, cross_head_dim=8, latent_heads=4, latent_head_dim=8,
                                       latent_rotary_emb_dim=8, query_heads=2, query_head_dim=8, num_zero_tokens=2),
    "no-proj+gelu-mlp": seed_cfg(input_dim=12, query_dim=16, depth=2, num_latents=6, latent_dim=32, cross_heads=1,
                                 cross_head_dim=16, latent_heads=2, latent_head_dim=16, gated_mlp=False, query_heads=1,
                                 query_head_dim=16),
}


@pytest.mark.parametrize("name", list(IO_CASES))
def test_converted_perceiver_io_matches_seed_math(name):
    cfg = IO_CASES[name]
    sd = seed_state_dict(cfg, io=True, seed=2)
    model = convert_flash_perceiver_checkpoint(sd, **converter_kwargs(cfg, io=True))
    assert isinstance(model, PerceiverIO) and type(model.to_hf()) is PerceiverIOModel
    assert model.to_hf().config.output_dim == cfg["proj_dim"]
    x, mask = _inputs(5, 3, 8, 12)
    queries2d = torch.randn(5, cfg["query_dim"])
    queries3d = torch.randn(3, 4, cfg["query_dim"])
    for use_flash_attn in (False, True):
        model.set_flash_attn(use_flash_attn)
        with torch.no_grad():
            for q, m in ((queries2d, None), (queries3d, mask), (None, mask)):
                expected = seed_forward(sd, cfg, x, m, queries=q, io=True)
                torch.testing.assert_close(model(x, mask=m, queries=q), expected, atol=PARITY_TOL, rtol=0)


def test_mlp_width_from_flash_attn_version():
    """flash-attn <= 2.3 rounds the gated MLP to 256, >= 2.4 to 128: read from the weights, checked if stated."""
    cfg = seed_cfg(input_dim=8, depth=1, num_latents=4, latent_dim=80, cross_heads=1, cross_head_dim=16,
                   latent_heads=5, latent_head_dim=16)
    for multiple, version in ((256, "2.3.6"), (128, "2.5.9.post1")):
        sd = seed_state_dict(cfg, multiple_of=multiple)
        model = convert_flash_perceiver_checkpoint(sd, **converter_kwargs(cfg))
        assert model.config.mlp_hidden_size == {256: 512, 128: 384}[multiple]
        convert_flash_perceiver_checkpoint(sd, **converter_kwargs(cfg), flash_attn_version=version)
        other = "2.7.4" if multiple == 256 else "2.3.6"
        with pytest.raises(ValueError, match=r"layers\.0\.0\.mlp\.fc1\.weight: expected"):
            convert_flash_perceiver_checkpoint(sd, **converter_kwargs(cfg), flash_attn_version=other)


def test_converted_config_uses_seed_wiring():
    cfg = seed_cfg(input_dim=12, depth=1, num_latents=4, latent_dim=32, cross_heads=1, cross_head_dim=16,
                   latent_heads=2, latent_head_dim=16)
    config = convert_flash_perceiver_checkpoint(seed_state_dict(cfg), **converter_kwargs(cfg)).config
    assert (config.mlp_residual, config.cross_input_norm, config.mlp_gate_activation) == (False, False, "sigmoid")
    assert (config.latent_qkv_bias, config.cross_qkv_bias, config.mlp_hidden_size) == (True, False, 256)


def test_wrapper_prefixes_are_stripped():
    cfg = seed_cfg(input_dim=12, depth=1, num_latents=4, latent_dim=32, cross_heads=1, cross_head_dim=16,
                   latent_heads=2, latent_head_dim=16)
    sd = seed_state_dict(cfg)
    x, _ = _inputs(0, 2, 5, 12)
    model = convert_flash_perceiver_checkpoint({"module." + k: v for k, v in sd.items()}, **converter_kwargs(cfg))
    with torch.no_grad():
        torch.testing.assert_close(model(x), seed_forward(sd, cfg, x), atol=PARITY_TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- bad input
SMALL = seed_cfg(input_dim=12, depth=3, output_dim=5, num_latents=4, latent_dim=32, cross_heads=2, cross_head_dim=8,
                 latent_heads=2, latent_head_dim=16, weight_tie_layers=True)


def _small_sd(**changes):
    sd = seed_state_dict(SMALL)
    for key, value in changes.items():
        if value is None:
            del sd[key]
        else:
            sd[key] = value
    return sd


def test_mismatched_state_dict_lists_missing_unexpected_and_shapes():
    sd = _small_sd(**{"layers.0.0.norm2.bias": None, "layers.0.1.0.mixer.Wqkv.bias": None,
                      "layers.0.1.0.mixer.out_proj.weight": torch.zeros(32, 8), "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError) as err:
        convert_flash_perceiver_checkpoint(sd, **converter_kwargs(SMALL))
    message = str(err.value)
    assert "Missing keys (2)" in message and "layers.0.0.norm2.bias" in message
    assert "layers.0.1.0.mixer.Wqkv.bias" in message
    assert "Unexpected keys (1)" in message and "extra.weight" in message
    assert "layers.0.1.0.mixer.out_proj.weight: expected (32, 32), got (32, 8)" in message


def test_heads_must_be_given_not_guessed():
    sd = _small_sd()
    with pytest.raises(ValueError, match=r"\['cross_heads', 'cross_head_dim', 'latent_heads', 'latent_head_dim', "
                                         r"'latent_rotary_emb_dim'\].*cannot tell them apart"):
        convert_flash_perceiver_checkpoint(sd, output_mode="average")
    # A factorisation that does not multiply to the stored width is a shape mismatch, named as such.
    kw = converter_kwargs(SMALL)
    kw["cross_head_dim"] = 16
    with pytest.raises(ValueError, match=r"layers\.0\.0\.mixer\.Wq\.weight: expected \(32, 32\), got \(16, 32\)"):
        convert_flash_perceiver_checkpoint(sd, **kw)
    io = seed_cfg(input_dim=12, query_dim=8, depth=1, num_latents=4, latent_dim=32, cross_heads=1, cross_head_dim=16,
                  latent_heads=2, latent_head_dim=16)
    kw = converter_kwargs(io)
    with pytest.raises(ValueError, match=r"\['query_heads', 'query_head_dim'\]"):
        convert_flash_perceiver_checkpoint(seed_state_dict(io, io=True), **kw)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(output_mode=None), ValueError, r"pass `output_mode`"),
        (dict(num_heads=4), TypeError, r"Unknown argument\(s\) \['num_heads'\]"),
        (dict(cross_heads="2"), TypeError, r"`cross_heads` must be an int >= 1, got '2'"),
        (dict(cross_rotary_emb_dim=8), ValueError, r"rotary cross-attention"),
        (dict(output_mode="max"), ValueError, r"`output_mode` must be 'average'"),
        (dict(weight_tie_layers=False, depth=2), ValueError, r"Unexpected keys \(24\)"),
        (dict(input_dim=[12, 12]), ValueError, r"lists 2 widths but the model has 3"),
        (dict(flash_attn_version="two"), ValueError, r"must look like '2.3.6'"),
        (dict(mlp_multiple_of=128, flash_attn_version="2.3.6"), ValueError, r"contradicts"),
        (dict(use_flash_attn="yes"), TypeError, r"`use_flash_attn` must be a bool"),
    ],
)
def test_bad_converter_arguments(kwargs, err, match):
    kw = converter_kwargs(SMALL)
    for key, value in kwargs.items():
        if value is None:
            kw.pop(key)
        else:
            kw[key] = value
    with pytest.raises(err, match=match):
        convert_flash_perceiver_checkpoint(_small_sd(), **kw)


def test_ambiguous_zero_tokens_ask_for_shared_input():
    cfg = seed_cfg(input_dim=12, depth=2, num_latents=4, latent_dim=32, cross_heads=1, cross_head_dim=16,
                   latent_heads=2, latent_head_dim=16, num_zero_tokens=2)
    with pytest.raises(ValueError, match=r"shared_input=True.*shared_input=False"):
        convert_flash_perceiver_checkpoint(seed_state_dict(cfg), **converter_kwargs(cfg))


def test_untied_duplicates_are_reported():
    sd = _small_sd()
    sd["layers.2.0.norm1.weight"] = sd["layers.2.0.norm1.weight"] + 1  # claims tying, but block 2 differs
    with pytest.raises(ValueError, match=r"(?s)weight_tie_layers=True, but these differ.*layers\.2\.0\.norm1\.weight"):
        convert_flash_perceiver_checkpoint(sd, **converter_kwargs(SMALL), weight_tie_layers=True)
    # Without the claim, differing blocks are simply untied: the model converts with three blocks.
    model = convert_flash_perceiver_checkpoint(sd, **converter_kwargs(SMALL))
    assert model.config.weight_tie_layers is False and len(model.encoder_model.encoder.cross_layers) == 3


def test_state_dict_type_errors():
    with pytest.raises(TypeError, match="mapping of parameter names to tensors"):
        convert_flash_perceiver_checkpoint([("latents", torch.zeros(1))], **converter_kwargs(SMALL))
    with pytest.raises(TypeError, match=r"these entries do not: \['latents'\]"):
        convert_flash_perceiver_checkpoint({"latents": [0.0]}, **converter_kwargs(SMALL))


# ---------------------------------------------------------------------------------------------------- command line
def test_cli_converts_and_saves_loadable_models(tmp_path, capsys):
    sd = seed_state_dict(SMALL, seed=4)
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}, "epoch": 3}, tmp_path / "seed.ckpt")
    kwargs_file = tmp_path / "seed.json"
    kwargs_file.write_text('{"cross_heads": 2, "cross_head_dim": 8, "latent_heads": 2, "latent_head_dim": 16, '
                           '"latent_rotary_emb_dim": 0, "output_mode": "mean"}')
    out = tmp_path / "converted"
    assert main([str(tmp_path / "seed.ckpt"), str(out), "--seed-kwargs", str(kwargs_file), "--prefix", "model."]) == 0
    assert "PerceiverForSequenceClassification" in capsys.readouterr().out
    x, mask = _inputs(0, 2, 7, 12)
    expected = seed_forward(sd, SMALL, x, mask)
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(out)(x, attention_mask=mask).logits
        torch.testing.assert_close(logits, expected, atol=PARITY_TOL, rtol=0)
        torch.testing.assert_close(Perceiver.from_pretrained(out)(x, mask), expected, atol=PARITY_TOL, rtol=0)
        latents = AutoModel.from_pretrained(out)(x, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(latents, seed_forward(sd, SMALL, x, mask, return_embeddings=True),
                                   atol=PARITY_TOL, rtol=0)

    io = IO_CASES["no-proj+gelu-mlp"]
    sd_io = seed_state_dict(io, io=True, seed=5)
    save_file(sd_io, str(tmp_path / "io.safetensors"))
    kw = '{"cross_heads": 1, "cross_head_dim": 16, "latent_heads": 2, "latent_head_dim": 16, ' \
         '"latent_rotary_emb_dim": 0, "query_heads": 1, "query_head_dim": 16}'
    assert main([str(tmp_path / "io.safetensors"), str(tmp_path / "io"), "--seed-kwargs", kw]) == 0
    queries = torch.randn(3, io["query_dim"])
    with torch.no_grad():
        got = PerceiverIO.from_pretrained(tmp_path / "io")(x, mask, queries=queries)
        torch.testing.assert_close(got, seed_forward(sd_io, io, x, mask, queries=queries, io=True), atol=PARITY_TOL,
                                   rtol=0)


def test_cli_reports_errors(tmp_path, capsys):
    torch.save(seed_state_dict(SMALL), tmp_path / "seed.pt")
    assert main([str(tmp_path / "seed.pt"), str(tmp_path / "out"), "--seed-kwargs", '{"cross_heads": 2}']) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "cross_head_dim" in err and not (tmp_path / "out").exists()
    assert main([str(tmp_path / "seed.pt"), str(tmp_path / "out"), "--seed-kwargs", "[1, 2]"]) == 1
    assert "must be a JSON object" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "out"), "--seed-kwargs", "{}"]) == 1


def _random_bytes(n: int = 4096) -> bytes:
    return bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).tolist())


def _zip_without_checkpoint(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")


# Files that are not a state dict: (file name, writer, what the error says about it).
BAD_CHECKPOINTS = {
    "text": ("seed.pt", lambda path: path.write_text("epoch 3, loss 0.12\n"), "is not a torch.save file"),
    "empty": ("seed.pt", lambda path: path.write_bytes(b""), "is empty"),
    "zip": ("seed.pt", _zip_without_checkpoint, "is a zip archive but not a torch.save checkpoint"),
    "garbage-safetensors": ("seed.safetensors", lambda path: path.write_bytes(_random_bytes()),
                            "is not a valid .safetensors file"),
    # torch's own message for these advises `weights_only=False`, i.e. running the file's code: never relayed.
    "random-bytes": ("seed.pt", lambda path: path.write_bytes(_random_bytes()), "is not a torch.save file"),
    "non-tensor-objects": ("seed.ckpt", lambda path: torch.save(
        {"state_dict": seed_state_dict(SMALL), "hparams": argparse.Namespace(lr=0.1)}, path),
        "holds objects other than tensors (argparse.Namespace)"),
    "a-tensor": ("seed.pt", lambda path: torch.save(torch.zeros(3), path), "holds a Tensor, not a state dict"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_unreadable_checkpoint_is_one_error_line_and_exit_2(tmp_path, capsys, case):
    name, write, what = BAD_CHECKPOINTS[case]
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as info:
        load_state_dict_file(path)
    message = str(info.value)
    assert message.startswith(f"{path} {what}")
    assert message.endswith("expected a PyTorch state dict saved with torch.save (.pt/.pth/.bin/.ckpt) or a "
                            ".safetensors file.")
    assert "weights_only" not in message and "\n" not in message
    out = tmp_path / "out"
    kw = json.dumps(converter_kwargs(SMALL))
    assert main([str(path), str(out), "--seed-kwargs", kw]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"convert-flash-perceiver-checkpoint: error: {message}\n"  # one line, no traceback
    assert captured.out == "" and not out.exists()


def test_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    torch.save(seed_state_dict(SMALL), tmp_path / "seed.pt")
    out = tmp_path / "converted"
    out.write_text("keep me")
    assert main([str(tmp_path / "seed.pt"), str(out), "--seed-kwargs", json.dumps(converter_kwargs(SMALL))]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"convert-flash-perceiver-checkpoint: error: the output path {out} is an existing file; "
                            "expected a directory to write the converted model into (an existing one, or a path to "
                            "create).\n")
    assert captured.out == "" and out.read_text() == "keep me"


def test_console_script_entry_point():
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts")
                if e.name == "convert-flash-perceiver-checkpoint"]
    assert entry.load() is main


def test_console_script_in_pyproject_is_main():
    # The installed entry point above may come from an older install; the project file is what the next one uses.
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("needs the source tree's pyproject.toml")
    target = tomllib.loads(pyproject.read_text())["project"]["scripts"]["convert-flash-perceiver-checkpoint"]
    module, _, attr = target.partition(":")
    assert module == "hf_flash_perceiver.legacy.convert_flash_perceiver"
    assert getattr(importlib.import_module(module), attr) is main

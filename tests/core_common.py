"""Shared by the core test modules: small and random configs, inputs, and model building."""

from __future__ import annotations

import random
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_flash_perceiver import PerceiverConfig, PerceiverModel


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside it, by name (`ops["cat"]`): what a kernel count follows, on any device."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def graph_breaks(model, *args, **kwargs) -> str:
    """`"<n> graph break(s): [reasons]"` of dynamo tracing `model(*args, **kwargs)` (no compilation: seconds)."""
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(model)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    reasons = sorted({str(b.reason).splitlines()[0] for b in explanation.break_reasons})
    return f"{explanation.graph_break_count} graph break(s): {reasons}"


CPU_BACKENDS = ["eager", "sdpa", "varlen"]  # varlen runs SDPA off CUDA; the CUDA varlen kernel is in test_cuda.py
FP32_TOL = 1e-5  # CPU fp32 vs the fp32 reference: only summation order differs


def small_config(**kw) -> PerceiverConfig:
    base = dict(
        input_dim=12, depth=2, num_latents=6, latent_dim=32, cross_heads=2, cross_head_dim=8, latent_heads=4,
        latent_head_dim=8,
    )
    base.update(kw)
    return PerceiverConfig(**base)


def random_config(seed: int) -> PerceiverConfig:
    rng = random.Random(seed)
    depth = rng.choice([1, 2, 3])
    list_inputs = rng.random() < 0.3
    cross_head_dim = rng.choice([8, 16])
    latent_head_dim = rng.choice([8, 16])
    return PerceiverConfig(
        input_dim=[rng.choice([5, 12, 16]) for _ in range(depth)] if list_inputs else rng.choice([5, 12, 16]),
        depth=depth,
        num_latents=rng.choice([1, 4, 7]),
        latent_dim=rng.choice([16, 24, 32]),
        cross_heads=rng.choice([1, 2, 3]),
        cross_head_dim=cross_head_dim,
        cross_rotary_emb_dim=rng.choice([0, 4, cross_head_dim]),
        latent_heads=rng.choice([1, 2, 4]),
        latent_head_dim=latent_head_dim,
        latent_rotary_emb_dim=rng.choice([0, 4, latent_head_dim]),
        gated_mlp=rng.random() < 0.5,
        mlp_gate_activation=rng.choice(["gelu", "silu", "sigmoid"]),
        mlp_residual=rng.random() < 0.7,
        cross_input_norm=rng.random() < 0.7,
        latent_qkv_bias=rng.random() < 0.5,
        cross_qkv_bias=rng.random() < 0.5,
        weight_tie_layers=(not list_inputs) and rng.random() < 0.5,
        self_per_cross_attn=rng.choice([1, 2]),
        num_zero_tokens=rng.choice([None, 1, 3]),
        # transformers-Perceiver-style wiring: other value widths, no query residual, a repeated latent stack,
        # per-role MLP widths.
        cross_v_head_dim=rng.choice([None, 4, 12]),
        latent_v_head_dim=rng.choice([None, 4, 16]),
        cross_query_residual=rng.random() < 0.7,
        latent_stack_repeats=rng.choice([1, 1, 2]),
        cross_mlp_ratio=rng.choice([None, 1, 2]),
    )


def make_inputs(config, batch=3, seq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = seq if isinstance(seq, list) else [seq or 9] * config.depth
    dims = config.input_dims
    if isinstance(config.input_dim, list):
        return [torch.randn(batch, seqs[i], dims[i], generator=g) for i in range(config.depth)]
    return torch.randn(batch, seqs[0], dims[0], generator=g)


def rel_err(a, b) -> float:
    """Relative error of the whole tensor `a` against `b` (Frobenius norm, in fp64)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def shared_key_value_reference(q, x, mask, keep, dropout: float):
    """fp64 `softmax(q x^T)` dropped out with the mask `keep` (and keys masked by `mask`), and that times `x`: the
    reference of fused_softmax's shared key/value attention. Returns `(q64, x64, dropped, out)`, the first two leaves
    that take gradients."""
    q64, x64 = (t.detach().double().requires_grad_() for t in (q, x))
    scores = q64 @ x64.transpose(1, 2)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    dropped = torch.softmax(scores, -1) * keep / (1 - dropout)
    return q64, x64, dropped, dropped @ x64


def build(config, impl="sdpa", seed=0):
    torch.manual_seed(seed)
    model = PerceiverModel._from_config(config, attn_implementation=impl).eval()
    # Randomise LayerNorm affine params and biases too, so that a mix-up between them cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


# ------------------------------------------------------------------ config

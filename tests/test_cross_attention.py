"""`cross_attention_checkpointing`: chunked, recomputed cross-attention equals the regular path, values and grads."""

from __future__ import annotations

import pytest
import torch

from hf_flash_perceiver import PerceiverModel

from reference import reference_forward
from core_common import FP32_TOL, build, random_config, small_config


def _pair(cfg, chunk):
    regular = build(cfg, "sdpa")
    chunked_cfg = cfg.__class__(**{**cfg.to_dict(), "cross_attention_checkpointing": True,
                                   "cross_attention_chunk_size": chunk})
    chunked = PerceiverModel._from_config(chunked_cfg, attn_implementation="sdpa").eval()
    chunked.load_state_dict(regular.state_dict())
    return regular, chunked


def _grads(model, x, mask, latents=None):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    out = model(x, mask, latents=latents).last_hidden_state
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad
    return out, grads


@pytest.mark.parametrize("chunk", [1, 3, 8, 1000])
@pytest.mark.parametrize("rotary, zeros, norm, bias", [(0, None, True, False), (4, 2, True, True), (4, 1, False, True),
                                                       (0, None, False, False)])
def test_chunked_equals_regular_with_grads(chunk, rotary, zeros, norm, bias):
    cfg = small_config(cross_rotary_emb_dim=rotary, num_zero_tokens=zeros, depth=2, cross_input_norm=norm,
                       cross_qkv_bias=bias)
    regular, chunked = _pair(cfg, chunk)
    x = torch.randn(4, 11, cfg.input_dim)
    mask = torch.rand(4, 11, generator=torch.Generator().manual_seed(0)) < 0.6
    mask[2] = False  # one sample with no valid key at all
    mask[3] = True
    out_r, g_r = _grads(regular, x, mask)
    out_c, g_c = _grads(chunked, x, mask)
    torch.testing.assert_close(out_c, out_r, atol=FP32_TOL, rtol=FP32_TOL)
    assert g_r.keys() == g_c.keys()
    for name in g_r:
        # fp32, different summation order (chunks, folded LayerNorm affine): 2e-6 of the gradient's scale
        scale = max(1.0, g_r[name].abs().max().item())
        torch.testing.assert_close(g_c[name], g_r[name], atol=2e-6 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("seed", range(6))
def test_chunked_matches_reference_random_configs(seed):
    cfg = random_config(seed)
    if cfg.cross_attn_dropout:
        pytest.skip("dropout")
    regular, chunked = _pair(cfg, 4)
    x = [torch.randn(2, 9, d) for d in cfg.input_dims] if isinstance(cfg.input_dim, list) else torch.randn(2, 9, cfg.input_dim)
    out = chunked(x).last_hidden_state
    ref, _, _ = reference_forward(chunked, x)
    torch.testing.assert_close(out, ref, atol=FP32_TOL, rtol=FP32_TOL)


def test_chunked_output_attentions_falls_back_to_maps():
    cfg = small_config()
    _, chunked = _pair(cfg, 2)
    out = chunked(torch.randn(2, 7, cfg.input_dim), output_attentions=True)
    assert out.attentions[0].shape == (2, cfg.cross_heads, cfg.num_latents, 7)


def test_config_rejects_dropout_with_checkpointing():
    with pytest.raises(ValueError, match="cross_attention_checkpointing"):
        small_config(cross_attention_checkpointing=True, cross_attn_dropout=0.1)


def test_only_the_encoder_cross_attention_is_chunked():
    # Decoders and the query-pooling block attend to the few latents: they keep the regular path (and their dropout).
    from hf_flash_perceiver import PerceiverIOModel

    cfg = small_config(cross_attention_checkpointing=True, cross_attention_chunk_size=2, query_dim=8, output_dim=3)
    io = PerceiverIOModel(cfg).eval()
    assert all(layer.attn.spec.chunked for layer in io.perceiver.encoder.cross_layers)
    assert not io.decoder.block.attn.spec.chunked
    regular = PerceiverIOModel(cfg.__class__(**{**cfg.to_dict(), "cross_attention_checkpointing": False})).eval()
    regular.load_state_dict(io.state_dict())
    x, q = torch.randn(2, 7, cfg.input_dim), torch.randn(5, 8)
    torch.testing.assert_close(io(x, queries=q).logits, regular(x, queries=q).logits, atol=FP32_TOL, rtol=FP32_TOL)


@pytest.mark.parametrize(
    "heads, dk, dv, norm, bias",
    [(1, 32, 32, True, True), (2, 16, 24, True, False), (3, 8, 40, False, True)],
)
def test_absorbed_projection_equals_projected_keys(heads, dk, dv, norm, bias):
    # The wide-head path attends to the input itself with the key/value projection moved onto queries and output
    # (exact in real arithmetic); here against projected keys/values through the eager reference, values and
    # gradients, with padding and a sample without any valid key. fp32: only rounding differs.
    from hf_flash_perceiver.attention_backends import KeyPaddingMask, attention
    from hf_flash_perceiver.cross_attention import CrossInput

    cfg = small_config(depth=1, cross_heads=heads, cross_head_dim=dk, cross_v_head_dim=dv, cross_input_norm=norm,
                       cross_qkv_bias=bias)
    block = build(cfg, "sdpa").encoder.cross_layers[0]
    attn, input_norm = block.attn, block.context_norm
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(3, 40, cfg.input_dim, generator=g, requires_grad=True)
    latents = torch.randn(3, 5, cfg.latent_dim, generator=g)
    mask = torch.rand(3, 40, generator=g) < 0.7
    mask[0, 0], mask[2] = True, False

    def run(absorbed: bool):
        attn.zero_grad()
        context = CrossInput(x, KeyPaddingMask.from_mask(mask))
        (query,) = attn._heads(attn.q_proj(latents), dk)
        if absorbed:
            out = attn.absorbed_attention(query, context, input_norm)
        else:
            key, value = attn.project_context(context, input_norm)
            out, _ = attention(query, key, value, context.mask, implementation="eager")
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        if norm:
            grads["norm"] = input_norm.weight.grad.clone()
        grads["<input>"] = x.grad.clone()
        x.grad = None
        if norm:
            input_norm.weight.grad = None
        return out.detach(), grads

    out, grads = run(True)
    ref, ref_grads = run(False)
    assert out.shape == (3, 5, heads, dv)
    torch.testing.assert_close(out, ref, rtol=FP32_TOL, atol=FP32_TOL)
    assert torch.all(out[2] == 0)  # no valid key: no contribution, exactly
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("chunked", [False, True])
def test_block_applies_the_input_norm_it_holds_at_call_time(chunked):
    """The cross-attention applies the `context_norm` its block holds when called, not one it kept: a module put in
    its place (as `nn.DataParallel`'s replicas and PEFT's `modules_to_save` copies are) is what runs, on the regular
    and the chunked path alike."""
    cfg = small_config(depth=1, cross_attention_checkpointing=chunked)
    model = build(cfg, "sdpa")
    block = model.encoder.cross_layers[0]
    x = torch.randn(2, 9, cfg.input_dim)
    before = model(x).last_hidden_state
    replacement = torch.nn.LayerNorm(cfg.input_dim, eps=cfg.layer_norm_eps)
    with torch.no_grad():
        replacement.weight.uniform_(0.5, 1.5)
        replacement.bias.normal_()
    block.context_norm = replacement
    out = model(x).last_hidden_state
    assert not torch.allclose(out, before, atol=1e-4)
    out.square().mean().backward()
    assert replacement.weight.grad is not None and replacement.weight.grad.abs().sum() > 0
    # The same as a model built with those norm weights.
    rebuilt = build(cfg, "sdpa")
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x).last_hidden_state, out, rtol=FP32_TOL, atol=FP32_TOL)

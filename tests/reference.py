"""An independent fp32 reference of the Perceiver forward, written from the equations with plain tensor ops.

It reads a model's parameters but none of its code paths (no KeyPaddingMask, no attention entry point, no block
forward), so the package's backends are checked against something that does not share their bugs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _ln(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight.float(), norm.bias.float(), norm.eps)


def _linear(x, lin):
    return F.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float())


def _rotary(x, rot_dim, base):
    # x: (batch, seq, heads, head_dim); rotate-half on the first rot_dim channels, position = sequence index.
    if not rot_dim:
        return x
    seq = x.shape[1]
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).float(), torch.cat([ang.sin()] * 2, -1).float()
    xr, xp = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    xr = xr * cos[None, :, None] + rotated * sin[None, :, None]
    return torch.cat([xr, xp], -1)


def reference_attention(block, x, context, mask, rot_dim, base):
    attn = block.attn
    h, d, dv = attn.num_heads, attn.head_dim, attn.v_head_dim
    q_in = _ln(x, block.norm1)
    if context is None:
        q, k, v = _linear(q_in, attn.qkv_proj).split([h * d, h * d, h * dv], -1)
    else:
        c = _ln(context, block.context_norm) if block.context_norm is not None else context
        q = _linear(q_in, attn.q_proj)
        k, v = _linear(c, attn.kv_proj).split([h * d, h * dv], -1)
    q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (h, d)), v.unflatten(-1, (h, dv))
    q, k = _rotary(q, rot_dim, base), _rotary(k, rot_dim, base)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, -1)
    if mask is not None:
        probs = torch.nan_to_num(probs, nan=0.0)  # a sample without keys attends to nothing
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v).flatten(-2)
    return _linear(out, attn.o_proj), probs


def reference_block(block, x, context=None, mask=None, rot_dim=0, base=10000.0, residual_mlp=True, gated=True, act=F.gelu,
                    residual_attn=True):
    a, probs = reference_attention(block, x, context, mask, rot_dim, base)
    x = x + a if residual_attn else a
    hmid = _linear(_ln(x, block.norm2), block.mlp.fc1)
    if gated:
        value, gate = hmid.chunk(2, -1)
        hmid = value * act(gate)
    else:
        hmid = F.gelu(hmid)
    m = _linear(hmid, block.mlp.fc2)
    return (x + m if residual_mlp else m), probs


def reference_forward(model, inputs, masks=None, latents=None):
    """fp32 forward of a `PerceiverModel` (eval mode). `inputs`/`masks`: one entry per block (lists)."""
    cfg = model.config
    enc = model.encoder
    depth = cfg.depth
    if torch.is_tensor(inputs):
        inputs, masks = [inputs] * depth, [masks] * depth
    masks = masks if masks is not None else [None] * depth
    acts = {"gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid}
    kw = dict(base=cfg.rotary_base, residual_mlp=cfg.mlp_residual, gated=cfg.gated_mlp, act=acts[cfg.mlp_gate_activation])
    batch = inputs[0].shape[0]
    x = (model.latents if latents is None else latents).float()
    if x.dim() == 2:
        x = x.expand(batch, -1, -1)
    hidden, maps = [x], []
    for i in range(depth):
        b = enc.block_index(i)
        ctx, mask = inputs[i].float(), masks[i]
        if mask is not None:
            mask = mask.bool()
            ctx = ctx * mask[..., None]
        if enc.zero_tokens is not None:
            z = enc.zero_tokens[i].float().expand(batch, -1, -1)
            ctx = torch.cat([z, ctx], 1)
            if mask is not None:
                mask = torch.cat([torch.ones(batch, z.shape[1], dtype=torch.bool), mask], 1)
        x, p = reference_block(
            enc.cross_layers[b], x, ctx, mask, cfg.cross_rotary_emb_dim, residual_attn=cfg.cross_query_residual, **kw
        )
        hidden.append(x)
        maps.append(p)
        for _ in range(cfg.latent_stack_repeats):
            for layer in enc.self_layers[b]:
                x, p = reference_block(layer, x, None, None, cfg.latent_rotary_emb_dim, **kw)
                hidden.append(x)
                maps.append(p)
    return x, hidden, maps

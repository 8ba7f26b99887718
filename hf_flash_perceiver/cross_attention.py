"""Memory-lean cross-attention for long inputs (`config.cross_attention_checkpointing`).

A cross-attention over `n` input tokens normally keeps, per layer, the normalised input, its key/value projection
and (under autocast) a half-precision copy of the input for backward: several times the input itself, for every
cross-attention block. Here the input side — LayerNorm, key/value projection, rotary and attention — runs chunk by
chunk over the keys; chunk results are merged exactly through their log-sum-exp (as flash-decoding merges splits),
and backward recomputes each chunk's keys/values and feeds the *merged* output and log-sum-exp to the kernel's
backward, which is exactly the gradient of the full attention restricted to that chunk; the projection's backward
is written out (no autograd inside autograd), so the whole thing traces under torch.compile. Nothing of size O(n) is
kept except the input, which the caller holds anyway.

The per-chunk kernel on CUDA in half precision is PyTorch's FlashAttention-2 (unmasked) or cuDNN attention (with
the key-padding bias), both returning the log-sum-exp; an fp32 matmul/softmax elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention_backends import KeyPaddingMask, additive_key_bias, fused_kernels_fit
from .context_parallel import SequenceShard, merge_partials, sum_over_ranks
from .fused_norm import layer_norm


@dataclass
class CrossInput:
    """One cross-attention block's input: the tokens, the learned zero tokens prepended to them, and the mask over
    the concatenation. Built once per input and forward by the encoder; blocks that read the same input tensor share
    `norm_cache`, so the input's LayerNorm is computed once for all of them (see [`PerceiverCrossAttention`])."""

    tokens: Tensor
    mask: KeyPaddingMask | None = None
    prefix: Tensor | None = None
    norm_cache: dict = field(default_factory=dict, repr=False)
    shard: SequenceShard | None = None  # this rank's slice of a context-parallel sequence

    def segments(self) -> list[Tensor]:
        return [self.tokens] if self.prefix is None else [self.prefix, self.tokens]

    def normalized(self, eps: float) -> Tensor:
        """The affine-free LayerNorm of prefix + tokens, the tokens' part computed once per forward and shared.

        Kept in the autocast dtype when autocast is on: it is what the key/value projection consumes."""
        tokens = self.norm_cache.get(eps)
        if tokens is None:
            tokens = self.norm_cache[eps] = layer_norm(self.tokens, None, None, eps)
        if self.prefix is None:
            return tokens
        return torch.cat([layer_norm(self.prefix, None, None, eps), tokens], dim=1)

    def materialize(self) -> Tensor:
        return self.tokens if self.prefix is None else torch.cat([self.prefix, self.tokens], dim=1)


def fold_norm_affine(
    norm_weight: Tensor | None, norm_bias: Tensor | None, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """A LayerNorm affine folded into the Linear after it: `(x_hat*g + b) W^T + c = x_hat (W*g)^T + (W b + c)`.

    Exact; it lets the input be normalised once without affine, for every block that reads it, and chunks skip the
    per-chunk gamma/beta reductions in backward. With no norm (`norm_weight` None) the Linear is returned as is."""
    if norm_weight is None:
        return weight, bias
    folded_bias = torch.mv(weight, norm_bias) if bias is None else torch.addmv(bias, weight, norm_bias)
    return weight * norm_weight[None, :], folded_bias


# ---------------------------------------------------------------- per-chunk kernels: (out, lse) and its backward
# Layout here is (batch, heads, seq, head_dim); `bias` is an additive key bias (batch, 1, 1, kv_len) or None.


def _math_forward(q, k, v, bias, scale):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
    return out.to(q.dtype), lse, None


def _math_backward(dout, q, k, v, out, lse, bias, scale, aux):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    probs = torch.exp(scores - lse[..., None])
    dout = dout.float()
    dv = torch.matmul(probs.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.float().transpose(-1, -2))
    delta = (dout * out.float()).sum(-1, keepdim=True)
    ds = probs * (dp - delta) * scale
    return torch.matmul(ds, k.float()).to(q.dtype), torch.matmul(ds.transpose(-1, -2), q.float()).to(k.dtype), dv.to(v.dtype)


def _fused_forward(q, k, v, bias, scale, dropout=0.0):
    # Masked chunks: cuDNN (it takes the key bias); unmasked: FlashAttention-2. Both return the log-sum-exp, and
    # under dropout the RNG seed and offset that the backward replays the same mask from.
    if bias is None:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout, False, False, scale=scale)
        out, lse, meta = res[0], res[1], (res[2], res[3], res[4], res[5], res[6], res[7])
    else:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, dropout, False, False,
                                                                  scale=scale)
        out, lse, meta = res[0], res[1], (res[2], res[3], res[4], res[5], res[6], res[7])
    # aux: what the backward needs besides tensors we already hold (sequence metadata and RNG state).
    return out, lse.reshape(q.shape[:3]).float(), (lse.shape, *meta)


def _fused_backward(dout, q, k, v, out, lse, bias, scale, aux, dropout=0.0):
    lse_shape, cum_q, cum_k, max_q, max_k, seed, offset = aux
    lse = lse.reshape(lse_shape).contiguous()
    if bias is None:
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout, False, seed, offset, scale=scale
        )
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, dropout, False, scale=scale
    )


def _kernels(q: Tensor, spec: "_Spec"):
    # The fused kernels take one head width for queries/keys and values.
    if fused_kernels_fit(q) and spec.v_head_dim == spec.head_dim:
        return _fused_forward, _fused_backward
    return _math_forward, _math_backward


# ---------------------------------------------------------------- projections of one chunk


@dataclass
class _Spec:
    heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    chunk_size: int
    eps: float
    rotary: nn.Module | None
    group: object | None = None  # context parallelism: partials are merged over this process group
    key_offset: int = 0  # input tokens held by the ranks before this one (rotary positions are global)
    skip_prefix: bool = False  # context parallelism off the first rank: zero tokens carried, not attended


def _fold(ln_w, ln_b, kv_w, kv_b):
    """[`fold_norm_affine`] in fp32, as the chunks compute it (autocast off, under no_grad)."""
    as_float = [None if t is None else t.float() for t in (ln_w, ln_b, kv_w, kv_b)]
    return fold_norm_affine(*as_float)


def _unfold_grads(d_weight, d_bias, ln_w, ln_b, kv_w, kv_b):
    """Gradients of the folded weight/bias back to `[ln_w, ln_b, kv_w, kv_b]` (chain rule through `_fold`)."""
    if ln_w is None:
        return [None, None, d_weight, d_bias]
    d_kv_w = d_weight * ln_w.float()[None, :] + torch.outer(d_bias, ln_b.float())
    d_ln_w = (d_weight * kv_w.float()).sum(0)
    d_ln_b = torch.mv(kv_w.float().t(), d_bias)
    return [d_ln_w, d_ln_b, d_kv_w, None if kv_b is None else d_bias]


def _project(x, weight, bias, spec: _Spec, start: int, dtype, normalize: bool, keep_stats: bool = False):
    """One chunk of raw input -> `(k, v)` (batch, heads, len, head_dim) as strided views, the projection's input and
    the LayerNorm statistics (with `keep_stats`): affine-free LayerNorm (fp32) -> folded Linear (in `dtype`) ->
    rotary on the keys."""
    x = x.float()
    stats = None
    if normalize:
        if keep_stats:
            x, mean, rstd = torch.ops.aten.native_layer_norm(x, [x.shape[-1]], None, None, spec.eps)
            stats = (mean, rstd)
        else:
            x = F.layer_norm(x, (x.shape[-1],), None, None, spec.eps)
    x_in = x.to(dtype)
    kv = F.linear(x_in, weight.to(dtype), None if bias is None else bias.to(dtype))
    k, v = kv.split([spec.heads * spec.head_dim, spec.heads * spec.v_head_dim], dim=-1)
    k, v = k.unflatten(-1, (spec.heads, spec.head_dim)), v.unflatten(-1, (spec.heads, spec.v_head_dim))
    if spec.rotary is not None:
        k = spec.rotary.rotate(k, offset=start)
    return k.transpose(1, 2), v.transpose(1, 2), x_in, stats


def _project_backward(dk, dv, x, x_in, stats, weight, spec: _Spec, start: int, grads: list, need_input: bool):
    """Backward of `_project` written out (no autograd inside autograd, so torch.compile traces it): accumulates the
    folded weight/bias gradients into `grads` (fp32) and returns d input (or None when not needed)."""
    dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)  # (batch, len, heads, head_dim)
    if spec.rotary is not None:
        dk = spec.rotary.rotate(dk, offset=start, inverse=True)  # a rotation's transpose is its inverse
    dkv = torch.cat([dk.flatten(-2), dv.flatten(-2)], dim=-1).to(x_in.dtype)  # (batch, len, kv_proj outputs)
    grads[0] += torch.matmul(dkv.flatten(0, 1).transpose(0, 1), x_in.flatten(0, 1)).float()
    if grads[1] is not None:
        grads[1] += torch.sum(dkv, dim=(0, 1), dtype=torch.float32)
    if not need_input:
        return None
    d_x = torch.matmul(dkv, weight.to(dkv.dtype)).float()
    if stats is None:
        return d_x
    mean, rstd = stats
    d_input, _, _ = torch.ops.aten.native_layer_norm_backward(
        d_x, x.float(), [x.shape[-1]], mean, rstd, None, None, [True, False, False]
    )
    return d_input


def _chunks(segments: list[Tensor], size: int, skip_first: bool = False):
    """(segment index, start in segment, end in segment, start in the concatenation) covering the concatenated
    segments (all but the first with `skip_first`)."""
    offset = 0
    for i, seg in enumerate(segments):
        n = seg.shape[1]
        if not (skip_first and i == 0):
            for s in range(0, n, size):
                yield i, s, min(s + size, n), offset + s
        offset += n


def _bias(mask: KeyPaddingMask | None, start: int, end: int, dtype) -> Tensor | None:
    if mask is None:
        return None
    return additive_key_bias(mask.mask[:, start:end], dtype)


class _ChunkedCrossAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, ln_w, ln_b, kv_w, kv_b, spec: _Spec, mask, *segments):
        fwd, _ = _kernels(q, spec)
        dtype = q.dtype
        qt = q.transpose(1, 2).contiguous()
        out = lse = None
        auxes = []
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            weight, bias = _fold(ln_w, ln_b, kv_w, kv_b)
            for i, s, e, g in _chunks(list(segments), spec.chunk_size, spec.skip_prefix):
                k, v, _, _ = _project(
                    segments[i][:, s:e], weight, bias, spec, spec.key_offset + g, dtype, ln_w is not None
                )
                o_c, lse_c, aux = fwd(qt, k, v, _bias(mask, g, g + e - s, dtype), spec.scale)
                auxes.append(aux)
                if out is None:
                    out, lse = o_c.float(), lse_c
                else:
                    new = torch.logaddexp(lse, lse_c)
                    out = out * torch.exp(lse - new)[..., None] + o_c.float() * torch.exp(lse_c - new)[..., None]
                    lse = new
            if spec.group is not None:
                if out is None:  # an empty slice: no partial of its own, weight exp(-inf) = 0 in the merge
                    out = qt.new_zeros((*qt.shape[:3], spec.v_head_dim), dtype=torch.float32)
                    lse = qt.new_full(qt.shape[:3], float("-inf"), dtype=torch.float32)
                out, lse = merge_partials(out, lse, spec.group)
            out = out.to(dtype)
        ctx.spec, ctx.mask, ctx.auxes, ctx.num_segments = spec, mask, auxes, len(segments)
        ctx.save_for_backward(qt, out, lse, ln_w, ln_b, kv_w, kv_b, *segments)
        return out.transpose(1, 2)

    @staticmethod
    def backward(ctx, dout):
        qt, out, lse, ln_w, ln_b, kv_w, kv_b, *segments = ctx.saved_tensors
        spec, mask = ctx.spec, ctx.mask
        _, bwd = _kernels(qt, spec)
        dtype = qt.dtype
        dout_t = dout.transpose(1, 2).to(dtype).contiguous()
        dq = torch.zeros_like(qt, dtype=torch.float32)
        params = [ln_w, ln_b, kv_w, kv_b]
        seg_needs = ctx.needs_input_grad[7:]
        seg_grads = [torch.zeros_like(seg) if need else None for seg, need in zip(segments, seg_needs)]
        normalize = ln_w is not None
        with torch.no_grad(), torch.autocast(qt.device.type, enabled=False):
            weight, bias = _fold(ln_w, ln_b, kv_w, kv_b)
            grads = [torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias)]
            for (i, s, e, g), aux in zip(_chunks(segments, spec.chunk_size, spec.skip_prefix), ctx.auxes):
                x = segments[i][:, s:e]
                # LayerNorm statistics only when the input needs a gradient: the affine lives in `weight`.
                k, v, x_in, stats = _project(
                    x, weight, bias, spec, spec.key_offset + g, dtype, normalize, keep_stats=seg_needs[i]
                )
                dq_c, dk, dv = bwd(dout_t, qt, k, v, out, lse, _bias(mask, g, g + e - s, dtype), spec.scale, aux)
                dq += dq_c.float()
                d_x = _project_backward(
                    dk, dv, x, x_in, stats, weight, spec, spec.key_offset + g, grads, seg_needs[i]
                )
                if seg_needs[i]:
                    seg_grads[i][:, s:e] = d_x.to(seg_grads[i].dtype)
            grads = _unfold_grads(*grads, ln_w, ln_b, kv_w, kv_b)
            if spec.group is not None:
                # Every rank's keys contributed to the query and to the input-side parameters: sum them, so that
                # each rank holds the complete gradients (the input's gradient is its own slice's).
                sum_over_ranks([dq, *grads], spec.group)
                if len(segments) == 2:  # the zero tokens, attended on the first rank only
                    sum_over_ranks([seg_grads[0]], spec.group)
        grads = [None if gr is None else gr.to(p.dtype) for gr, p in zip(grads, params)]
        return (dq.to(dtype).transpose(1, 2), *grads, None, None, *seg_grads)


def chunked_cross_attention(
    query: Tensor,
    context: CrossInput,
    norm: nn.LayerNorm | None,
    kv_proj: nn.Linear,
    *,
    heads: int,
    head_dim: int,
    scale: float,
    chunk_size: int,
    rotary: nn.Module | None = None,
    v_head_dim: int | None = None,
) -> Tensor:
    """Cross-attention of `query (batch, q_len, heads, head_dim)` over `context`, whose keys/values are
    `kv_proj(norm(context))` (+ rotary), computed chunk by chunk and recomputed in backward. A context-parallel
    `context` (`context.shard`) is this rank's slice: the ranks' partials are merged (see context_parallel.py).

    Returns the attention output `(batch, q_len, heads, v_head_dim)` (zero for samples without valid keys)."""
    # `chunk_size` counts token rows across the batch: the transient memory of a chunk is what it bounds.
    keys_per_chunk = max(1, chunk_size // query.shape[0])
    shard = context.shard
    spec = _Spec(
        heads, head_dim, head_dim if v_head_dim is None else v_head_dim, scale, keys_per_chunk, norm.eps if norm is not None else 0.0, rotary,
        group=None if shard is None else shard.group, key_offset=0 if shard is None else shard.key_offset,
        skip_prefix=shard is not None and not shard.is_first and context.prefix is not None,
    )
    out = _ChunkedCrossAttention.apply(
        query,
        None if norm is None else norm.weight,
        None if norm is None else norm.bias,
        kv_proj.weight,
        kv_proj.bias,
        spec,
        context.mask,
        *context.segments(),
    )
    return out if context.mask is None else context.mask.zero_empty_rows(out)

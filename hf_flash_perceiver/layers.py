"""Building blocks: rotary embedding, MLP, attention and the one configurable Perceiver block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import KeyPaddingMask, attention
from .configuration_perceiver import PerceiverConfig
from .cross_attention import CrossInput, chunked_cross_attention


class PerceiverRotaryEmbedding(nn.Module):
    """Rotary position embedding on the first `dim` channels of each head (rotate-half layout).

    `inv_freq` is a non-persistent buffer: it is not in checkpoints and is rebuilt by `_init_weights` after
    `from_pretrained` (which builds models on the meta device).
    """

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> Tensor:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim
        return 1.0 / (self.base**exponent)

    def forward(self, seq_len: int, device: torch.device, offset: int = 0) -> tuple[Tensor, Tensor]:
        """`(cos, sin)` of shape `(seq_len, dim)` for positions `offset .. offset + seq_len - 1`."""
        positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device))
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def rotate(self, x: Tensor, offset: int = 0, inverse: bool = False) -> Tensor:
        """Rotate `x (batch, seq, heads, head_dim)` whose first token sits at position `offset` (by the opposite
        angles with `inverse`: the transpose of the rotation, as a backward pass needs)."""
        cos, sin = self(x.shape[1], x.device, offset)
        return apply_rotary(x, cos, -sin if inverse else sin)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first `cos.shape[-1]` channels of `x (batch, seq, heads, head_dim)`; the rest pass through."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot.float().chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    rotated = x_rot.float() * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)


_GATE_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid}


class PerceiverMLP(nn.Module):
    """GELU MLP, or a gated MLP (`fc1` emits value and gate halves: `fc2(value * act(gate))`)."""

    def __init__(self, config: PerceiverConfig, dim: int):
        super().__init__()
        hidden = config.mlp_hidden_size or int(round(dim * config.mlp_ratio))
        self.gated = config.gated_mlp
        self.gate_activation = _GATE_ACTIVATIONS[config.mlp_gate_activation]
        self.fc1 = nn.Linear(dim, 2 * hidden if self.gated else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        if self.gated:
            value, gate = h.chunk(2, dim=-1)
            h = value * self.gate_activation(gate)
        else:
            h = F.gelu(h)
        return self.fc2(h)


class PerceiverAttention(nn.Module):
    """Multi-head attention; cross-attention when `kv_dim` is given (separate `q_proj`/`kv_proj`), self-attention
    otherwise (one fused `qkv_proj`)."""

    def __init__(
        self,
        config: PerceiverConfig,
        dim: int,
        num_heads: int,
        head_dim: int,
        rotary_dim: int = 0,
        dropout: float = 0.0,
        kv_dim: int | None = None,
        qkv_bias: bool = False,
        chunked: bool = False,
    ):
        super().__init__()
        self.config = config
        # Chunked, recomputed cross-attention (`config.cross_attention_checkpointing`): only the encoder's
        # cross-attention over the inputs, whose length is the point; decoders attend to the few latents.
        self.chunked = chunked
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.is_cross_attention = kv_dim is not None
        inner = num_heads * head_dim
        if self.is_cross_attention:
            self.q_proj = nn.Linear(dim, inner, bias=qkv_bias)
            self.kv_proj = nn.Linear(kv_dim, 2 * inner, bias=qkv_bias)
        else:
            self.qkv_proj = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.o_proj = nn.Linear(inner, dim)
        self.rotary = PerceiverRotaryEmbedding(rotary_dim, config.rotary_base) if rotary_dim else None

    def _project_context(self, context: CrossInput, norm: nn.LayerNorm | None) -> Tensor:
        tokens = context.materialize()
        if not context.normalized:
            return self.kv_proj(norm(tokens) if norm is not None else tokens)
        # The encoder normalised the input once for every block that reads it (LayerNorm without affine); this
        # block's LayerNorm affine is folded into its projection: (x*g + b) W^T + c = x (W*g)^T + (W b + c).
        # Exact, and it saves a full-input LayerNorm, its backward and a half-precision copy per block.
        weight = self.kv_proj.weight * norm.weight[None, :]
        bias = torch.mv(self.kv_proj.weight, norm.bias)
        if self.kv_proj.bias is not None:
            bias = bias + self.kv_proj.bias
        return F.linear(tokens, weight, bias)

    def _heads(self, x: Tensor, parts: int) -> tuple[Tensor, ...]:
        return x.unflatten(-1, (parts, self.num_heads, self.head_dim)).unbind(dim=-3)

    def forward(
        self,
        hidden_states: Tensor,
        context: CrossInput | None = None,
        context_norm: nn.LayerNorm | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if self.is_cross_attention:
            (query,) = self._heads(self.q_proj(hidden_states), 1)
            if self.rotary is not None:
                query = self.rotary.rotate(query)
            if self.chunked and not output_attentions:
                # Long inputs: keys/values chunk by chunk, recomputed in backward (see cross_attention.py).
                out = chunked_cross_attention(
                    query, context, context_norm, self.kv_proj, heads=self.num_heads, head_dim=self.head_dim,
                    scale=self.head_dim**-0.5, chunk_size=self.config.cross_attention_chunk_size, rotary=self.rotary,
                )
                return self.o_proj(out.flatten(-2)), None
            key, value = self._heads(self._project_context(context, context_norm), 2)
            if self.rotary is not None:
                # Keys carry their own positions (token index), queries theirs (latent index).
                key = self.rotary.rotate(key)
            mask = context.mask
        else:
            query, key, value = self._heads(self.qkv_proj(hidden_states), 3)
            if self.rotary is not None:
                cos, sin = self.rotary(query.shape[1], query.device)
                query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
            mask = None
        out, weights = attention(
            query,
            key,
            value,
            mask,
            implementation=self.config._attn_implementation or "sdpa",
            dropout=self.dropout if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return self.o_proj(out.flatten(-2)), weights


class PerceiverBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm attention block, cross- or self-attention: `x + Attn(LN(x) [, LN(context)])`, then
    `x + MLP(LN(x))` (or the MLP branch alone when `config.mlp_residual` is off, as in flash-perceiver 0.2.0)."""

    def __init__(
        self,
        config: PerceiverConfig,
        dim: int,
        num_heads: int,
        head_dim: int,
        rotary_dim: int = 0,
        dropout: float = 0.0,
        kv_dim: int | None = None,
        qkv_bias: bool = False,
        chunked: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        is_cross = kv_dim is not None
        self.context_norm = (
            nn.LayerNorm(kv_dim, eps=config.layer_norm_eps) if is_cross and config.cross_input_norm else None
        )
        self.attn = PerceiverAttention(config, dim, num_heads, head_dim, rotary_dim, dropout, kv_dim, qkv_bias, chunked)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = PerceiverMLP(config, dim)
        self.mlp_residual = config.mlp_residual

    def forward(
        self,
        hidden_states: Tensor,
        context: CrossInput | Tensor | None = None,
        key_padding_mask: KeyPaddingMask | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """`context`: the cross-attention input (a [`CrossInput`], or a tensor with an optional `key_padding_mask`);
        None for self-attention. Returns `(hidden_states, attention weights or None)`."""
        if isinstance(context, Tensor):
            context = CrossInput(context, key_padding_mask)
        attn_out, weights = self.attn(self.norm1(hidden_states), context, self.context_norm, output_attentions)
        hidden_states = hidden_states + attn_out
        mlp_out = self.mlp(self.norm2(hidden_states))
        return (hidden_states + mlp_out if self.mlp_residual else mlp_out), weights


def cross_attention_block(config: PerceiverConfig, input_dim: int) -> PerceiverBlock:
    return PerceiverBlock(
        config, config.latent_dim, config.cross_heads, config.cross_head_dim, config.cross_rotary_emb_dim,
        config.cross_attn_dropout, kv_dim=input_dim, qkv_bias=config.cross_qkv_bias,
        chunked=config.cross_attention_checkpointing,
    )


def self_attention_block(config: PerceiverConfig) -> PerceiverBlock:
    return PerceiverBlock(
        config, config.latent_dim, config.latent_heads, config.latent_head_dim, config.latent_rotary_emb_dim,
        config.latent_attn_dropout, qkv_bias=config.latent_qkv_bias,
    )


def decoder_block(config: PerceiverConfig) -> PerceiverBlock:
    return PerceiverBlock(
        config, config.decoder_query_dim, config.query_heads, config.query_head_dim, config.query_rotary_emb_dim,
        config.query_attn_dropout, kv_dim=config.latent_dim, qkv_bias=config.cross_qkv_bias,
    )


def drop_tokens(x: Tensor, p: float) -> Tensor:
    """Keep a random `floor((1 - p) * n)` of the `n` tokens of every sample, in their original order."""
    batch, n = x.shape[:2]
    keep = int((1 - p) * n)
    scores = torch.rand(batch, n, device=x.device)
    indices = scores.topk(keep, dim=1).indices.sort(dim=1).values
    return x.gather(1, indices[..., None].expand(-1, -1, x.shape[-1]))

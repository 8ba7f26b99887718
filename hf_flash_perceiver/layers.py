"""Building blocks: rotary embedding, MLP, the attention layers (one spec per role) and the one configurable block."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_backends import KeyPaddingMask, attention, is_wide_head
from .configuration_perceiver import PerceiverConfig
from .cross_attention import CrossInput, chunked_cross_attention, fold_norm_affine
from .fused_activation import gated_activation
from .fused_block import (
    cross_attention_branch,
    cross_attention_fits,
    cross_input_fits,
    fused_dtype,
    mlp_branch,
    mlp_fits,
    self_attention_branch,
    self_attention_fits,
)
from .fused_norm import FusedLayerNorm
from .fused_softmax import shared_key_value_attention
from .weight_cast import BackwardCopies, cast_projections, converted, converted_once, plain, project, unshared


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


class PerceiverMLP(nn.Module):
    """GELU MLP, or a gated MLP (`fc1` emits value and gate halves: `fc2(value * act(gate))`).

    Hidden width: `ratio * dim` when the block's role has its own ratio (`cross_mlp_ratio`, `query_mlp_ratio`), else
    `config.mlp_hidden_size`, else `config.mlp_ratio * dim`.
    """

    def __init__(self, config: PerceiverConfig, dim: int, ratio: float | None = None):
        super().__init__()
        if ratio is not None:
            hidden = int(round(dim * ratio))
        else:
            hidden = config.mlp_hidden_size or int(round(dim * config.mlp_ratio))
        self.gated = config.gated_mlp
        self.gate_activation_name = config.mlp_gate_activation
        self.fc1 = nn.Linear(dim, 2 * hidden if self.gated else hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = project(self.fc1, x)
        h = gated_activation(h, self.gate_activation_name) if self.gated else F.gelu(h)
        return project(self.fc2, h)


@dataclass(frozen=True)
class AttentionSpec:
    """Everything one attention layer needs, for one role: the cross-attention over the inputs, the latent
    self-attention, or the decoder's query cross-attention. Derived from the (flat) config by the constructors below,
    so that modules take one spec instead of a row of positional arguments.

    Attributes:
        dim: width of the attending stream (latents, or decoder queries).
        heads, head_dim: attention heads and their query/key width.
        v_head_dim: value width per head (`head_dim` when None).
        rotary_dim: rotary channels per head (0: none).
        dropout: attention-probability dropout.
        qkv_bias: bias on the query/key/value projections.
        kv_dim: width of what is attended to (cross-attention); `None` for self-attention.
        input_norm: LayerNorm the attended input before its key/value projection (cross-attention).
        chunked: compute the input side chunk by chunk and recompute it in backward (long inputs).
        residual: add the attention output to the attending stream (off: the block continues from the attention
            output alone, as a Perceiver IO decoder whose queries are positions and outputs are values).
        mlp_ratio: the MLP width multiple of this role (None: the config's shared `mlp_hidden_size` / `mlp_ratio`).
    """

    dim: int
    heads: int
    head_dim: int
    v_head_dim: int | None = None
    rotary_dim: int = 0
    dropout: float = 0.0
    qkv_bias: bool = False
    kv_dim: int | None = None
    input_norm: bool = False
    chunked: bool = False
    residual: bool = True
    mlp_ratio: float | None = None

    @property
    def is_cross_attention(self) -> bool:
        return self.kv_dim is not None

    @property
    def value_dim(self) -> int:
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    @classmethod
    def cross(cls, config: PerceiverConfig, input_dim: int) -> AttentionSpec:
        """The encoder's cross-attention from the latents to one input of width `input_dim`."""
        return cls(
            dim=config.latent_dim, heads=config.cross_heads, head_dim=config.cross_head_dim,
            rotary_dim=config.cross_rotary_emb_dim, dropout=config.cross_attn_dropout, qkv_bias=config.cross_qkv_bias,
            kv_dim=input_dim, input_norm=config.cross_input_norm, chunked=config.cross_attention_checkpointing,
            v_head_dim=config.cross_v_head_dim, residual=config.cross_query_residual, mlp_ratio=config.cross_mlp_ratio,
        )

    @classmethod
    def latent(cls, config: PerceiverConfig) -> AttentionSpec:
        """The latent self-attention."""
        return cls(
            dim=config.latent_dim, heads=config.latent_heads, head_dim=config.latent_head_dim,
            rotary_dim=config.latent_rotary_emb_dim, dropout=config.latent_attn_dropout, qkv_bias=config.latent_qkv_bias,
            v_head_dim=config.latent_v_head_dim,
        )

    @classmethod
    def query(cls, config: PerceiverConfig, dim: int | None = None, rotary: bool = True) -> AttentionSpec:
        """Queries cross-attending to the latents: the Perceiver IO decoder (`dim` = the query width), or the
        classification head's learned pooling query (`dim` = latent width, no rotary)."""
        return cls(
            dim=config.decoder_query_dim if dim is None else dim, heads=config.query_heads,
            head_dim=config.query_head_dim, rotary_dim=config.query_rotary_emb_dim if rotary else 0,
            dropout=config.query_attn_dropout, qkv_bias=config.cross_qkv_bias, kv_dim=config.latent_dim,
            input_norm=config.cross_input_norm, v_head_dim=config.query_v_head_dim, residual=config.query_residual,
            mlp_ratio=config.query_mlp_ratio,
        )


class PerceiverAttention(nn.Module):
    """Base of the attention layers: heads, output projection, rotary and the call into the backend dispatch.

    `forward` returns `(output, attention weights or None)`; the weights are computed only when asked for
    (`output_attentions`), by the eager reference for that call, whatever backend the model uses."""

    def __init__(self, config: PerceiverConfig, spec: AttentionSpec):
        super().__init__()
        self.config = config
        self.spec = spec
        self.num_heads = spec.heads
        self.head_dim = spec.head_dim
        self.v_head_dim = spec.value_dim
        self.o_proj = nn.Linear(spec.heads * self.v_head_dim, spec.dim)
        self.rotary = PerceiverRotaryEmbedding(spec.rotary_dim, config.rotary_base) if spec.rotary_dim else None

    def _heads(self, x: Tensor, *widths: int) -> tuple[Tensor, ...]:
        """Split a fused projection `(..., heads * sum(widths))` into `(..., heads, width)` views, one per width."""
        if len(set(widths)) == 1:
            return x.unflatten(-1, (len(widths), self.num_heads, widths[0])).unbind(dim=-3)
        parts = x.split([self.num_heads * w for w in widths], dim=-1)
        return tuple(part.unflatten(-1, (self.num_heads, w)) for part, w in zip(parts, widths))

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, mask: KeyPaddingMask | None,
                output_attentions: bool) -> tuple[Tensor, Tensor | None]:
        out, weights = attention(
            query, key, value, mask,
            implementation=self.config._attn_implementation or "sdpa",
            dropout=self.spec.dropout if self.training else 0.0,
            output_attentions=output_attentions,
        )
        return project(self.o_proj, out.flatten(-2)), weights

    def projections(self) -> list[nn.Linear]:
        """The projections of the latent or query stream, which [`PerceiverBlock`] converts together under autocast
        (weight_cast.py); the input side's key/value projection is folded or chunked, and converted where it is."""
        return [self.o_proj]


class PerceiverSelfAttention(PerceiverAttention):
    """Self-attention of the latents: one fused `qkv_proj`; rotary on queries and keys by latent index."""

    def __init__(self, config: PerceiverConfig, spec: AttentionSpec):
        super().__init__(config, spec)
        self.qkv_proj = nn.Linear(spec.dim, spec.heads * (2 * spec.head_dim + self.v_head_dim), bias=spec.qkv_bias)

    def projections(self) -> list[nn.Linear]:
        return [self.qkv_proj, self.o_proj]

    def forward(self, hidden_states: Tensor, output_attentions: bool = False, **kwargs) -> tuple[Tensor, Tensor | None]:
        d = self.head_dim
        query, key, value = self._heads(project(self.qkv_proj, hidden_states), d, d, self.v_head_dim)
        if self.rotary is not None:
            cos, sin = self.rotary(query.shape[1], query.device)
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        return self._attend(query, key, value, None, output_attentions)


class PerceiverCrossAttention(PerceiverAttention):
    """Cross-attention to an input (a [`CrossInput`]), and the one owner of the input side: the input LayerNorm, the
    key/value projection, the fold of the norm's affine into that projection, and the choice between the regular
    path and the chunked, recomputed one (`spec.chunked`).

    The input is normalised without affine once per forward for every block that reads it (`CrossInput.normalized`);
    this layer folds its LayerNorm's gamma/beta into `kv_proj` (`fold_norm_affine`), exactly, so no per-block
    normalised copy of a long input is made. The chunked path folds with the same function, per call.

    The LayerNorm's parameters are held by the enclosing block as `context_norm` (where checkpoints have always
    stored them); the block passes that module to every call (`input_norm`), and this layer is the only code that
    applies it. Passed, not kept: a kept reference would outlive the module the block holds at call time (the
    replica of `nn.DataParallel`, the trained copy of PEFT's `modules_to_save`). A norm other than a plain
    `nn.LayerNorm` is applied as the module it is, not folded.
    """

    def __init__(self, config: PerceiverConfig, spec: AttentionSpec):
        super().__init__(config, spec)
        self.q_proj = nn.Linear(spec.dim, spec.heads * spec.head_dim, bias=spec.qkv_bias)
        self.kv_proj = nn.Linear(spec.kv_dim, spec.heads * (spec.head_dim + self.v_head_dim), bias=spec.qkv_bias)

    def projections(self) -> list[nn.Linear]:
        return [self.q_proj, self.o_proj]

    def prepare(self, context: CrossInput, input_norm: nn.Module | None) -> None:
        """Fill `context`'s shared LayerNorm cache before any block runs. Blocks may be recomputed under activation
        checkpointing; computing the cache inside one would make its forward and its recompute differ."""
        if plain(input_norm, nn.LayerNorm) and not self.spec.chunked and context.shard is None:
            context.normalized(input_norm.eps)

    def plain_kv_proj(self) -> bool:
        """Whether `kv_proj` is a plain `nn.Linear` without hooks, so that computing with its weight and bias is
        calling it. The input norm's fold, the absorbed projection and the chunked path take its weight; a wrapped
        or hooked projection (a PEFT LoRA layer) is called as a module instead, or refused where it cannot be."""
        return plain(self.kv_proj, nn.Linear)

    def folds(self, norm: nn.Module | None) -> bool:
        """Whether the input side can compute with the weights of `kv_proj` and of `norm` (None: no input norm)
        rather than call them: both plain modules (see [`plain_kv_proj`])."""
        return self.plain_kv_proj() and (norm is None or plain(norm, nn.LayerNorm))

    def kv_weights(self, norm: nn.LayerNorm | None) -> tuple[Tensor, Tensor | None]:
        """`kv_proj`'s weight and bias with the input norm's affine folded in ([`fold_norm_affine`]) for a plain
        `kv_proj`, folded with autocast off: as converted by the block (weight_cast.py, keyed by this layer; see
        [`input_projection`]) when it converted them, else computed here."""
        cast = converted(self)
        if cast is not None:
            return cast
        kv = self.kv_proj
        # In the parameters' precision whatever the block converts: a block under activation checkpointing converts
        # nothing, and its values must be those of the same block without it.
        with torch.autocast(kv.weight.device.type, enabled=False):
            return fold_norm_affine(None if norm is None else norm.weight, None if norm is None else norm.bias,
                                    kv.weight, kv.bias)

    def input_projection(
        self, context: CrossInput, norm: nn.Module | None
    ) -> dict[Hashable, Callable[[], tuple[Tensor, Tensor | None]]]:
        """For the enclosing block's conversion of its projections ([`cast_projections`]`(computed=...)`): how to
        compute [`kv_weights`] for a call over `context`, where that call uses them (not on the chunked or
        context-parallel paths, which fold per call)."""
        if not self.folds(norm) or self.spec.chunked or context.shard is not None:
            return {}
        kv = self.kv_proj
        if norm is None:
            return {self: lambda: (kv.weight, kv.bias)}
        return {self: lambda: fold_norm_affine(norm.weight, norm.bias, kv.weight, kv.bias)}

    def project_context(self, context: CrossInput, norm: nn.Module | None) -> tuple[Tensor, Tensor]:
        """Keys and values `(batch, kv_len, heads, head_dim)` of the whole input (the regular path), `norm` being
        the input LayerNorm (None: none)."""
        if self.folds(norm):
            x = context.materialize() if norm is None else context.normalized(norm.eps)
            kv = F.linear(x, *self.kv_weights(norm))
        elif plain(norm, nn.LayerNorm):
            kv = self.kv_proj(context.normalized(norm.eps) * norm.weight + norm.bias)
        else:
            x = context.materialize()
            kv = self.kv_proj(x if norm is None else norm(x))
        key, value = self._heads(kv, self.head_dim, self.v_head_dim)
        if self.rotary is not None:
            # Keys carry their own positions (token index), queries theirs (latent index).
            key = self.rotary.rotate(key)
        return key, value

    def absorbs_projection(
        self, query: Tensor, context: CrossInput, norm: nn.Module | None, output_attentions: bool
    ) -> bool:
        """Whether this call attends to the input itself, with the key/value projection moved onto the queries and
        the output ([`absorbed_attention`]): for the wide heads that no fused kernel takes (attention then runs as
        GEMMs over the materialised scores either way) when it needs fewer FLOPs than projecting every input token,
        which is the case for transformers' pretrained single-head cross-attentions (qk width >= input width). Not
        with rotary keys (positions enter the keys), attention maps, or the chunked / context-parallel paths."""
        if output_attentions or self.rotary is not None or self.spec.chunked or context.shard is not None:
            return False
        if (self.config._attn_implementation or "sdpa") == "eager" or not self.folds(norm):
            return False
        width = self.spec.kv_dim
        if not is_wide_head(query, self.v_head_dim):
            return False
        heads, dk, dv, n_q = self.num_heads, self.head_dim, self.v_head_dim, query.shape[1]
        n_kv = context.tokens.shape[1]
        absorbed = 2 * heads * n_q * n_kv * width + heads * n_q * width * (dk + dv)
        projected = n_kv * width * heads * (dk + dv) + heads * n_q * n_kv * (dk + dv)
        return absorbed < projected

    def absorbed_attention(self, query: Tensor, context: CrossInput, norm: nn.LayerNorm | None) -> Tensor:
        r"""Attention over the (normalised) input tokens `x` with the key/value projection absorbed:
        `q . (W_k x + b_k) = (W_k^T q) . x + q . b_k`, and the last term is constant over keys, so it cancels in the
        softmax; `sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v sum_j p_j`. Exact in real arithmetic; no key
        or value tensor of the input's length is ever made. Heads share `x`: they are stacked as rows of one GEMM.

        Returns `(batch, q_len, heads, v_head_dim)`."""
        x = context.materialize() if norm is None else context.normalized(norm.eps)
        weight, bias = self.kv_weights(norm)
        batch, n_q, heads, dk = query.shape
        dv, width = self.v_head_dim, weight.shape[1]
        w_k, w_v = weight.split([heads * dk, heads * dv])
        q = torch.matmul(query.transpose(1, 2) * dk**-0.5, w_k.view(heads, dk, width))  # (batch, heads, n_q, width)
        mask = context.mask
        dropout = self.spec.dropout if self.training else 0.0
        # The probabilities sum to 1 per row, except under dropout, where the value bias takes their sums.
        mixed, sums = shared_key_value_attention(
            q.reshape(batch, heads * n_q, width), x, None if mask is None else mask.mask, dropout,
            row_sums=bias is not None and dropout > 0,
        )
        mixed = mixed.view(batch, heads, n_q, width)
        out = torch.matmul(mixed, w_v.view(heads, dv, width).transpose(1, 2))  # (batch, heads, n_q, dv)
        if bias is not None:
            b_v = bias[heads * dk:].view(heads, 1, dv).to(out.dtype)
            out = out + (b_v if sums is None else b_v * sums.view(batch, heads, n_q, 1).to(out.dtype))
        out = out.transpose(1, 2)
        return out if mask is None else mask.zero_empty_rows(out)

    def forward(
        self, hidden_states: Tensor, context: CrossInput, input_norm: nn.Module | None = None,
        output_attentions: bool = False, **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        (query,) = self._heads(project(self.q_proj, hidden_states), self.head_dim)
        if self.rotary is not None:
            query = self.rotary.rotate(query)
        if context.shard is not None and output_attentions:
            raise ValueError(
                "output_attentions is not available under context_parallel(): no rank holds the whole attention map."
            )
        if context.shard is not None and self.training and self.spec.dropout > 0:
            raise ValueError(
                f"context_parallel() has no attention dropout, but cross_attn_dropout={self.spec.dropout}: set it to 0."
            )
        if self.absorbs_projection(query, context, input_norm, output_attentions):
            return project(self.o_proj, self.absorbed_attention(query, context, input_norm).flatten(-2)), None
        if (self.spec.chunked or context.shard is not None) and not output_attentions:
            if not self.folds(input_norm):
                wrapped = "kv_proj" if not self.plain_kv_proj() else "context_norm"
                module = self.kv_proj if wrapped == "kv_proj" else input_norm
                raise ValueError(
                    "cross_attention_checkpointing and context_parallel() compute the keys and values from the "
                    f"weights of kv_proj and context_norm, but {wrapped} is a {type(module).__name__} (a wrapped or "
                    "hooked module, such as a PEFT LoRA layer or modules_to_save copy), which they would bypass: "
                    f"leave {wrapped} out of the adapter's modules, or turn cross_attention_checkpointing off."
                )
            # Long inputs: keys/values chunk by chunk, recomputed in backward, and under context parallelism merged
            # over the ranks (see cross_attention.py).
            out = chunked_cross_attention(
                query, context, input_norm, self.kv_proj, heads=self.num_heads, head_dim=self.head_dim,
                v_head_dim=self.v_head_dim, scale=self.head_dim**-0.5, chunk_size=self.config.cross_attention_chunk_size, rotary=self.rotary,
            )
            return project(self.o_proj, out.flatten(-2)), None
        key, value = self.project_context(context, input_norm)
        return self._attend(query, key, value, context.mask, output_attentions)


class PerceiverBlock(GradientCheckpointingLayer):
    """The one configurable block: pre-LayerNorm attention, `x + Attn(LN(x) [, context])` (`Attn(...)` alone when
    `spec.residual` is off), then `x + MLP(LN(x))` (or the MLP branch alone when `config.mlp_residual` is off, as in
    flash-perceiver 0.2.0). Cross- or self-attention by `spec`."""

    def __init__(self, config: PerceiverConfig, spec: AttentionSpec):
        super().__init__()
        # The norms feeding the projections: Triton kernels on CUDA over large activations (fused_norm.py).
        self.norm1 = FusedLayerNorm(spec.dim, eps=config.layer_norm_eps)
        if spec.is_cross_attention:
            self.context_norm = nn.LayerNorm(spec.kv_dim, eps=config.layer_norm_eps) if spec.input_norm else None
            self.attn = PerceiverCrossAttention(config, spec)
        else:
            self.context_norm = None
            self.attn = PerceiverSelfAttention(config, spec)
        self.norm2 = FusedLayerNorm(spec.dim, eps=config.layer_norm_eps)
        self.mlp = PerceiverMLP(config, spec.dim, spec.mlp_ratio)
        self.attn_residual = spec.residual
        self.mlp_residual = config.mlp_residual

    def prepare(self, context: CrossInput) -> None:
        """Before any block runs: fill `context`'s shared input-norm cache for this cross-attention block."""
        self.attn.prepare(context, self.context_norm)

    def _fused_paths(self, hidden_states: Tensor, context: CrossInput | None,
                     kwargs: dict) -> tuple[torch.dtype | None, bool, bool]:
        # On CUDA in half precision each residual branch may run as one fused autograd node (fused_block.py):
        # (its dtype or None, whether the attention branch does, whether the MLP branch does). A cross-attention
        # block asked without its input (`context` None) answers for the inputs that fit.
        fused = fused_dtype(hidden_states)
        output_attentions = kwargs.get("output_attentions", False)
        if fused is None:
            fuse_attn = False
        elif self.attn.spec.is_cross_attention:
            fuse_attn = cross_attention_fits(self.norm1, self.attn, self.context_norm, output_attentions) and (
                context is None or cross_input_fits(self.attn, context)
            )
        else:
            fuse_attn = self_attention_fits(self.norm1, self.attn, output_attentions)
        return fused, fuse_attn, fused is not None and mlp_fits(self.norm2, self.mlp)

    def fused_weights(self, hidden_states: Tensor, **kwargs) -> list[Tensor]:
        """The projection parameters this block's fused branches will convert for `hidden_states`, which the encoder
        converts for all its blocks at once (weight_cast.prefetch_copies)."""
        if self.gradient_checkpointing and self.training:
            return []
        _, fuse_attn, fuse_mlp = self._fused_paths(hidden_states, None, kwargs)
        attn = self.attn
        attn_linears = [attn.q_proj if attn.spec.is_cross_attention else attn.qkv_proj, attn.o_proj]
        linears = (attn_linears if fuse_attn else []) + ([self.mlp.fc1, self.mlp.fc2] if fuse_mlp else [])
        return [t for m in linears for t in (m.weight, m.bias) if t is not None]

    def forward(
        self, hidden_states: Tensor, context: CrossInput | Tensor | None = None, **kwargs
    ) -> tuple[Tensor, Tensor | None]:
        """`context`: the cross-attention input (a [`CrossInput`], or a plain tensor without mask); None for
        self-attention. Returns `(hidden_states, attention weights or None)`."""
        if isinstance(context, Tensor):
            context = CrossInput(context)
        fused, fuse_attn, fuse_mlp = self._fused_paths(hidden_states, context, kwargs)
        # What runs as modules converts its projection weights together (weight_cast.py); a block recomputed under
        # activation checkpointing does not, so that its forward and its recompute take the same path.
        linears = [] if fuse_attn else self.attn.projections()
        if not fuse_mlp:
            linears += [self.mlp.fc1, self.mlp.fc2]
        checkpointed = self.gradient_checkpointing and self.training
        if checkpointed:
            linears = []
        computed = None
        if context is not None and linears and not fuse_attn:
            computed = self.attn.input_projection(context, self.context_norm)
        # The fused branches' weight copies are converted again in backward, for the block's branches together, where
        # this call is the only one reading them in this forward; a block called several times (a repeated latent
        # stack, tied layers) keeps the one set that serves every call rather than convert it again for each.
        recast = None
        if (fuse_attn or fuse_mlp) and torch.is_grad_enabled():
            weight = self.attn.o_proj.weight if fuse_attn else self.mlp.fc2.weight
            recast = BackwardCopies(fused) if converted_once(fused, weight) else None
        with unshared() if checkpointed else nullcontext(), cast_projections(linears, hidden_states, computed):
            if fuse_attn and context is None:
                hidden_states = self_attention_branch(self.norm1, self.attn, hidden_states, fused, recast)
                weights = None
            elif fuse_attn:
                hidden_states, weights = cross_attention_branch(
                    self.norm1, self.attn, hidden_states, context, self.context_norm, fused, self.attn_residual, recast
                ), None
            else:
                if context is None:
                    attn_out, weights = self.attn(self.norm1(hidden_states), **kwargs)
                else:
                    attn_out, weights = self.attn(
                        self.norm1(hidden_states), context, input_norm=self.context_norm, **kwargs
                    )
                hidden_states = hidden_states + attn_out if self.attn_residual else attn_out
            if fuse_mlp:
                return mlp_branch(self.norm2, self.mlp, hidden_states, fused, self.mlp_residual, recast), weights
            mlp_out = self.mlp(self.norm2(hidden_states))
        return (hidden_states + mlp_out if self.mlp_residual else mlp_out), weights

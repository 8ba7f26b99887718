"""Readouts of the latents: the Perceiver IO decoder (queries cross-attend to the latents) and the classification
head's pooling."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .configuration_perceiver import PerceiverConfig
from .input_preparation import as_bool_mask, expand_tokens
from .layers import AttentionSpec, PerceiverBlock


def output_norm(config: PerceiverConfig, width: int) -> nn.Module:
    """The LayerNorm before an output projection, or an identity (no parameters) without `config.output_norm`."""
    return nn.LayerNorm(width, eps=config.layer_norm_eps) if config.output_norm else nn.Identity()


class PerceiverDecoder(nn.Module):
    """Perceiver IO decoder: queries cross-attend to the latents, then an optional Linear to `config.output_dim`
    (after a LayerNorm with `config.output_norm`). Outputs at masked queries are exactly zero.

    `num_queries` overrides `config.num_queries` for heads that own their query table (the masked LM has one query
    per position, `config.max_position_embeddings` of them).
    """

    def __init__(self, config: PerceiverConfig, num_queries: int | None = None):
        super().__init__()
        self.config = config
        width = config.decoder_query_dim
        num_queries = config.num_queries if num_queries is None else num_queries
        self.queries = nn.Parameter(torch.zeros(num_queries, width)) if num_queries else None
        self.block = PerceiverBlock(config, AttentionSpec.query(config))
        if config.output_dim is not None:
            self.norm = output_norm(config, width)
            self.proj = nn.Linear(width, config.output_dim)
        else:
            self.norm = self.proj = None

    def forward(
        self, latents: Tensor, queries: Tensor | None = None, query_mask: Tensor | None = None, **kwargs
    ) -> tuple[Tensor, Tensor | None]:
        """Decode `latents` at `queries` (the learned ones when None): `(outputs, attention weights or None)`."""
        batch = latents.shape[0]
        if queries is None:
            if self.queries is None:
                raise ValueError("The decoder has no learned queries (`num_queries=None`): pass `queries`.")
            queries = self.queries
        queries = expand_tokens(queries, batch, self.config.decoder_query_dim, "queries", latents.dtype)
        if query_mask is not None:
            query_mask = as_bool_mask(query_mask, "`query_mask`", "batch, num_queries", (batch, queries.shape[1]))
            # Zero padded queries on the way in as well as out: NaN/Inf padding would otherwise reach the weight
            # gradients through 0 * NaN, even though the outputs there are discarded.
            queries = queries.masked_fill(~query_mask[..., None], 0.0)
        out, weights = self.block(queries, latents, **kwargs)
        if self.proj is not None:
            out = self.proj(self.norm(out))
        if query_mask is not None:
            out = out.masked_fill(~query_mask[..., None], 0.0)
        return out, weights


class PerceiverClassificationHead(nn.Module):
    """Pools the latents (`config.pooling`) and classifies: LayerNorm (`config.output_norm`) + dropout + Linear to
    `num_labels`."""

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.pooling = config.pooling
        width = config.latent_dim * config.num_latents if config.pooling == "concat" else config.latent_dim
        if config.pooling == "query":
            # Perceiver IO style: one learned query cross-attends to the latents.
            self.query = nn.Parameter(torch.zeros(1, config.latent_dim))
            self.query_block = PerceiverBlock(config, AttentionSpec.query(config, dim=config.latent_dim, rotary=False))
        self.norm = output_norm(config, width)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(width, config.num_labels)

    def pool(self, latents: Tensor) -> Tensor:
        if self.pooling == "average":
            return latents.mean(dim=1)
        if self.pooling == "first":
            return latents[:, 0]
        if self.pooling == "concat":
            # The classifier's width is fixed by num_latents: custom latents of another count cannot be concatenated.
            if latents.shape[1] * latents.shape[2] != self.classifier.in_features:
                raise ValueError(
                    f"pooling='concat' needs {self.classifier.in_features // latents.shape[2]} latents "
                    f"(config.num_latents), got {latents.shape[1]}."
                )
            return latents.flatten(1)
        query = self.query.expand(latents.shape[0], -1, -1)
        return self.query_block(query, latents)[0][:, 0]

    def forward(self, latents: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.norm(self.pool(latents))))


__all__ = ["PerceiverClassificationHead", "PerceiverDecoder", "output_norm"]

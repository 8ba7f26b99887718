"""The shared Perceiver core: latents cross-attend to the inputs and refine themselves by self-attention."""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor, nn

from .attention_backends import KeyPaddingMask
from .configuration_perceiver import PerceiverConfig
from .cross_attention import CrossInput
from .encoder_graphs import active as graphs_active
from .encoder_graphs import run_encoder
from .layers import AttentionSpec, PerceiverBlock
from .fused_block import fused_dtype
from .shared_gradients import gradient_sums
from .weight_cast import prefetch_copies, shared_casts


class PerceiverEncoder(nn.Module):
    """`depth` x (cross-attention + `self_per_cross_attn` self-attentions, that stack applied
    `latent_stack_repeats` times with the same weights) over latents.

    With `weight_tie_layers`, blocks after the first share one set of modules: the unique modules are kept once and
    indexed (registering one module twice would make `save_pretrained` fail on shared tensors). The latents after
    every block and the attention maps are recorded by the model's output hooks, not collected here.
    """

    def __init__(self, config: PerceiverConfig, input_dims: list[int]):
        super().__init__()
        self.config = config
        self.input_dims = list(input_dims)
        unique = min(config.depth, 2) if config.weight_tie_layers else config.depth
        self.cross_layers = nn.ModuleList(
            PerceiverBlock(config, AttentionSpec.cross(config, self.input_dims[i])) for i in range(unique)
        )
        latent = AttentionSpec.latent(config)
        self.self_layers = nn.ModuleList(
            nn.ModuleList(PerceiverBlock(config, latent) for _ in range(config.self_per_cross_attn))
            for _ in range(unique)
        )
        if config.num_zero_tokens:
            self.zero_tokens = nn.ParameterList(
                nn.Parameter(torch.zeros(config.num_zero_tokens, dim)) for dim in self.input_dims
            )
        else:
            self.zero_tokens = None
        self.gradient_checkpointing = False

    def block_index(self, i: int) -> int:
        return min(i, len(self.cross_layers) - 1)

    def forward(self, latents: Tensor, contexts: list[CrossInput], **kwargs) -> Tensor:
        """Run every block over `latents`, block `i` cross-attending to `contexts[i]`; returns the final latents.

        On CUDA, a call whose signature repeats is replayed from a CUDA graph (encoder_graphs.py, on by default)."""
        graphed = self._replay(latents, contexts, kwargs)
        return self.run_blocks(latents, contexts, **kwargs) if graphed is None else graphed

    def run_blocks(self, latents: Tensor, contexts: list[CrossInput], **kwargs) -> Tensor:
        """The blocks, eagerly: what [`forward`] runs, or captures."""
        for i, context in enumerate(contexts):
            self.cross_layers[self.block_index(i)].prepare(context)
        x = latents
        # Blocks that share modules (tied layers, repeated latent stacks) share their converted weights too, and the
        # fused branches' weights are converted for every block by one multi-tensor copy; their fused branches sum the
        # shared parameters' gradients as they make them (shared_gradients.py).
        with shared_casts(), ExitStack() as scope:
            dtype = fused_dtype(latents)
            if dtype is not None:  # (no block runs a fused branch otherwise: nothing to collect)
                # How many calls each layer gets in this forward: one conversion serves them all.
                calls: dict[nn.Module, int] = {}
                for b in (self.block_index(i) for i in range(len(contexts))):
                    calls[self.cross_layers[b]] = calls.get(self.cross_layers[b], 0) + 1
                    for layer in self.self_layers[b]:
                        calls[layer] = calls.get(layer, 0) + self.config.latent_stack_repeats
                prefetch_copies(dtype, {t: n for layer, n in calls.items()
                                        for t in layer.fused_weights(latents, **kwargs)})
                shared = {p: n for layer, n in calls.items() if n > 1 for p in layer.parameters()}
                scope.enter_context(gradient_sums(shared))
            for i, context in enumerate(contexts):
                b = self.block_index(i)
                x, _ = self.cross_layers[b](x, context, **kwargs)
                for _ in range(self.config.latent_stack_repeats):
                    for layer in self.self_layers[b]:
                        x, _ = layer(x, **kwargs)
        return x

    def _replay(self, latents: Tensor, contexts: list[CrossInput], kwargs: dict) -> Tensor | None:
        """The graph replay of this call, or None where it runs eagerly: the captured encoder takes plain input
        tensors and their padding masks (no zero tokens, shards or chunking) and records no attention maps."""
        if (not graphs_active() or not latents.is_cuda or kwargs.get("output_attentions")
                or self.config.cross_attention_checkpointing):
            return None
        unique: list[CrossInput] = []
        structure = []
        for context in contexts:
            if context.prefix is not None or context.shard is not None:
                return None
            # Blocks reading one input share its CrossInput (and its LayerNorm cache): so do their replays.
            j = next((j for j, u in enumerate(unique) if u is context), None)
            if j is None:
                unique.append(context)
                j = len(unique) - 1
            structure.append(j)
        masked = tuple(c.mask is not None for c in unique)
        # A mask enters the graph as its two tensors; its packed form (varlen backends) is never captured.
        masks = [t for c in unique if c.mask is not None for t in (c.mask.mask, c.mask.has_keys)]

        def run(latents: Tensor, *tensors: Tensor) -> Tensor:
            tokens, mask_parts = tensors[: len(unique)], iter(tensors[len(unique):])
            shared = [
                CrossInput(t, KeyPaddingMask(next(mask_parts), next(mask_parts)) if m else None)
                for t, m in zip(tokens, masked)
            ]
            return self.run_blocks(latents, [shared[j] for j in structure])

        return run_encoder(
            self, run, latents, [*(c.tokens for c in unique), *masks], (tuple(structure), masked),
            self.config._attn_implementation or "sdpa",
        )


def drop_tokens(x: Tensor, p: float) -> Tensor:
    """Keep a random `floor((1 - p) * n)` of the `n` tokens of every sample, in their original order."""
    batch, n = x.shape[:2]
    keep = int((1 - p) * n)
    if keep < 1:
        raise ValueError(
            f"`latent_drop={p}` keeps no latent of {n} (it keeps floor((1 - p) * n) = {keep}): lower `latent_drop` or "
            "use more latents."
        )
    scores = torch.rand(batch, n, device=x.device)
    indices = scores.topk(keep, dim=1).indices.sort(dim=1).values
    return x.gather(1, indices[..., None].expand(-1, -1, x.shape[-1]))


__all__ = ["PerceiverEncoder", "drop_tokens"]

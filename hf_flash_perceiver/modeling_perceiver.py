"""Perceiver and Perceiver IO models on fused attention, as transformers `PreTrainedModel`s."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput, MaskedLMOutput, SequenceClassifierOutput
from transformers.utils import ModelOutput

from .attention import KeyPaddingMask, check_attn_implementation
from .configuration_perceiver import PerceiverConfig
from .cross_attention import CrossInput
from .hub_perceiver import PerceiverHubMixin
from .input_adapters import INTEGER_DTYPES, PerceiverImageAdapter, PerceiverTextAdapter
from .layers import (
    PerceiverBlock,
    PerceiverRotaryEmbedding,
    cross_attention_block,
    decoder_block,
    drop_tokens,
    self_attention_block,
)


InputsType = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
MaskType = Tensor | Sequence[Tensor | None] | Mapping[str, Tensor | None] | None


@dataclass
class PerceiverModelOutput(ModelOutput):
    r"""
    Output of [`PerceiverModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_latents, latent_dim)`):
            The final latents.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The latents entering the first block, then after every attention block:
            `1 + depth * (1 + self_per_cross_attn)` tensors of shape `(batch_size, num_latents, latent_dim)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            One map per attention layer in the order cross_0, self_0_0, ..., cross_1, ...: cross maps
            `(batch_size, cross_heads, num_latents, seq_len)` (masked keys exactly 0), self maps
            `(batch_size, latent_heads, num_latents, num_latents)`.
    """

    last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class PerceiverIOOutput(ModelOutput):
    r"""
    Output of the Perceiver IO models.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
            The training loss.
        logits (`torch.FloatTensor` of shape `(batch_size, num_queries, output_dim)`):
            Decoder outputs (zero at masked queries).
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_latents, latent_dim)`):
            The final latents of the encoder.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): as in [`PerceiverModelOutput`].
        attentions (`tuple(torch.FloatTensor)`, *optional*): the encoder's maps, as in [`PerceiverModelOutput`].
        cross_attentions (`tuple(torch.FloatTensor)`, *optional*, returned when `output_attentions=True`):
            The decoder's map `(batch_size, query_heads, num_queries, num_latents)`.
    """

    loss: Tensor | None = None
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


class PerceiverPreTrainedModel(PerceiverHubMixin, PreTrainedModel):
    config_class = PerceiverConfig
    config: PerceiverConfig
    base_model_prefix = "perceiver"
    main_input_name = "inputs"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PerceiverBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, *args, **kwargs) -> str:
        # Our own dispatch table decides, so that an unknown name or a missing flash-attn fails with our message
        # (naming the install command) before transformers' check, which may try a Hub kernel instead.
        return check_attn_implementation(attn_implementation)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        return check_attn_implementation(requested_attention)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=std)
        elif isinstance(module, PerceiverRotaryEmbedding):
            # Non-persistent: not in the checkpoint, garbage after a meta-device build unless recomputed here.
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        for name, param in module.named_parameters(recurse=False):
            # Learned token tables (latents, zero tokens, queries) are plain Parameters on their owner.
            if name in ("latents", "queries", "query") or isinstance(module, nn.ParameterList):
                init.trunc_normal_(param, std=std)


def _type_name(value) -> str:
    return type(value).__name__


def as_bool_mask(mask, name: str, dims: str, expected: tuple[int, ...]) -> Tensor:
    """Validate a padding mask (bool, or 0/1 integers as tokenizers give them) of shape `expected` and return it as
    bool. `name`/`dims` word the errors, e.g. `"Mask 0"` and `"batch, seq_len"`."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({dims}) = {expected} or None, got {_type_name(mask)}.")
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape ({dims}) = {tuple(expected)}, got {tuple(mask.shape)}.")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be bool or 0/1 integers, got dtype {mask.dtype}.")
    # Eager mode only: the value check needs the data (a host sync), which a compiled graph cannot branch on.
    if not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} must hold only 0/1 (or True/False), got values {mask.unique().tolist()}.")
    return mask != 0


class PerceiverEncoder(nn.Module):
    """The shared Perceiver core: `depth` x (cross-attention + `self_per_cross_attn` self-attentions) over latents.

    With `weight_tie_layers`, blocks after the first share one set of modules: the unique modules are kept once and
    indexed (registering one module twice would make `save_pretrained` fail on shared tensors).
    """

    def __init__(self, config: PerceiverConfig, input_dims: list[int]):
        super().__init__()
        self.config = config
        self.input_dims = list(input_dims)
        unique = min(config.depth, 2) if config.weight_tie_layers else config.depth
        self.cross_layers = nn.ModuleList(cross_attention_block(config, self.input_dims[i]) for i in range(unique))
        self.self_layers = nn.ModuleList(
            nn.ModuleList(self_attention_block(config) for _ in range(config.self_per_cross_attn)) for _ in range(unique)
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

    # ------------------------------------------------------------------ input validation
    def normalize_inputs(self, inputs: InputsType, attention_mask: MaskType) -> tuple[list[Tensor], list]:
        """Bring `inputs`/`attention_mask` (tensor, list or dict) to one list entry per cross-attention block."""
        depth = self.config.depth
        names = self.config.input_names
        if isinstance(inputs, Tensor):
            if attention_mask is not None and not isinstance(attention_mask, Tensor):
                raise TypeError(
                    f"`attention_mask` must be a tensor when `inputs` is a tensor, got {_type_name(attention_mask)}."
                )
            return [inputs] * depth, [attention_mask] * depth
        if isinstance(inputs, Mapping):
            if names is None:
                raise ValueError("`inputs` is a dict but `config.input_names` is not set; pass a list or set the names.")
            if set(inputs) != set(names):
                raise ValueError(f"`inputs` keys must be exactly {sorted(names)}, got {sorted(inputs)}.")
            if attention_mask is not None:
                if not isinstance(attention_mask, Mapping):
                    raise TypeError(
                        f"`attention_mask` must be a dict like `inputs`, got {_type_name(attention_mask)}."
                    )
                unknown = set(attention_mask) - set(names)
                if unknown:
                    raise ValueError(f"`attention_mask` has unknown keys {sorted(unknown)}; expected a subset of {names}.")
                masks = [attention_mask.get(name) for name in names]
            else:
                masks = [None] * depth
            return [inputs[name] for name in names], masks
        if isinstance(inputs, Sequence) and not isinstance(inputs, str):
            if len(inputs) != depth:
                raise ValueError(f"Expected {depth} inputs (one per cross-attention block), got {len(inputs)}.")
            if attention_mask is None:
                masks = [None] * depth
            elif isinstance(attention_mask, Sequence) and not isinstance(attention_mask, str):
                if len(attention_mask) != depth:
                    raise ValueError(f"Expected {depth} masks (one per input, None allowed), got {len(attention_mask)}.")
                masks = list(attention_mask)
            else:
                raise TypeError(
                    f"`attention_mask` must be a list like `inputs`, got {_type_name(attention_mask)}."
                )
            return list(inputs), masks
        raise TypeError(f"`inputs` must be a tensor, a list of tensors or a dict of tensors, got {_type_name(inputs)}.")

    def prepare_inputs(self, inputs: InputsType, attention_mask: MaskType) -> list[CrossInput]:
        """Validate inputs and masks and build each block's [`CrossInput`] once per forward.

        A tensor passed once for every block is prepared once and shared (same mask object, so the varlen packing is
        computed once). Zero tokens are per-block parameters: each block gets its own prefix, while the mask over
        prefix + tokens is shared by the blocks that read the same input.
        """
        tensors, masks = self.normalize_inputs(inputs, attention_mask)
        prepared: list[CrossInput] = []
        seen: list[tuple[Tensor, Tensor | None, CrossInput]] = []
        for i, (x, mask) in enumerate(zip(tensors, masks)):
            # Identity, not equality: the same tensor object passed for several blocks is prepared once.
            # (`is` rather than an id()-keyed dict: torch.compile traces it on every supported torch.)
            found = next((c for x0, m0, c in seen if x0 is x and m0 is mask), None)
            if found is None:
                found = self._prepare_one(i, x, mask)
                seen.append((x, mask, found))
            prepared.append(found)
            if prepared[i].tokens.shape[0] != prepared[0].tokens.shape[0]:
                raise ValueError(
                    f"All inputs must share one batch size; input 0 has {prepared[0].tokens.shape[0]}, "
                    f"input {i} has {prepared[i].tokens.shape[0]}."
                )
        if self.zero_tokens is not None:
            extended: list[tuple[KeyPaddingMask, KeyPaddingMask]] = []
            prepared = [self._add_zero_tokens(i, c, extended) for i, c in enumerate(prepared)]
        if self.config.cross_input_norm and not self.config.cross_attention_checkpointing:
            normalized: list[tuple[Tensor, Tensor]] = []
            prepared = [self._normalize(c, normalized) for c in prepared]
        return prepared

    def _normalize(self, context: CrossInput, cache: list[tuple[Tensor, Tensor]]) -> CrossInput:
        """LayerNorm (no affine) of an input, once for all blocks that read it; blocks fold their own affine into
        their key/value projection. Stored in the autocast dtype: it is what the projection consumes."""

        def norm(x: Tensor) -> Tensor:
            found = next((y for x0, y in cache if x0 is x), None)
            if found is None:
                found = F.layer_norm(x, (x.shape[-1],), None, None, self.config.layer_norm_eps)
                if torch.is_autocast_enabled(x.device.type):
                    found = found.to(torch.get_autocast_dtype(x.device.type))
                cache.append((x, found))
            return found

        prefix = None if context.prefix is None else norm(context.prefix)
        return CrossInput(norm(context.tokens), context.mask, prefix, normalized=True)

    def _prepare_one(self, i: int, x: Tensor, mask: Tensor | None) -> CrossInput:
        if not isinstance(x, Tensor):
            raise TypeError(f"Input {i} must be a torch.Tensor, got {_type_name(x)}.")
        if x.dim() != 3:
            raise ValueError(f"Input {i} must have shape (batch, seq_len, {self.input_dims[i]}), got {tuple(x.shape)}.")
        if x.shape[-1] != self.input_dims[i]:
            raise ValueError(
                f"Input {i} has feature dim {x.shape[-1]} but the model expects input_dim={self.input_dims[i]}."
            )
        if not x.is_floating_point():
            raise TypeError(f"Input {i} must be a floating-point tensor, got dtype {x.dtype}.")
        if mask is None:
            return CrossInput(x)
        mask = as_bool_mask(mask, f"Mask {i}", "batch, seq_len", tuple(x.shape[:2]))
        # Eager mode only (a data-dependent branch would break a compiled graph): an all-True mask is no mask, and
        # dropping it keeps the unmasked fast path.
        if not torch.compiler.is_compiling() and bool(mask.all()):
            return CrossInput(x)
        # Padding content must not matter, whatever the kernel does with masked keys: zero it (NaN/Inf in padding
        # would otherwise leak through 0 * NaN in some kernels). NaN/Inf in attended tokens is *not* hidden.
        x = x.masked_fill(~mask[..., None], 0.0)
        return CrossInput(x, KeyPaddingMask.from_mask(mask))

    def _add_zero_tokens(
        self, i: int, context: CrossInput, extended: list[tuple[KeyPaddingMask, KeyPaddingMask]]
    ) -> CrossInput:
        x, mask = context.tokens, context.mask
        prefix = self.zero_tokens[i].to(x.dtype).expand(x.shape[0], -1, -1)
        if mask is not None:
            # Zero tokens are always attendable; blocks sharing one input share the extended mask too.
            found = next((m1 for m0, m1 in extended if m0 is mask), None)
            if found is None:
                ones = mask.mask.new_ones(x.shape[0], prefix.shape[1])
                found = KeyPaddingMask.from_mask(torch.cat([ones, mask.mask & mask.has_keys[:, None]], 1))
                extended.append((mask, found))
            mask = found
        return CrossInput(x, mask, prefix)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        latents: Tensor,
        contexts: list[CrossInput],
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> PerceiverModelOutput:
        hidden_states = (latents,) if output_hidden_states else None
        attentions = () if output_attentions else None
        x = latents
        for i, context in enumerate(contexts):
            b = self.block_index(i)
            for layer, ctx in [(self.cross_layers[b], context)] + [(s, None) for s in self.self_layers[b]]:
                x, weights = layer(x, ctx, None, output_attentions)
                if output_hidden_states:
                    hidden_states += (x,)
                if output_attentions:
                    attentions += (weights,)
        return PerceiverModelOutput(last_hidden_state=x, hidden_states=hidden_states, attentions=attentions)


class PerceiverModel(PerceiverPreTrainedModel):
    r"""
    The bare Perceiver encoder: learned latents cross-attend to the inputs and refine themselves by self-attention.

    Args:
        config ([`PerceiverConfig`]): the model configuration. `config.input_dim` must be set (raw features).
        input_dims (`list[int]`, *optional*): used by heads whose input adapter sets the width; leave unset.
    """

    def __init__(self, config: PerceiverConfig, input_dims: list[int] | None = None):
        super().__init__(config)
        if input_dims is None:
            if config.input_dim is None:
                raise ValueError(
                    "PerceiverModel takes raw features and needs `config.input_dim` (an int, or one int per block); "
                    "got None. Heads with an input adapter (images, token ids) set the width themselves."
                )
            input_dims = config.input_dims
        self.latents = nn.Parameter(torch.zeros(config.num_latents, config.latent_dim)) if config.num_latents else None
        self.encoder = PerceiverEncoder(config, input_dims)
        self.post_init()

    def prepare_latents(self, latents: Tensor | None, batch_size: int) -> Tensor:
        width = self.config.latent_dim
        if latents is None:
            if self.latents is None:
                raise ValueError("The model has no learned latents (`num_latents=None`): pass `latents`.")
            latents = self.latents
        elif not isinstance(latents, Tensor):
            raise TypeError(f"`latents` must be a tensor, got {_type_name(latents)}.")
        if latents.dim() not in (2, 3) or latents.shape[-1] != width:
            raise ValueError(
                f"`latents` must have shape (num_latents, {width}) or (batch, num_latents, {width}), "
                f"got {tuple(latents.shape)}."
            )
        if latents.dim() == 2:
            latents = latents.expand(batch_size, -1, -1)
        elif latents.shape[0] != batch_size:
            raise ValueError(f"`latents` has batch size {latents.shape[0]} but the inputs have {batch_size}.")
        if self.training and self.config.latent_drop > 0:
            latents = drop_tokens(latents, self.config.latent_drop)
        return latents

    def forward(
        self,
        inputs: InputsType,
        attention_mask: MaskType = None,
        latents: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> PerceiverModelOutput | tuple:
        r"""
        Args:
            inputs (`torch.FloatTensor` of shape `(batch_size, seq_len, input_dim)`, or a list/dict of them):
                The input. One tensor is read by every cross-attention block; a list (one per block) or a dict
                keyed by `config.input_names` gives each block its own input, with its own length and width.
            attention_mask (`torch.BoolTensor` or 0/1 `torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Key padding: True/1 = attend. Same structure as `inputs`, with None allowed per input.
            latents (`torch.FloatTensor` of shape `(num_latents, latent_dim)` or `(batch_size, num_latents, latent_dim)`, *optional*):
                Custom latents, any number of them, instead of the learned ones.
            output_attentions (`bool`, *optional*):
                Return every layer's attention map (computed for this call by the eager reference; the model keeps
                its backend).
            output_hidden_states (`bool`, *optional*):
                Return the latents before the first and after every attention block.
            return_dict (`bool`, *optional*):
                Return a [`PerceiverModelOutput`] instead of a tuple.

        NaN or Inf in attended input tokens propagate to the output (nothing hides them); padded tokens are zeroed
        before use and never influence it.
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        contexts = self.encoder.prepare_inputs(inputs, attention_mask)
        latents = self.prepare_latents(latents, contexts[0].tokens.shape[0])
        outputs = self.encoder(latents, contexts, output_attentions, output_hidden_states)
        return outputs if return_dict else outputs.to_tuple()


def _expand_queries(queries: Tensor, batch_size: int, width: int, name: str = "queries") -> Tensor:
    if not isinstance(queries, Tensor):
        raise TypeError(f"`{name}` must be a tensor, got {_type_name(queries)}.")
    if queries.dim() not in (2, 3) or queries.shape[-1] != width:
        raise ValueError(
            f"`{name}` must have shape (num_queries, {width}) or (batch, num_queries, {width}), got {tuple(queries.shape)}."
        )
    if queries.dim() == 2:
        return queries.expand(batch_size, -1, -1)
    if queries.shape[0] != batch_size:
        raise ValueError(f"`{name}` has batch size {queries.shape[0]} but the inputs have {batch_size}.")
    return queries


class PerceiverDecoder(nn.Module):
    """Perceiver IO decoder: queries cross-attend to the latents, then an optional LayerNorm + Linear to
    `config.output_dim`. Outputs at masked queries are exactly zero.

    `num_queries` overrides `config.num_queries` for heads that own their query table (the masked LM has one query
    per position, `config.max_position_embeddings` of them).
    """

    def __init__(self, config: PerceiverConfig, num_queries: int | None = None):
        super().__init__()
        self.config = config
        width = config.decoder_query_dim
        num_queries = config.num_queries if num_queries is None else num_queries
        self.queries = nn.Parameter(torch.zeros(num_queries, width)) if num_queries else None
        self.block = decoder_block(config)
        if config.output_dim is not None:
            self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
            self.proj = nn.Linear(width, config.output_dim)
        else:
            self.norm = self.proj = None

    def forward(
        self,
        latents: Tensor,
        queries: Tensor | None = None,
        query_mask: Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        batch = latents.shape[0]
        if queries is None:
            if self.queries is None:
                raise ValueError("The decoder has no learned queries (`num_queries=None`): pass `queries`.")
            queries = self.queries
        queries = _expand_queries(queries, batch, self.config.decoder_query_dim)
        if query_mask is not None:
            query_mask = as_bool_mask(query_mask, "`query_mask`", "batch, num_queries", (batch, queries.shape[1]))
            # Zero padded queries on the way in as well as out: NaN/Inf padding would otherwise reach the weight
            # gradients through 0 * NaN, even though the outputs there are discarded.
            queries = queries.masked_fill(~query_mask[..., None], 0.0)
        out, weights = self.block(queries, latents, None, output_attentions)
        if self.proj is not None:
            out = self.proj(self.norm(out))
        if query_mask is not None:
            out = out.masked_fill(~query_mask[..., None], 0.0)
        return out, weights


def perceiver_io_forward(
    perceiver: PerceiverModel,
    decoder: PerceiverDecoder,
    inputs: InputsType,
    attention_mask: MaskType,
    queries: Tensor | None,
    query_mask: Tensor | None,
    latents: Tensor | None,
    output_attentions: bool,
    output_hidden_states: bool | None,
) -> PerceiverIOOutput:
    """Encode `inputs` into latents, then decode them at `queries`: the forward shared by the Perceiver IO heads."""
    enc = perceiver(inputs, attention_mask, latents, output_attentions, output_hidden_states, return_dict=True)
    logits, weights = decoder(enc.last_hidden_state, queries, query_mask, output_attentions)
    return PerceiverIOOutput(
        logits=logits,
        last_hidden_state=enc.last_hidden_state,
        hidden_states=enc.hidden_states,
        attentions=enc.attentions,
        cross_attentions=(weights,) if output_attentions else None,
    )


class PerceiverIOModel(PerceiverPreTrainedModel):
    r"""
    Perceiver IO: the Perceiver encoder followed by a decoder in which queries (learned, or passed in) cross-attend
    to the latents and are projected to `config.output_dim`. Takes raw features (`inputs`), like [`PerceiverModel`].

    transformers has no task Auto class for it: load it with `PerceiverIOModel.from_pretrained`, or with
    `AutoModel.from_pretrained(..., trust_remote_code=True)` from a folder saved after `register_for_auto_class()`
    (its `auto_map` names this class for AutoModel).
    """

    _hub_base_class = "PerceiverIOModel"
    _hub_card_fields = ("num_queries", "query_dim", "output_dim", "query_heads", "query_head_dim")

    def __init__(self, config: PerceiverConfig, input_dims: list[int] | None = None):
        super().__init__(config)
        self.perceiver = PerceiverModel(config, input_dims)
        self.decoder = PerceiverDecoder(config)
        self.post_init()

    def forward(
        self,
        inputs: InputsType,
        attention_mask: MaskType = None,
        queries: Tensor | None = None,
        query_mask: Tensor | None = None,
        latents: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> PerceiverIOOutput | tuple:
        r"""
        Args:
            inputs, attention_mask, latents: as in [`PerceiverModel.forward`].
            queries (`torch.FloatTensor` of shape `(num_queries, query_dim)` or `(batch_size, num_queries, query_dim)`, *optional*):
                Decoder queries; the learned ones (`config.num_queries`) when not given.
            query_mask (`torch.BoolTensor` of shape `(batch_size, num_queries)`, *optional*):
                False/0 marks padded queries: their outputs are exactly zero.
            output_attentions, output_hidden_states, return_dict: as in [`PerceiverModel.forward`].
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        out = perceiver_io_forward(
            self.perceiver, self.decoder, inputs, attention_mask, queries, query_mask, latents, output_attentions,
            output_hidden_states,
        )
        return out if return_dict else out.to_tuple()


class PerceiverClassificationHead(nn.Module):
    """Pools the latents (`config.pooling`) and classifies: LayerNorm + dropout + Linear to `num_labels`."""

    def __init__(self, config: PerceiverConfig):
        super().__init__()
        self.pooling = config.pooling
        width = config.latent_dim * config.num_latents if config.pooling == "concat" else config.latent_dim
        if config.pooling == "query":
            # Perceiver IO style: one learned query cross-attends to the latents.
            self.query = nn.Parameter(torch.zeros(1, config.latent_dim))
            self.query_block = PerceiverBlock(
                config, config.latent_dim, config.query_heads, config.query_head_dim, 0, config.query_attn_dropout,
                kv_dim=config.latent_dim, qkv_bias=config.cross_qkv_bias,
            )
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
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


def _mean_over_items(loss_sum: Tensor, count: Tensor | int, num_items_in_batch: Tensor | int | None) -> Tensor:
    """Turn a summed loss into a mean over labelled items.

    Under `Trainer` with gradient accumulation, `num_items_in_batch` is the number of labelled items in the whole
    accumulated batch: dividing each micro-batch's *sum* by it makes the accumulated loss (and gradient) equal to the
    full batch's mean, which a per-micro-batch mean does not when micro-batches hold different numbers of items.
    Without it, the count of this batch is used; a batch without any labelled item gives 0, not 0/0 = NaN.
    """
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss_sum.device)
        return loss_sum / num_items_in_batch
    if isinstance(count, Tensor):
        return loss_sum / count.clamp(min=1)
    return loss_sum / max(count, 1)


def class_id_loss(
    logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None, what: str = "Class ids"
) -> Tensor:
    """Cross-entropy of `logits (n, num_classes)` against class ids `labels (n,)`; -100 marks ignored items.

    Ids out of range raise a `ValueError` here instead of an IndexError (CPU) or device-side assert (CUDA) in torch.
    """
    num_classes = logits.shape[-1]
    valid = labels != -100
    if not torch.compiler.is_compiling():
        bad = valid & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"{what} must be in [0, {num_classes}) or -100 (ignored), got {labels[bad].unique().tolist()[:10]}."
            )
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    return _mean_over_items(loss_sum, valid.sum(), num_items_in_batch)


def infer_problem_type(num_labels: int, labels: Tensor) -> str:
    """transformers' rule: one label is regression; integer labels are single-label classes; else multi-label."""
    if num_labels == 1:
        return "regression"
    if labels.dtype in INTEGER_DTYPES:
        return "single_label_classification"
    return "multi_label_classification"


def classification_loss(
    config: PerceiverConfig, logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None
) -> Tensor:
    """Loss by `config.problem_type` (inferred as transformers does), with labels validated against it.

    Single-label: cross-entropy over integer class ids `(batch,)`, -100 ignored. Multi-label: BCE-with-logits over
    float multi-hot `(batch, num_labels)`. Regression: MSE over float `(batch, num_labels)` (or `(batch,)` with one
    label). Every loss is a sum over items divided by `num_items_in_batch` when given (see `_mean_over_items`).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a tensor, got {_type_name(labels)}.")
    batch, num_labels = logits.shape[0], config.num_labels
    problem_type = config.problem_type or infer_problem_type(num_labels, labels)
    got = f"got dtype {labels.dtype} of shape {tuple(labels.shape)}"
    if problem_type == "regression":
        shapes = [(batch, num_labels)] + ([(batch,)] if num_labels == 1 else [])
        if not labels.is_floating_point() or tuple(labels.shape) not in shapes:
            expected = " or ".join(str(s) for s in shapes)
            raise ValueError(f"Regression labels must be floating point of shape {expected}, {got}.")
        error = logits.float().view(batch, num_labels) - labels.float().view(batch, num_labels)
        loss = _mean_over_items(error.square().sum(), labels.numel(), num_items_in_batch)
    elif problem_type == "single_label_classification":
        if labels.dtype not in INTEGER_DTYPES or tuple(labels.shape) not in ((batch,), (batch, 1)):
            raise ValueError(
                f"Single-label classification labels must be integer class ids (torch.long) of shape ({batch},), "
                f"{got}. (Multi-label classification takes float multi-hot labels of shape ({batch}, {num_labels}).)"
            )
        loss = class_id_loss(logits, labels.view(batch).long(), num_items_in_batch)
    else:
        if labels.dtype == torch.bool or labels.is_complex() or tuple(labels.shape) != (batch, num_labels):
            raise ValueError(
                f"Multi-label classification labels must be float multi-hot (0/1) of shape ({batch}, {num_labels}), "
                f"{got}."
            )
        targets = labels.float()
        if not torch.compiler.is_compiling() and bool(((targets < 0) | (targets > 1)).any()):
            raise ValueError(
                f"Multi-label classification labels must lie in [0, 1], got values in "
                f"[{targets.min().item()}, {targets.max().item()}]."
            )
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="sum")
        loss = _mean_over_items(bce, labels.numel(), num_items_in_batch)
    # Remembered only once the labels fit (as transformers does): the pipelines pick softmax/sigmoid from it.
    config.problem_type = problem_type
    return loss


def dense_regression_loss(
    logits: Tensor, labels: Tensor, query_mask: Tensor | None = None, num_items_in_batch: Tensor | int | None = None
) -> Tensor:
    """MSE of Perceiver IO outputs `(batch, num_queries, output_dim)` against dense targets of the same shape.

    Masked queries (`query_mask` False/0) are excluded: their targets may hold anything (NaN, -100 padding).
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a tensor, got {_type_name(labels)}.")
    if not labels.is_floating_point() or labels.shape != logits.shape:
        raise ValueError(
            "Dense regression labels must be floating point of shape (batch, num_queries, output_dim) = "
            f"{tuple(logits.shape)}, got dtype {labels.dtype} of shape {tuple(labels.shape)}."
        )
    targets = labels.float()
    if query_mask is None:
        count = targets.numel()
    else:
        valid = (query_mask != 0)[..., None]
        # Masked before the difference, so that NaN targets there cannot reach the gradient through 0 * NaN.
        targets = targets.masked_fill(~valid, 0.0)
        count = valid.sum() * targets.shape[-1]
    error = (logits.float() - targets).square().sum()
    return _mean_over_items(error, count, num_items_in_batch)


def masked_lm_loss(
    logits: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Cross-entropy of `logits (batch, seq_len, vocab_size)` against token ids `labels (batch, seq_len)`; -100 and
    padded positions (`attention_mask` 0) are ignored."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"`labels` must be a tensor, got {_type_name(labels)}.")
    if labels.dtype not in INTEGER_DTYPES or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"Masked-LM labels must be integer token ids (torch.long, -100 = ignore) of shape (batch, seq_len) = "
            f"{tuple(logits.shape[:2])}, got dtype {labels.dtype} of shape {tuple(labels.shape)}."
        )
    labels = labels.long()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, -100)
    return class_id_loss(logits.flatten(0, 1), labels.flatten(), num_items_in_batch, "Masked-LM label ids")


def _pin_adapter_width(config: PerceiverConfig, head: str) -> int:
    """The width of an input adapter's tokens: `config.input_dim`, or `latent_dim` when unset.

    The width is written back into the config so that the checkpoint's encoder loads on its own: `AutoModel` gives
    a [`PerceiverModel`], which reads `config.input_dim` (the adapter's tokens are its raw features).
    """
    if isinstance(config.input_dim, list):
        raise ValueError(
            f"{head} feeds one input adapter to every cross-attention block, so `input_dim` must be an int or None, "
            f"got the list {config.input_dim}."
        )
    if config.input_dim is None:
        config.input_dim = config.latent_dim
    return config.input_dim


class _ClassifierMixin:
    """Shared by the classification heads: pool + classify the latents, loss by problem type."""

    def forward_head(self, latents: Tensor) -> Tensor:
        """Pool and classify final latents: `(batch, num_labels)` logits."""
        return self.head(latents)

    def _classify(self, enc: PerceiverModelOutput, labels: Tensor | None, num_items_in_batch, return_dict: bool | None,
                  output_class: type[ModelOutput]):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        logits = self.forward_head(enc.last_hidden_state)
        loss = None if labels is None else classification_loss(self.config, logits, labels, num_items_in_batch)
        out = output_class(loss=loss, logits=logits, hidden_states=enc.hidden_states, attentions=enc.attentions)
        return out if return_dict else out.to_tuple()


class PerceiverForSequenceClassification(_ClassifierMixin, PerceiverPreTrainedModel):
    r"""
    Perceiver with a classification head over the pooled latents (`config.pooling`: `"average"`, `"first"`,
    `"concat"` or `"query"`). Takes raw features (`inputs`), like [`PerceiverModel`].

    `labels` give a loss by `config.problem_type` (single-label cross-entropy, multi-label BCE or regression MSE,
    inferred as transformers does when unset).
    """

    accepts_loss_kwargs = True
    _hub_auto_class = "AutoModelForSequenceClassification"
    _hub_card_fields = ("pooling", "num_labels", "problem_type")

    def __init__(self, config: PerceiverConfig, input_dims: list[int] | None = None):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.perceiver = PerceiverModel(config, input_dims)
        self.head = PerceiverClassificationHead(config)
        self.post_init()

    def forward_features(self, inputs: InputsType, attention_mask: MaskType = None, latents: Tensor | None = None,
                         output_attentions: bool | None = None,
                         output_hidden_states: bool | None = None) -> PerceiverModelOutput:
        """The encoder's output (final latents) for `inputs`."""
        return self.perceiver(inputs, attention_mask, latents, output_attentions, output_hidden_states, return_dict=True)

    def forward(
        self,
        inputs: InputsType,
        attention_mask: MaskType = None,
        latents: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: Tensor | int | None = None,
    ) -> SequenceClassifierOutput | tuple:
        r"""
        Args:
            inputs, attention_mask, latents, output_attentions, output_hidden_states, return_dict:
                as in [`PerceiverModel.forward`].
            labels (`torch.LongTensor` of shape `(batch_size,)` or `torch.FloatTensor`, *optional*):
                Class ids (single-label, -100 ignored), float multi-hot `(batch_size, num_labels)` (multi-label) or
                float targets `(batch_size, num_labels)` (regression).
            num_items_in_batch (`int` or `torch.Tensor`, *optional*):
                Labelled items in the whole (gradient-accumulated) batch; `Trainer` passes it so that the loss is
                exact under gradient accumulation.
        """
        enc = self.forward_features(inputs, attention_mask, latents, output_attentions, output_hidden_states)
        return self._classify(enc, labels, num_items_in_batch, return_dict, SequenceClassifierOutput)


class PerceiverForImageClassification(_ClassifierMixin, PerceiverPreTrainedModel):
    r"""
    Perceiver image classifier: `pixel_values` are cut into patches (`config.patch_size`, 1 = per pixel), given 2-D
    Fourier (`config.num_fourier_bands`) or learned positions and projected ([`PerceiverImageAdapter`]), encoded, and
    the latents pooled and classified as in [`PerceiverForSequenceClassification`].

    Works with `pipeline("image-classification")` given an image processor (e.g. `ViTImageProcessor`) saved next to
    the model.
    """

    main_input_name = "pixel_values"
    accepts_loss_kwargs = True
    _hub_auto_class = "AutoModelForImageClassification"
    _hub_pipeline_tag = "image-classification"
    _hub_card_fields = ("num_channels", "image_size", "patch_size", "num_fourier_bands", "pooling", "num_labels",
                        "problem_type")

    def __init__(self, config: PerceiverConfig):
        super().__init__(config)
        width = _pin_adapter_width(config, type(self).__name__)
        self.num_labels = config.num_labels
        self.input_adapter = PerceiverImageAdapter(config, width)
        self.perceiver = PerceiverModel(config, input_dims=config.input_dims)
        self.head = PerceiverClassificationHead(config)
        self.post_init()

    def forward_features(self, pixel_values: Tensor, latents: Tensor | None = None,
                         output_attentions: bool | None = None,
                         output_hidden_states: bool | None = None) -> PerceiverModelOutput:
        """The encoder's output (final latents) for a batch of images."""
        tokens = self.input_adapter(pixel_values)
        return self.perceiver(tokens, None, latents, output_attentions, output_hidden_states, return_dict=True)

    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        latents: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: Tensor | int | None = None,
    ) -> ImageClassifierOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images, as an image processor returns them. Height and width must be divisible by
                `config.patch_size` (and equal `config.image_size` with learned positions).
            labels: as in [`PerceiverForSequenceClassification.forward`].
            latents, output_attentions, output_hidden_states, return_dict: as in [`PerceiverModel.forward`].
            num_items_in_batch: as in [`PerceiverForSequenceClassification.forward`].
        """
        enc = self.forward_features(pixel_values, latents, output_attentions, output_hidden_states)
        return self._classify(enc, labels, num_items_in_batch, return_dict, ImageClassifierOutput)


class PerceiverIOForRegression(PerceiverIOModel):
    r"""
    Perceiver IO for dense prediction: [`PerceiverIOModel`] with an MSE loss against `labels` given at the queries,
    `(batch, num_queries, output_dim)`. Masked queries (`query_mask`) are excluded from the loss.
    """

    accepts_loss_kwargs = True

    def forward(
        self,
        inputs: InputsType,
        attention_mask: MaskType = None,
        queries: Tensor | None = None,
        query_mask: Tensor | None = None,
        latents: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: Tensor | int | None = None,
    ) -> PerceiverIOOutput | tuple:
        r"""
        Args:
            inputs, attention_mask, queries, query_mask, latents, output_attentions, output_hidden_states, return_dict:
                as in [`PerceiverIOModel.forward`].
            labels (`torch.FloatTensor` of shape `(batch_size, num_queries, output_dim)`, *optional*):
                Dense targets at the queries. Values at masked queries are ignored; fill them with -100 to keep the
                loss exact under `Trainer`'s gradient accumulation (it counts label entries that are not -100).
            num_items_in_batch: as in [`PerceiverForSequenceClassification.forward`].
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = super().forward(inputs, attention_mask, queries, query_mask, latents, output_attentions,
                              output_hidden_states, return_dict=True)
        if labels is not None:
            out.loss = dense_regression_loss(out.logits, labels, query_mask, num_items_in_batch)
        return out if return_dict else out.to_tuple()


class PerceiverForMaskedLM(PerceiverPreTrainedModel):
    r"""
    Perceiver IO masked language model: token ids are embedded with positions ([`PerceiverTextAdapter`]), encoded
    into the latents, and decoded with one learned query per position ([`PerceiverDecoder`] with
    `config.max_position_embeddings` queries); a LayerNorm + Linear gives vocabulary logits, the Linear tied to the
    input embedding when `config.tie_word_embeddings`.

    Works with `pipeline("fill-mask")` and transformers' byte-level `PerceiverTokenizer` (`vocab_size=262`).
    """

    main_input_name = "input_ids"
    accepts_loss_kwargs = True
    _tied_weights_keys = {"lm_head.weight": "input_adapter.token_embeddings.weight"}
    _hub_auto_class = "AutoModelForMaskedLM"
    _hub_pipeline_tag = "fill-mask"
    _hub_card_fields = ("vocab_size", "max_position_embeddings", "tie_word_embeddings", "query_dim", "output_dim")

    def __init__(self, config: PerceiverConfig):
        super().__init__(config)
        width = _pin_adapter_width(config, type(self).__name__)
        out_width = config.output_dim or config.decoder_query_dim
        if config.tie_word_embeddings and out_width != width:
            raise ValueError(
                f"Tied word embeddings need the decoder output width ({out_width}: `output_dim`, else `query_dim`, "
                f"else `latent_dim`) to equal the embedding width ({width}: `input_dim`, else `latent_dim`); set them "
                "equal or `tie_word_embeddings=False`."
            )
        self.input_adapter = PerceiverTextAdapter(config, width)
        self.perceiver = PerceiverModel(config, input_dims=config.input_dims)
        self.decoder = PerceiverDecoder(config, num_queries=config.max_position_embeddings)
        self.lm_norm = nn.LayerNorm(out_width, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(out_width, config.vocab_size)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.input_adapter.token_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.input_adapter.token_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.lm_head = new_embeddings

    def forward_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, latents: Tensor | None = None,
                         output_attentions: bool | None = None,
                         output_hidden_states: bool | None = None) -> PerceiverIOOutput:
        """Embed, encode and decode: `logits` holds one decoder output per position (zero at padding)."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        tokens = self.input_adapter(input_ids)
        queries = self.decoder.queries[: input_ids.shape[1]]
        return perceiver_io_forward(
            self.perceiver, self.decoder, tokens, attention_mask, queries, attention_mask, latents, output_attentions,
            output_hidden_states,
        )

    def forward_head(self, decoded: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Vocabulary logits `(batch, seq_len, vocab_size)` from the decoder outputs; exactly zero at padding."""
        logits = self.lm_head(self.lm_norm(decoded))
        if attention_mask is not None:
            logits = logits.masked_fill((attention_mask == 0)[..., None], 0.0)
        return logits

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        latents: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: Tensor | int | None = None,
    ) -> MaskedLMOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Token ids in `[0, config.vocab_size)`, at most `config.max_position_embeddings` of them.
            attention_mask (`torch.LongTensor` or `torch.BoolTensor` of shape `(batch_size, seq_len)`, *optional*):
                1/True = real token, 0/False = padding (as tokenizers return it). Padded positions are not attended
                to, get zero logits and never count in the loss.
            labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Token ids to predict; -100 = not predicted.
            latents, output_attentions, output_hidden_states, return_dict: as in [`PerceiverModel.forward`].
            num_items_in_batch: as in [`PerceiverForSequenceClassification.forward`].
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        io = self.forward_features(input_ids, attention_mask, latents, output_attentions, output_hidden_states)
        logits = self.forward_head(io.logits, attention_mask)
        loss = None if labels is None else masked_lm_loss(logits, labels, attention_mask, num_items_in_batch)
        out = MaskedLMOutput(loss=loss, logits=logits, hidden_states=io.hidden_states, attentions=io.attentions)
        return out if return_dict else out.to_tuple()


__all__ = [
    "PerceiverPreTrainedModel",
    "PerceiverEncoder",
    "PerceiverModel",
    "PerceiverModelOutput",
    "PerceiverDecoder",
    "PerceiverIOModel",
    "PerceiverIOOutput",
    "PerceiverIOForRegression",
    "PerceiverClassificationHead",
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassification",
    "PerceiverForMaskedLM",
    "classification_loss",
    "dense_regression_loss",
    "masked_lm_loss",
    "perceiver_io_forward",
]

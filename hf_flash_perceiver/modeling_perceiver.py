"""Perceiver and Perceiver IO models on fused attention, as transformers `PreTrainedModel`s: the pretrained base,
the encoder model, the Perceiver IO model and the task heads. Heads are thin: each adapts its input, runs the shared
[`PerceiverModel`] and reads the latents out; every layer lives in `layers.py` / `encoder.py` / `decoder.py`."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput, MaskedLMOutput, SequenceClassifierOutput
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

try:  # FSDP2's module type: torch >= 2.6, built with torch.distributed
    from torch.distributed.fsdp import FSDPModule
except ImportError:
    FSDPModule = None

from .attention_backends import check_attn_implementation, check_backend_dropout
from .configuration_perceiver import PerceiverConfig
from .decoder import PerceiverClassificationHead, PerceiverDecoder, output_norm
from .encoder import PerceiverEncoder, drop_tokens
from .hub_perceiver import PerceiverHubMixin
from .input_adapters import PerceiverFlowAdapter, PerceiverImageAdapter, PerceiverTextAdapter, image_adapter_width
from .input_preparation import InputsType, MaskType, expand_tokens, prepare_inputs
from .layers import PerceiverAttention, PerceiverBlock, PerceiverRotaryEmbedding
from .losses import (
    EarlyCheck,
    classification_loss,
    dense_regression_loss,
    early_label_check,
    early_token_check,
    flow_endpoint_error,
    masked_lm_loss,
)


@dataclass
class PerceiverModelOutput(ModelOutput):
    r"""
    Output of [`PerceiverModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_latents, latent_dim)`):
            The final latents.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
            The latents entering the first block, then after every attention block:
            `1 + depth * (1 + self_per_cross_attn * latent_stack_repeats)` tensors of shape `(batch_size, num_latents, latent_dim)`.
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
    # Recorded by hooks while `output_hidden_states` / `output_attentions` are asked for (transformers' output
    # capturing): the latents entering the first encoder block and leaving every one, and every encoder attention
    # map in execution order (cross_0, self_0_0, ..., cross_1, ...).
    _can_record_outputs = {
        "hidden_states": OutputRecorder(PerceiverBlock, index=0, layer_name="encoder"),
        "attentions": OutputRecorder(PerceiverAttention, index=1, layer_name="encoder"),
    }

    def _check_and_adjust_attn_implementation(self, attn_implementation: str | None, *args, **kwargs) -> str:
        # Our own dispatch table decides, so that an unknown name or a missing flash-attn fails with our message
        # (naming the install command) before transformers' check, which may try a Hub kernel instead. A backend
        # without attention dropout is refused here, when it is chosen, not at the first padded batch.
        name = check_attn_implementation(attn_implementation)
        check_backend_dropout(name, self.config)
        return name

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        name = check_attn_implementation(requested_attention)
        check_backend_dropout(name, self.config)
        return name

    def get_input_embeddings(self) -> nn.Module | None:
        r"""
        Returns the module that turns the model's input into the tokens the encoder cross-attends to.

        Returns:
            `nn.Module` or `None`: the input adapter of a head that has one (for images the patch embedding with its
            positions, as vision models in transformers return theirs); `None` for models that read raw features,
            which have no input embedding. [`PerceiverForMaskedLM`] returns its token embedding instead.

        transformers' default raises `NotImplementedError` here; accelerate's FSDP2 preparation (which shards this
        module as its own unit), `enable_input_require_grads` and PEFT all accept `None`.
        """
        adapter = getattr(self, "input_adapter", None)
        return adapter if isinstance(adapter, nn.Module) else None

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        r"""
        As [`PreTrainedModel.save_pretrained`]. Under FSDP2 (`fully_shard`) the model's class is torch's wrapper
        subclass `FSDP<ClassName>`, defined in torch: while saving, the model is seen as its own class, so that a model
        registered with `register_for_auto_class` saves this package's code and an `auto_map` naming its class (not
        torch's files and the wrapper).
        """
        if FSDPModule is None or not isinstance(self, FSDPModule):
            return super().save_pretrained(save_directory, *args, **kwargs)
        wrapper = type(self)
        self.__class__ = next(c for c in wrapper.__mro__ if not issubclass(c, FSDPModule))
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.__class__ = wrapper

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, and:

        - a checkpoint of transformers' own Perceiver (`model_type: "perceiver"`: `deepmind/language-perceiver`,
          `deepmind/vision-perceiver-*`, `deepmind/optical-flow-perceiver`, fine-tuned ones) is converted on load,
          config and weights, onto this package's class (see `transformers_conversion.py`); `save_pretrained` then
          writes this package's format;
        - a truncated or corrupt weights file is reported by name (safetensors' own error does not say which file
          it was reading).
        """
        if not isinstance(kwargs.get("config"), PerceiverConfig):
            if _source_model_type(pretrained_model_name_or_path, kwargs) == "perceiver":
                from .transformers_conversion import load_transformers_checkpoint

                return load_transformers_checkpoint(cls, pretrained_model_name_or_path, *args, **kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            where = str(pretrained_model_name_or_path)
            if os.path.isdir(where):
                files = sorted(glob.glob(os.path.join(where, "*.safetensors")))
                where = ", ".join(files) or where
            raise ValueError(
                f"Could not read the weights in {where}: {error}. The file is truncated or not a safetensors file; "
                "save or download the checkpoint again."
            ) from error

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


# from_pretrained keyword arguments that locate a checkpoint's config.json (the rest configure the model).
_CONFIG_LOOKUP_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def _source_model_type(pretrained_model_name_or_path, kwargs: dict) -> str | None:
    """The `model_type` in a checkpoint's config.json, or None when it cannot be read here (from_pretrained then
    reports the problem itself)."""
    lookup = {k: kwargs[k] for k in _CONFIG_LOOKUP_KWARGS if k in kwargs}
    try:
        config_dict, _ = PerceiverConfig.get_config_dict(pretrained_model_name_or_path, **lookup)
    except (OSError, ValueError):
        return None
    return config_dict.get("model_type")


def _wants_attentions(config: PerceiverConfig, kwargs: dict) -> bool:
    """`output_attentions` of this call, else the config's: the layers compute maps only when asked."""
    value = kwargs.get("output_attentions")
    return bool(config.output_attentions if value is None else value)


class PerceiverModel(PerceiverPreTrainedModel):
    r"""
    The bare Perceiver encoder: learned latents cross-attend to the inputs and refine themselves by self-attention.

    Args:
        config ([`PerceiverConfig`]): the model configuration. `config.input_dim` must be set (raw features).
        input_dims (`list[int]`, *optional*): used by heads whose input adapter sets the width; leave unset.
    """

    # `AutoModel` on a head's checkpoint gives this encoder (the README's way to reuse one); the head's own weights
    # are expected to be left out, not reported as a table of unexpected keys.
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)(head|input_adapter|decoder|lm_norm|lm_head)\."]

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
        """The learned latents (or `latents`) for a batch, with `latent_drop` applied in training."""
        if latents is None:
            if self.latents is None:
                raise ValueError("The model has no learned latents (`num_latents=None`): pass `latents`.")
            latents = self.latents
        latents = expand_tokens(latents, batch_size, self.config.latent_dim, "latents", self.dtype)
        if self.training and self.config.latent_drop > 0:
            latents = drop_tokens(latents, self.config.latent_drop)
        return latents

    @capture_outputs
    def forward(
        self,
        inputs: InputsType,
        attention_mask: MaskType = None,
        latents: Tensor | None = None,
        **kwargs,
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
        contexts = prepare_inputs(
            self.config, self.encoder.input_dims, inputs, attention_mask, self.dtype, self.encoder.zero_tokens
        )
        latents = self.prepare_latents(latents, contexts[0].tokens.shape[0])
        hidden = self.encoder(latents, contexts, output_attentions=_wants_attentions(self.config, kwargs))
        return PerceiverModelOutput(last_hidden_state=hidden)


def encode_decode(
    perceiver: PerceiverModel,
    decoder: PerceiverDecoder,
    inputs: InputsType,
    attention_mask: MaskType = None,
    *,
    queries: Tensor | None = None,
    query_mask: Tensor | None = None,
    latents: Tensor | None = None,
    **kwargs,
) -> PerceiverIOOutput:
    """Encode `inputs` into latents, then decode them at `queries`: the forward every Perceiver IO head shares."""
    enc = perceiver(inputs, attention_mask, latents, return_dict=True, **kwargs)
    wants_attentions = _wants_attentions(perceiver.config, kwargs)
    logits, weights = decoder(enc.last_hidden_state, queries, query_mask, output_attentions=wants_attentions)
    return PerceiverIOOutput(
        logits=logits,
        last_hidden_state=enc.last_hidden_state,
        hidden_states=enc.hidden_states,
        attentions=enc.attentions,
        cross_attentions=(weights,) if wants_attentions else None,
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

    @can_return_tuple
    def forward(
        self,
        inputs: InputsType,
        attention_mask: MaskType = None,
        queries: Tensor | None = None,
        query_mask: Tensor | None = None,
        latents: Tensor | None = None,
        **kwargs,
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
        return encode_decode(
            self.perceiver, self.decoder, inputs, attention_mask, queries=queries, query_mask=query_mask, latents=latents,
            **kwargs,
        )


def _pin_adapter_width(config: PerceiverConfig, head: str, width: int | None = None) -> int:
    """The width of an input adapter's tokens: `width` when the adapter fixes it (images without a projection,
    optical flow), else `config.input_dim`, or `latent_dim` when unset.

    The width is written back into the config so that the checkpoint's encoder loads on its own: `AutoModel` gives
    a [`PerceiverModel`], which reads `config.input_dim` (the adapter's tokens are its raw features).
    """
    if isinstance(config.input_dim, list):
        raise ValueError(
            f"{head} feeds one input adapter to every cross-attention block, so `input_dim` must be an int or None, "
            f"got the list {config.input_dim}."
        )
    if width is not None and config.input_dim not in (None, width):
        raise ValueError(
            f"{head}'s input adapter makes tokens of width {width}, but the config sets `input_dim={config.input_dim}`: "
            "leave `input_dim` unset (it is derived from the adapter settings)."
        )
    if config.input_dim is None:
        config.input_dim = config.latent_dim if width is None else width
    return config.input_dim


class _ClassifierMixin:
    """Shared by the classification heads: pool + classify the latents, loss by problem type."""

    def forward_head(self, latents: Tensor) -> Tensor:
        """Pool and classify final latents: `(batch, num_labels)` logits."""
        return self.head(latents)

    def _classify(self, enc: PerceiverModelOutput, labels: Tensor | None, num_items_in_batch,
                  output_class: type[ModelOutput], early: EarlyCheck | None) -> ModelOutput:
        # `early`: the labels' value check, started before the forward (losses.early_label_check).
        logits = self.forward_head(enc.last_hidden_state)
        loss = None if labels is None else classification_loss(self.config, logits, labels, num_items_in_batch,
                                                               early)
        return output_class(loss=loss, logits=logits, hidden_states=enc.hidden_states, attentions=enc.attentions)


class PerceiverForSequenceClassification(_ClassifierMixin, PerceiverPreTrainedModel):
    r"""
    Perceiver with a classification head over the pooled latents (`config.pooling`: `"average"`, `"first"`,
    `"concat"` or `"query"`). Takes raw features (`inputs`), like [`PerceiverModel`], or with `config.text_input`
    token ids (`input_ids`) through a [`PerceiverTextAdapter`] (token + position embeddings), as transformers'
    `PerceiverForSequenceClassification` (and `pipeline("text-classification")`) does.

    `labels` give a loss by `config.problem_type` (single-label cross-entropy, multi-label BCE or regression MSE,
    inferred as transformers does when unset).
    """

    accepts_loss_kwargs = True
    _hub_auto_class = "AutoModelForSequenceClassification"
    _hub_card_fields = ("pooling", "num_labels", "problem_type")

    def __init__(self, config: PerceiverConfig, input_dims: list[int] | None = None):
        super().__init__(config)
        self.num_labels = config.num_labels
        if config.text_input:
            width = _pin_adapter_width(config, type(self).__name__)
            self.input_adapter = PerceiverTextAdapter(config, width)
            self.main_input_name = "input_ids"
            input_dims = config.input_dims
        else:
            self.input_adapter = None
        self.perceiver = PerceiverModel(config, input_dims)
        self.head = PerceiverClassificationHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module | None:
        return None if self.input_adapter is None else self.input_adapter.token_embeddings

    def forward_features(
        self, inputs: InputsType, attention_mask: MaskType = None, latents: Tensor | None = None, **kwargs
    ) -> PerceiverModelOutput:
        """The encoder's output (final latents) for `inputs` (token ids with `config.text_input`)."""
        if self.input_adapter is not None:
            inputs = self.input_adapter(inputs)
        return self.perceiver(inputs, attention_mask, latents, return_dict=True, **kwargs)

    @can_return_tuple
    def forward(
        self,
        inputs: InputsType = None,
        attention_mask: MaskType = None,
        latents: Tensor | None = None,
        labels: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        input_ids: Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        r"""
        Args:
            inputs, attention_mask, latents: as in [`PerceiverModel.forward`].
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*):
                Token ids, with `config.text_input` (the same as passing them as `inputs`).
            labels (`torch.LongTensor` of shape `(batch_size,)` or `torch.FloatTensor`, *optional*):
                Class ids (single-label, -100 ignored), float multi-hot `(batch_size, num_labels)` (multi-label) or
                float targets `(batch_size, num_labels)` (regression).
            num_items_in_batch (`int` or `torch.Tensor`, *optional*):
                Labelled items in the whole (gradient-accumulated) batch; `Trainer` passes it so that the loss is
                exact under gradient accumulation.
            output_attentions, output_hidden_states, return_dict: as in [`PerceiverModel.forward`].
        """
        if input_ids is not None:
            if self.input_adapter is None:
                raise ValueError(
                    "`input_ids` needs a model that embeds token ids (`config.text_input=True`); this one reads raw "
                    "features: pass them as `inputs`."
                )
            if inputs is not None:
                raise ValueError("Pass the token ids once: as `input_ids` or as `inputs`, not both.")
            inputs = input_ids
        if inputs is None:
            raise ValueError(f"{type(self).__name__} needs `{self.main_input_name}`.")
        early = early_label_check(self.config, labels)
        enc = self.forward_features(inputs, attention_mask, latents, **kwargs)
        return self._classify(enc, labels, num_items_in_batch, SequenceClassifierOutput, early)


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
    _hub_card_fields = ("image_adapter", "num_channels", "image_size", "patch_size", "num_fourier_bands", "pooling",
                        "num_labels",
                        "problem_type")

    def __init__(self, config: PerceiverConfig):
        super().__init__(config)
        fixed = None if config.image_adapter == "linear" else image_adapter_width(config)
        width = _pin_adapter_width(config, type(self).__name__, fixed)
        self.num_labels = config.num_labels
        self.input_adapter = PerceiverImageAdapter(config, width)
        self.perceiver = PerceiverModel(config, input_dims=config.input_dims)
        self.head = PerceiverClassificationHead(config)
        self.post_init()

    def forward_features(self, pixel_values: Tensor, latents: Tensor | None = None, **kwargs) -> PerceiverModelOutput:
        """The encoder's output (final latents) for a batch of images."""
        tokens = self.input_adapter(pixel_values)
        return self.perceiver(tokens, None, latents, return_dict=True, **kwargs)

    @can_return_tuple
    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        latents: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        **kwargs,
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
        early = early_label_check(self.config, labels)
        enc = self.forward_features(pixel_values, latents, **kwargs)
        return self._classify(enc, labels, num_items_in_batch, ImageClassifierOutput, early)


class PerceiverIOForRegression(PerceiverIOModel):
    r"""
    Perceiver IO for dense prediction: [`PerceiverIOModel`] with an MSE loss against `labels` given at the queries,
    `(batch, num_queries, output_dim)`. Masked queries (`query_mask`) are excluded from the loss.
    """

    accepts_loss_kwargs = True

    @can_return_tuple
    def forward(
        self,
        inputs: InputsType,
        attention_mask: MaskType = None,
        queries: Tensor | None = None,
        query_mask: Tensor | None = None,
        latents: Tensor | None = None,
        labels: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        **kwargs,
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
        out = encode_decode(
            self.perceiver, self.decoder, inputs, attention_mask, queries=queries, query_mask=query_mask,
            latents=latents, **kwargs,
        )
        if labels is not None:
            out.loss = dense_regression_loss(out.logits, labels, query_mask, num_items_in_batch)
        return out


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
        self.lm_norm = output_norm(config, out_width)
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

    def forward_features(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, latents: Tensor | None = None, **kwargs
    ) -> PerceiverIOOutput:
        """Embed, encode and decode: `logits` holds one decoder output per position (zero at padding)."""
        tokens = self.input_adapter(input_ids)
        queries = self.decoder.queries[: input_ids.shape[1]]
        return encode_decode(
            self.perceiver, self.decoder, tokens, attention_mask, queries=queries, query_mask=attention_mask,
            latents=latents, **kwargs,
        )

    def forward_head(self, decoded: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Vocabulary logits `(batch, seq_len, vocab_size)` from the decoder outputs; exactly zero at padding."""
        logits = self.lm_head(self.lm_norm(decoded))
        if attention_mask is not None:
            logits = logits.masked_fill((attention_mask == 0)[..., None], 0.0)
        return logits

    @can_return_tuple
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        latents: Tensor | None = None,
        labels: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        **kwargs,
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
        early = early_token_check(labels, attention_mask, self.lm_head.out_features)
        io = self.forward_features(input_ids, attention_mask, latents, **kwargs)
        logits = self.forward_head(io.logits, attention_mask)
        loss = None if labels is None else masked_lm_loss(logits, labels, attention_mask, num_items_in_batch, early)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=io.hidden_states, attentions=io.attentions)


class PerceiverForOpticalFlow(PerceiverPreTrainedModel):
    r"""
    Perceiver IO optical flow: every pixel of a frame pair is a token ([`PerceiverFlowAdapter`]: the frames' values
    stacked per pixel, projected, with 2-D Fourier positions), the latents encode them, and the same tokens are the
    decoder's queries, one per pixel, decoded to 2 channels and divided by `config.flow_rescale_factor`: dense
    per-pixel output from a fixed-size latent array, the Perceiver IO showcase. transformers'
    `PerceiverForOpticalFlow` checkpoints (`deepmind/optical-flow-perceiver`) load into it.

    `labels` (flow in pixels) give the average end-point error as the loss.
    """

    main_input_name = "pixel_values"
    _hub_card_fields = ("num_channels", "num_frames", "image_embed_dim", "num_fourier_bands", "fourier_max_resolution",
                        "flow_rescale_factor")

    def __init__(self, config: PerceiverConfig):
        super().__init__(config)
        self.input_adapter = PerceiverFlowAdapter(config)
        width = _pin_adapter_width(config, type(self).__name__, self.input_adapter.width)
        # The queries are the input tokens themselves.
        if config.query_dim not in (None, width):
            raise ValueError(
                f"PerceiverForOpticalFlow decodes at its input tokens, of width {width}: `query_dim` must be unset or "
                f"{width}, got {config.query_dim}."
            )
        config.query_dim = width
        if config.output_dim is None:
            config.output_dim = 2
        self.perceiver = PerceiverModel(config, input_dims=config.input_dims)
        self.decoder = PerceiverDecoder(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: Tensor,
        labels: Tensor | None = None,
        latents: Tensor | None = None,
        **kwargs,
    ) -> PerceiverIOOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_frames, num_channels, height, width)`):
                The frames (for transformers' checkpoints: 2 frames of 3x3 patches of RGB, 27 channels, as its
                processing examples extract them).
            labels (`torch.FloatTensor` of shape `(batch_size, height, width, 2)`, *optional*):
                True flow in pixels; the loss is the average end-point error.
            latents, output_attentions, output_hidden_states, return_dict: as in [`PerceiverModel.forward`].

        Returns:
            [`PerceiverIOOutput`] whose `logits` are the flow `(batch_size, height, width, 2)` in pixels.
        """
        tokens = self.input_adapter(pixel_values)
        out = encode_decode(self.perceiver, self.decoder, tokens, None, queries=tokens, latents=latents, **kwargs)
        out.logits = (out.logits / self.config.flow_rescale_factor).unflatten(1, tuple(pixel_values.shape[-2:]))
        if labels is not None:
            out.loss = flow_endpoint_error(out.logits, labels)
        return out


__all__ = [
    "PerceiverPreTrainedModel",
    "PerceiverModel",
    "PerceiverModelOutput",
    "PerceiverIOModel",
    "PerceiverIOOutput",
    "PerceiverIOForRegression",
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassification",
    "PerceiverForMaskedLM",
    "PerceiverForOpticalFlow",
]

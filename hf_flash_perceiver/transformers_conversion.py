"""Load transformers' own Perceiver checkpoints (model_type `"perceiver"`) into this package's models.

transformers ships a Perceiver of its own (`transformers.PerceiverForMaskedLM` & co., the `deepmind/*-perceiver`
checkpoints). Its blocks compute what this package's blocks compute with `gated_mlp=False`, `cross_qkv_bias=True`,
`latent_qkv_bias=True`, `output_norm=False` and the learned decoder queries of its heads, so its checkpoints are
converted on load rather than re-trained:

- the config by [`config_from_transformers`] (field by field, the architecture chosen by `config.architectures[0]`);
- the weights by transformers' own loading machinery: a conversion mapping of `WeightRenaming`s (key renames) and
  `WeightConverter`s (the separate query/key/value projections concatenated into this package's fused ones, the
  learned image positions projected once) registered with `register_checkpoint_conversion_mapping`, so that sharded,
  safetensors / `.bin`, Hub and local checkpoints, `dtype=` and `device_map=` all load as usual.

[`load_transformers_checkpoint`] is what `PerceiverPreTrainedModel.from_pretrained` calls for such a checkpoint;
`save_pretrained` afterwards writes this package's format (model_type `"flash_perceiver"`). The command
`convert-transformers-perceiver SRC DST` ([`main`]) does the same offline and copies the tokenizer / image-processor
files next to the converted weights, so that `pipeline(...)` works on DST after `import hf_flash_perceiver`.

This module also ships as Hub remote code next to the modeling file: it stays flat, imports package modules with
single-dot relative imports only, and imports `modeling_perceiver` lazily (which imports this module lazily too).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, ConversionOps, WeightConverter, WeightRenaming
from transformers.utils import logging

from .configuration_perceiver import PerceiverConfig


logger = logging.get_logger(__name__)

TRANSFORMERS_MODEL_TYPE = "perceiver"

# transformers architecture -> this package's class. `PerceiverForMultimodalAutoencoding` (video + audio + label
# autoencoding with per-modality padding and subsampled decoding) has no counterpart here and is refused.
ARCHITECTURES: dict[str, str] = {
    "PerceiverModel": "PerceiverModel",
    "PerceiverForMaskedLM": "PerceiverForMaskedLM",
    "PerceiverForSequenceClassification": "PerceiverForSequenceClassification",
    "PerceiverForImageClassificationLearned": "PerceiverForImageClassification",
    "PerceiverForImageClassificationFourier": "PerceiverForImageClassification",
    "PerceiverForImageClassificationConvProcessing": "PerceiverForImageClassification",
    "PerceiverForOpticalFlow": "PerceiverForOpticalFlow",
}
_CLASSIFIERS = (
    "PerceiverForSequenceClassification",
    "PerceiverForImageClassificationLearned",
    "PerceiverForImageClassificationFourier",
    "PerceiverForImageClassificationConvProcessing",
)

# Constants transformers hard-codes in its head classes (not in its config), with the input width each preprocessor
# gives: the encoder's cross-attention key/value width.
_FOURIER_BANDS = 64  # every Fourier preprocessor: 64 bands per axis, sin and cos, positions concatenated
_FOURIER_WIDTH = 2 * (2 * _FOURIER_BANDS + 1)  # 258 for 2 axes
_LEARNED_EMBED, _LEARNED_POSITIONS = 256, 256  # conv1x1 to 256 channels + a 256-wide learned table (projected)
_PIXELS_MAX_RESOLUTION = [224, 224]  # PerceiverForImageClassificationFourier
_CONV_EMBED, _CONV_MAX_RESOLUTION = 64, [56, 56]  # PerceiverForImageClassificationConvProcessing
_FLOW_EMBED, _FLOW_CHANNELS, _FLOW_FRAMES, _FLOW_RESCALE = 64, 27, 2, 100.0  # 3x3 patches x 3 colours per frame
_MLM_QUERY_HEADS, _MLM_QUERY_HEAD_DIM = 8, 32  # the masked LM decoder: qk_channels = 8 * 32, v_channels = d_model

# Files of the tokenizer / image processor that the converter copies next to the converted model: transformers reads
# them by these names (tokenizer_config.json and preprocessor_config.json name their class, so `AutoTokenizer` /
# `AutoImageProcessor` need nothing from the model config).
PROCESSOR_FILES: tuple[str, ...] = (
    "preprocessor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.json",
    "chat_template.jinja",
)
_WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")

# Config fields a `from_pretrained(..., field=value)` call may override on the converted config, besides this
# package's own fields (transformers' loader hands unknown kwargs to the model's __init__ when a config is given).
_COMMON_CONFIG_OVERRIDES = ("num_labels", "id2label", "label2id", "problem_type", "output_hidden_states",
                            "output_attentions", "return_dict")


# --------------------------------------------------------------------------------------------------------- config


def _transformers_config(config: PreTrainedConfig | dict[str, Any]) -> PreTrainedConfig:
    """transformers' `PerceiverConfig` for a config or its dict. `save_pretrained` writes only the fields that differ
    from the defaults, so a dict is completed by transformers' own class (its defaults are the checkpoint's)."""
    from transformers import PerceiverConfig as TransformersPerceiverConfig

    if isinstance(config, dict):
        model_type = config.get("model_type")
        if model_type != TRANSFORMERS_MODEL_TYPE:
            raise ValueError(
                f"Expected a transformers Perceiver config (model_type {TRANSFORMERS_MODEL_TYPE!r}), got model_type "
                f"{model_type!r}."
            )
        return TransformersPerceiverConfig.from_dict(config)
    if getattr(config, "model_type", None) != TRANSFORMERS_MODEL_TYPE:
        raise ValueError(
            f"Expected a transformers Perceiver config (model_type {TRANSFORMERS_MODEL_TYPE!r}), got "
            f"{type(config).__name__} with model_type {getattr(config, 'model_type', None)!r}."
        )
    return config


def _architecture(src: PreTrainedConfig) -> str:
    architectures = getattr(src, "architectures", None) or []
    if not architectures:
        raise ValueError(
            "This transformers Perceiver config has no `architectures` entry, so it does not say which head its "
            f"weights belong to (transformers writes it on save). Set `architectures` to one of {sorted(ARCHITECTURES)}."
        )
    arch = architectures[0]
    if arch == "PerceiverForMultimodalAutoencoding":
        raise ValueError(
            "transformers' PerceiverForMultimodalAutoencoding (video + audio + label autoencoding) cannot be converted: "
            "hf-flash-perceiver has no multimodal preprocessor / decoder. Convertible architectures: "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"Unknown transformers Perceiver architecture {arch!r}: it cannot be converted. Convertible architectures: "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    return arch


def _per_head(width: int, heads: int, what: str) -> int:
    # transformers refuses these at construction too; a hand-edited config would otherwise fail deep in the model.
    if width % heads:
        raise ValueError(f"The {what} width {width} is not divisible by its {heads} heads: not a valid Perceiver config.")
    return width // heads


def _input_width(arch: str, src: PreTrainedConfig) -> int:
    """The width of the tokens the encoder cross-attends to (transformers' `kv_dim`: its preprocessor's
    `num_channels`, else `d_model`)."""
    if arch == "PerceiverForImageClassificationLearned":
        return _LEARNED_EMBED + _LEARNED_POSITIONS
    if arch == "PerceiverForImageClassificationFourier":
        return 3 + _FOURIER_WIDTH
    if arch == "PerceiverForImageClassificationConvProcessing":
        return _CONV_EMBED + _FOURIER_WIDTH
    if arch == "PerceiverForOpticalFlow":
        return _FLOW_EMBED + _FOURIER_WIDTH
    return src.d_model


def config_from_transformers(config: PreTrainedConfig | dict[str, Any]) -> tuple[PerceiverConfig, str]:
    r"""
    Convert a transformers Perceiver config into this package's config.

    Args:
        config (`transformers.PerceiverConfig` or `dict`):
            transformers' config (model_type `"perceiver"`), or its `config.json` as a dict. `architectures[0]` picks
            the head (transformers' class name).

    Returns:
        `tuple[PerceiverConfig, str]`: the equivalent config, and the name of this package's class that loads the
        checkpoint (`"PerceiverForMaskedLM"`, `"PerceiverForSequenceClassification"`,
        `"PerceiverForImageClassification"`, `"PerceiverForOpticalFlow"` or `"PerceiverModel"`).

    Raises:
        `ValueError`: for another model type, a missing or unknown architecture,
        `PerceiverForMultimodalAutoencoding`, an activation other than GELU, or a config transformers itself cannot
        run (self-attention values narrower or wider than the latents, widths not divisible by the heads).

    Example:

    ```python
    >>> from transformers import PerceiverConfig as TransformersPerceiverConfig
    >>> from hf_flash_perceiver.transformers_conversion import config_from_transformers

    >>> src = TransformersPerceiverConfig(architectures=["PerceiverForSequenceClassification"], d_latents=64)
    >>> config, class_name = config_from_transformers(src)
    >>> class_name, config.latent_dim, config.text_input
    ('PerceiverForSequenceClassification', 64, True)
    ```
    """
    src = _transformers_config(config)
    arch = _architecture(src)
    if src.hidden_act != "gelu":
        raise ValueError(
            f"This transformers Perceiver uses hidden_act={src.hidden_act!r}; hf-flash-perceiver's MLP is GELU only "
            "(transformers' default), so the checkpoint cannot be converted exactly."
        )
    if src.num_self_attends_per_block < 1:
        raise ValueError(
            "This transformers Perceiver has no self-attention layers (num_self_attends_per_block=0); "
            "hf-flash-perceiver needs at least one per block."
        )
    shape = src.cross_attention_shape_for_attention
    if shape not in ("kv", "q"):
        raise ValueError(f"Unknown cross_attention_shape_for_attention {shape!r} (transformers accepts 'kv' or 'q').")
    d_latents = src.d_latents
    kv_dim = _input_width(arch, src)

    # Encoder cross-attention: queries/keys `qk_channels`, else the keys' width ("kv") or the latents' ("q");
    # values `v_channels`, else the qk width. Its output projection maps back to the latents.
    cross_qk = src.qk_channels or (kv_dim if shape == "kv" else d_latents)
    cross_v = src.v_channels or cross_qk
    # Self-attention: qk `qk_channels` else the latent width, v `v_channels` else qk. transformers' output projection
    # maps v -> v and adds the latents: only v == d_latents runs there at all.
    self_qk = src.qk_channels or d_latents
    self_v = src.v_channels or self_qk
    if self_v != d_latents:
        raise ValueError(
            f"This transformers Perceiver's self-attention value width ({self_v}: v_channels, else qk_channels) differs "
            f"from d_latents ({d_latents}); transformers' own model cannot run it (its self-attention output is added "
            "to the latents), so there is nothing to convert."
        )

    fields: dict[str, Any] = dict(
        input_dim=kv_dim,
        depth=1,
        num_latents=src.num_latents,
        latent_dim=d_latents,
        self_per_cross_attn=src.num_self_attends_per_block,
        latent_stack_repeats=src.num_blocks,
        cross_heads=src.num_cross_attention_heads,
        cross_head_dim=_per_head(cross_qk, src.num_cross_attention_heads, "cross-attention query/key"),
        cross_v_head_dim=_per_head(cross_v, src.num_cross_attention_heads, "cross-attention value"),
        cross_query_residual=bool(src.use_query_residual),
        cross_mlp_ratio=src.cross_attention_widening_factor,
        latent_heads=src.num_self_attention_heads,
        latent_head_dim=_per_head(self_qk, src.num_self_attention_heads, "self-attention query/key"),
        latent_v_head_dim=_per_head(self_v, src.num_self_attention_heads, "self-attention value"),
        mlp_ratio=src.self_attention_widening_factor,
        query_mlp_ratio=1,  # transformers' decoders use widening_factor=1
        gated_mlp=False,
        mlp_residual=True,
        cross_input_norm=True,
        cross_qkv_bias=True,
        latent_qkv_bias=True,
        # transformers' LayerNorms are built without eps (torch's 1e-5); its `config.layer_norm_eps` is unused.
        layer_norm_eps=1e-5,
        cross_attn_dropout=src.attention_probs_dropout_prob,
        latent_attn_dropout=src.attention_probs_dropout_prob,
        query_attn_dropout=src.attention_probs_dropout_prob,
        output_norm=False,
        initializer_range=src.initializer_range,
        vocab_size=src.vocab_size,
        max_position_embeddings=src.max_position_embeddings,
        num_labels=src.num_labels,
        id2label=dict(src.id2label) if src.id2label is not None else None,
        label2id=dict(src.label2id) if src.label2id is not None else None,
        problem_type=src.problem_type,
        # from_pretrained's default dtype="auto" reads it: the converted model loads in the source's dtype.
        dtype=getattr(src, "dtype", None),
        architectures=[ARCHITECTURES[arch]],
    )
    if arch in _CLASSIFIERS:
        # PerceiverClassificationDecoder: one learned query of width d_latents, one head, qk/v width d_latents
        # ("kv": the latents' width; "q": the query's, the same), query residual, no output LayerNorm.
        fields.update(pooling="query", query_heads=1, query_head_dim=d_latents, query_residual=True,
                      classifier_dropout=0.0)
    if arch == "PerceiverForSequenceClassification":
        fields.update(text_input=True)
    elif arch == "PerceiverForImageClassificationLearned":
        if not isinstance(src.image_size, int):
            raise ValueError(
                f"PerceiverForImageClassificationLearned needs an int config.image_size (its table has image_size**2 "
                f"positions), got {src.image_size!r}."
            )
        fields.update(image_adapter="conv1x1", image_embed_dim=_LEARNED_EMBED, image_position_dim=_LEARNED_POSITIONS,
                      num_fourier_bands=0, image_size=src.image_size, num_channels=3)
    elif arch == "PerceiverForImageClassificationFourier":
        fields.update(image_adapter="pixels", num_fourier_bands=_FOURIER_BANDS,
                      fourier_max_resolution=list(_PIXELS_MAX_RESOLUTION), image_size=224, num_channels=3)
    elif arch == "PerceiverForImageClassificationConvProcessing":
        fields.update(image_adapter="conv", image_embed_dim=_CONV_EMBED, num_fourier_bands=_FOURIER_BANDS,
                      fourier_max_resolution=list(_CONV_MAX_RESOLUTION), image_size=224, num_channels=3)
    elif arch == "PerceiverForMaskedLM":
        fields.update(
            query_dim=src.d_model,
            query_heads=_MLM_QUERY_HEADS,
            query_head_dim=_MLM_QUERY_HEAD_DIM,
            query_v_head_dim=_per_head(src.d_model, _MLM_QUERY_HEADS, "masked-LM decoder value (d_model)"),
            query_residual=False,
            output_dim=None,
            tie_word_embeddings=True,
        )
    elif arch == "PerceiverForOpticalFlow":
        train_size = list(src.train_size)
        if len(train_size) != 2:
            raise ValueError(f"PerceiverForOpticalFlow needs a 2-entry config.train_size, got {src.train_size!r}.")
        # The flow decoder queries with the encoder's inputs (width kv_dim): qk width d_latents ("kv") or kv_dim ("q").
        query_qk = d_latents if shape == "kv" else kv_dim
        fields.update(
            num_channels=_FLOW_CHANNELS,
            num_frames=_FLOW_FRAMES,
            image_embed_dim=_FLOW_EMBED,
            num_fourier_bands=_FOURIER_BANDS,
            fourier_max_resolution=train_size,
            query_dim=kv_dim,
            query_heads=1,
            query_head_dim=query_qk,
            query_residual=False,
            output_dim=2,
            flow_rescale_factor=_FLOW_RESCALE,
        )
    return PerceiverConfig(**fields), ARCHITECTURES[arch]


# -------------------------------------------------------------------------------------------------------- weights


class ProjectLearnedPositions(ConversionOps):
    """`PerceiverForImageClassificationLearned` stores a trainable position table and applies a Linear
    (`positions_projection`) to it on every forward; this package stores the projected table itself. Sources, in
    order: the table, the projection's weight, its bias; target: `table @ weight.T + bias`, computed in float32 at
    least (the loader casts sources to the target's dtype first; bf16 arithmetic would round more than transformers'
    float32 forward does)."""

    @torch.no_grad()
    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs
    ) -> dict[str, torch.Tensor]:
        table, weight, bias = (_single(input_dict[pattern], pattern) for pattern in source_patterns)
        dtype = torch.promote_types(table.dtype, torch.float32)
        projected = torch.nn.functional.linear(table.to(dtype), weight.to(dtype), bias.to(dtype))
        return {target_patterns[0]: projected.to(table.dtype)}

    @property
    def reverse_op(self) -> ConversionOps:
        raise NotImplementedError(
            "The projected learned positions cannot be split back into transformers' table and projection: converted "
            "models save in hf-flash-perceiver's own format only."
        )


def _single(value: Any, pattern: str) -> torch.Tensor:
    tensors = value if isinstance(value, list) else [value]
    if len(tensors) != 1:
        raise ValueError(f"Expected one checkpoint tensor for {pattern!r}, got {len(tensors)}.")
    return tensors[0]


def _rename(source: str, target: str, anchored: bool = False) -> WeightRenaming:
    # Sources are regexes: escape the literal names. Anchored ones start at the checkpoint's key (transformers' head
    # keys all start with `perceiver.`, except the masked LM's `embedding_decoder`).
    return WeightRenaming(("^" if anchored else "") + re.escape(source), target)


def _concat(sources: Sequence[str], target: str) -> WeightConverter:
    return WeightConverter([re.escape(s) for s in sources], target, operations=[Concatenate(dim=0)])


# The names inside every transformers `PerceiverLayer`, once its prefix is this package's block name. The q/k/v
# projections are left for the converters below (which of them fuse depends on the block kind).
_BLOCK_RENAMES = (
    ("attention.self.layernorm1.", "norm1."),
    ("attention.self.layernorm2.", "context_norm."),  # the cross-attention's input LayerNorm
    ("attention.output.dense.", "attn.o_proj."),
    (".layernorm.", ".norm2."),  # the LayerNorm before the MLP
    (".mlp.dense1.", ".mlp.fc1."),
    (".mlp.dense2.", ".mlp.fc2."),
)


def weight_mapping(architecture: str) -> list[WeightRenaming | WeightConverter]:
    r"""
    The conversion mapping from a transformers Perceiver checkpoint of `architecture` to this package's state dict.

    The loader applies every `WeightRenaming` in order (they chain), then at most one `WeightConverter` (the first
    that matches), then adds or strips the `perceiver.` base-model prefix as the target model needs. So the block
    prefixes are renamed first (`encoder.cross_attention.` -> `encoder.cross_layers.0.`, `encoder.self_attends.{i}.`
    -> `encoder.self_layers.0.{i}.`, the decoders' `decoding_cross_attention.` -> the head's block), then the names
    inside the blocks; the cross-attention blocks' separate key/value projections are concatenated into `kv_proj`
    (matched with their full block prefix, so that they are not taken for self-attention), and every remaining
    query/key/value triple (the self-attentions') into `qkv_proj`.

    Args:
        architecture (`str`): transformers' class name, as in `config.architectures[0]`.

    Returns:
        `list`: the transforms, to register with `register_checkpoint_conversion_mapping`.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"No weight mapping for transformers architecture {architecture!r}.")
    renames: list[WeightRenaming] = [
        # transformers: `perceiver.embeddings.latents` (`embeddings.latents` in a bare PerceiverModel).
        _rename("embeddings.latents", "latents"),
        _rename("encoder.cross_attention.", "encoder.cross_layers.0."),
        _rename("encoder.self_attends.", "encoder.self_layers.0."),
    ]
    cross_blocks = ["encoder.cross_layers.0."]
    if architecture in ("PerceiverForMaskedLM", "PerceiverForSequenceClassification"):
        renames += [
            _rename("perceiver.input_preprocessor.embeddings.", "input_adapter.token_embeddings.", anchored=True),
            _rename("perceiver.input_preprocessor.position_embeddings.", "input_adapter.position_embeddings.",
                    anchored=True),
        ]
    if architecture in _CLASSIFIERS:
        # PerceiverClassificationDecoder wraps a PerceiverBasicDecoder (`decoder.decoder.`).
        renames += [
            _rename("perceiver.decoder.decoder.output_position_encodings.position_embeddings", "head.query",
                    anchored=True),
            _rename("perceiver.decoder.decoder.decoding_cross_attention.", "head.query_block.", anchored=True),
            _rename("perceiver.decoder.decoder.final_layer.", "head.classifier.", anchored=True),
        ]
        cross_blocks.append("head.query_block.")
    elif architecture == "PerceiverForMaskedLM":
        # A PerceiverBasicDecoder directly (`decoder.`), one learned query per position, no final projection: the
        # logits are the decoder output times the (tied) token embedding, plus `embedding_decoder.bias`.
        renames += [
            _rename("perceiver.decoder.output_position_encodings.position_embeddings", "decoder.queries",
                    anchored=True),
            _rename("perceiver.decoder.decoding_cross_attention.", "decoder.block.", anchored=True),
            _rename("embedding_decoder.bias", "lm_head.bias", anchored=True),
        ]
        cross_blocks.append("decoder.block.")
    elif architecture == "PerceiverForOpticalFlow":
        # PerceiverOpticalFlowDecoder wraps a PerceiverBasicDecoder; its queries are the encoder's inputs.
        renames += [
            _rename("perceiver.input_preprocessor.conv_after_patches.", "input_adapter.proj.", anchored=True),
            _rename("perceiver.decoder.decoder.decoding_cross_attention.", "decoder.block.", anchored=True),
            _rename("perceiver.decoder.decoder.final_layer.", "decoder.proj.", anchored=True),
        ]
        cross_blocks.append("decoder.block.")
    if architecture == "PerceiverForImageClassificationLearned":
        renames.append(_rename("perceiver.input_preprocessor.convnet_1x1.", "input_adapter.conv.", anchored=True))
    elif architecture == "PerceiverForImageClassificationConvProcessing":
        # BatchNorm's running statistics and num_batches_tracked are buffers, renamed like its parameters.
        renames += [
            _rename("perceiver.input_preprocessor.convnet.conv.", "input_adapter.conv.", anchored=True),
            _rename("perceiver.input_preprocessor.convnet.batchnorm.", "input_adapter.batchnorm.", anchored=True),
        ]
    renames += [_rename(source, target) for source, target in _BLOCK_RENAMES]
    # The cross-attention blocks keep a separate query projection (a rename); the self-attentions' fuses below.
    renames += [_rename(f"{block}attention.self.query.", f"{block}attn.q_proj.") for block in cross_blocks]

    converters: list[WeightConverter] = []
    for param in ("weight", "bias"):
        for block in cross_blocks:
            converters.append(_concat(
                [f"{block}attention.self.key.{param}", f"{block}attention.self.value.{param}"],
                f"{block}attn.kv_proj.{param}",
            ))
        # Last: only the self-attention layers still have a query here (the cross blocks' was renamed above).
        converters.append(_concat(
            [f"attention.self.query.{param}", f"attention.self.key.{param}", f"attention.self.value.{param}"],
            f"attn.qkv_proj.{param}",
        ))
    if architecture == "PerceiverForImageClassificationLearned":
        prefix = "perceiver.input_preprocessor."
        converters.append(WeightConverter(
            ["^" + re.escape(prefix + name) for name in (
                "position_embeddings.position_embeddings", "positions_projection.weight", "positions_projection.bias"
            )],
            "input_adapter.position_embeddings.weight",
            operations=[ProjectLearnedPositions()],
        ))
    return [*renames, *converters]


# -------------------------------------------------------------------------------------------------------- loading

# Hub / cache arguments of `from_pretrained` that reading the source config.json needs too.
_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")
_LOADER_CLASSES: dict[tuple[type, str], type] = {}


def read_transformers_config(path_or_id: str | os.PathLike, **download_kwargs) -> dict[str, Any] | None:
    """The config.json of a checkpoint (local folder or Hub id) as a dict if it is a transformers Perceiver one
    (model_type `"perceiver"`), else None."""
    config_dict, _ = PreTrainedConfig.get_config_dict(
        path_or_id, **{k: v for k, v in download_kwargs.items() if k in _DOWNLOAD_KWARGS}
    )
    return config_dict if config_dict.get("model_type") == TRANSFORMERS_MODEL_TYPE else None


def _modeling():
    # Lazy: modeling_perceiver imports this module lazily as well (from `from_pretrained`).
    from . import modeling_perceiver

    return modeling_perceiver


def _loader_class(cls: type, architecture: str) -> type:
    """A subclass of `cls` under a private name, used for loading only.

    transformers looks conversion mappings up by class name (then model_type) for every `PreTrainedModel` in the
    model, and `save_pretrained` reverts the mapping it finds. Registering ours under this name only keeps both away
    from this package's real classes: the nested `PerceiverModel` (our custom code, unregistered) gets no scoped copy,
    and a model saved after loading (its class set back to `cls`) writes this package's format.
    """
    key = (cls, architecture)
    if key not in _LOADER_CLASSES:
        name = f"{cls.__name__}FromTransformers{architecture}"
        _LOADER_CLASSES[key] = type(name, (cls,), {"__module__": cls.__module__, "__qualname__": name,
                                                   "__doc__": cls.__doc__})
    return _LOADER_CLASSES[key]


def _target_class(cls: type, target_name: str, architecture: str) -> None:
    """Check that `cls` can hold the checkpoint: its own class, or `PerceiverModel` (the encoder of any head)."""
    modeling = _modeling()
    target = getattr(modeling, target_name, None)
    if target is None:
        raise ValueError(
            f"The transformers checkpoint is a {architecture}, which converts to {target_name}, but this version of "
            "hf-flash-perceiver has no such class."
        )
    if issubclass(cls, target) or issubclass(cls, modeling.PerceiverModel):
        return
    raise ValueError(
        f"This transformers checkpoint is a {architecture}: load it with hf_flash_perceiver.{target_name} (or "
        f"hf_flash_perceiver.PerceiverModel for its encoder alone), not {cls.__name__}."
    )


def _apply_config_overrides(config: PerceiverConfig, kwargs: dict[str, Any]) -> None:
    """Move `from_pretrained(..., field=value)` config overrides (e.g. `num_labels=5`) onto the converted config, as
    transformers does when it loads the config itself."""
    fields = set(PerceiverConfig.__annotations__) | set(_COMMON_CONFIG_OVERRIDES)
    for name in [k for k in kwargs if k in fields]:
        setattr(config, name, kwargs.pop(name))


def load_transformers_checkpoint(cls: type, pretrained_model_name_or_path: str | os.PathLike, *model_args,
                                 **kwargs) -> Any:
    r"""
    Load a transformers Perceiver checkpoint (model_type `"perceiver"`) into this package's class `cls`, converting
    config and weights on the way.

    The weights load through transformers' `from_pretrained` with a conversion mapping ([`weight_mapping`])
    registered for a private loading subclass of `cls`; the returned model is a plain `cls` and `save_pretrained`
    writes this package's format. One warning (transformers' logger) says that the checkpoint was converted.

    Args:
        cls (`type`):
            The class `from_pretrained` was called on: the class the checkpoint's architecture converts to (see
            [`config_from_transformers`]), or `PerceiverModel` for the encoder of any checkpoint (the head's weights
            are then left out).
        pretrained_model_name_or_path (`str` or `os.PathLike`):
            A local folder or a Hub id holding transformers' `config.json` and weights.
        model_args, kwargs:
            As for `from_pretrained` (`dtype`, `device_map`, `attn_implementation`, `output_loading_info`, Hub
            arguments, ...). `config` may be this package's config (used as is) or transformers' (converted); config
            fields passed as keywords (e.g. `num_labels`) override the converted config.

    Returns:
        The loaded `cls` model (with the loading info when `output_loading_info=True`).

    Raises:
        `ValueError`: when the checkpoint is not a transformers Perceiver, its architecture cannot be converted (see
        [`config_from_transformers`]), or `cls` is another head than the one the checkpoint holds.

    Example:

    ```python
    >>> from hf_flash_perceiver import PerceiverForMaskedLM
    >>> from hf_flash_perceiver.transformers_conversion import load_transformers_checkpoint

    >>> model = load_transformers_checkpoint(PerceiverForMaskedLM, "deepmind/language-perceiver")
    >>> model.save_pretrained("language-perceiver-flash")  # model_type "flash_perceiver"
    ```
    """
    if cls in _LOADER_CLASSES.values():
        raise RuntimeError(
            f"{cls.__name__}.from_pretrained was sent back to the transformers conversion: the loading subclass must "
            "load the converted config directly. This is a bug in hf-flash-perceiver; please report it."
        )
    given = kwargs.pop("config", None)
    source_dict = read_transformers_config(pretrained_model_name_or_path, **kwargs)
    if source_dict is None and not (isinstance(given, PreTrainedConfig) and given.model_type == TRANSFORMERS_MODEL_TYPE):
        raise ValueError(
            f"{pretrained_model_name_or_path} is not a transformers Perceiver checkpoint (its config.json has no "
            f"model_type {TRANSFORMERS_MODEL_TYPE!r})."
        )
    if isinstance(given, PerceiverConfig):
        # The caller's own config for the model; the checkpoint's architecture still picks the weight mapping.
        architecture = _architecture(_transformers_config(source_dict))
        config, target_name = given, ARCHITECTURES[architecture]
    elif given is None or (isinstance(given, PreTrainedConfig) and given.model_type == TRANSFORMERS_MODEL_TYPE):
        source = _transformers_config(source_dict if given is None else given)
        architecture = _architecture(source)
        config, target_name = config_from_transformers(source)
    else:
        raise TypeError(
            "`config` must be this package's PerceiverConfig or transformers' PerceiverConfig for a transformers "
            f"Perceiver checkpoint, got {type(given).__name__}."
        )
    _target_class(cls, target_name, architecture)
    _apply_config_overrides(config, kwargs)

    loader = _loader_class(cls, architecture)
    # Registered on every load (overwrite=True), so that a rebuilt mapping cache cannot lose it.
    register_checkpoint_conversion_mapping(loader.__name__, weight_mapping(architecture), overwrite=True)
    # Given this package's config, `PerceiverPreTrainedModel.from_pretrained` loads the weights directly (it sends
    # only checkpoints without such a config here) and keeps its error reporting for unreadable weight files.
    result = loader.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
    model = result[0] if isinstance(result, tuple) else result
    model.__class__ = cls
    # The conversions transformers kept for `save_pretrained` to revert: converted models save in our format.
    model._weight_conversions = None
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta and kwargs.get("device_map") != "meta":
        raise RuntimeError(
            f"Converting {pretrained_model_name_or_path} left tensors without data (meta device): {left_on_meta}. "
            "This is a bug in hf-flash-perceiver's transformers conversion; please report it."
        )
    logger.warning_once(
        f"Converted the transformers Perceiver checkpoint {pretrained_model_name_or_path} ({architecture}) into "
        f"hf-flash-perceiver's {cls.__name__} on load; save_pretrained writes hf-flash-perceiver's format "
        "(model_type 'flash_perceiver')."
    )
    return result


# -------------------------------------------------------------------------------------------------------- the CLI

_PROG = "convert-transformers-perceiver"
EXIT_FAILED, EXIT_BAD_PATH = 1, 2  # as convert-flash-perceiver-checkpoint


class _BadPath(ValueError):
    """SRC or DST names the wrong kind of path (exit status 2)."""


def _resolve_source(src: str, revision: str | None, token: str | None) -> str:
    """A local folder as is; a Hub id downloaded (config, weights and processor files only)."""
    if os.path.isdir(src):
        return src
    if os.path.exists(src):
        raise _BadPath(f"SRC {src} is a file; give the checkpoint's folder (config.json + weights) or a Hub model id.")
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id=src, revision=revision, token=token,
        allow_patterns=["config.json", *_WEIGHT_FILE_PATTERNS, *PROCESSOR_FILES],
    )


def _check_destination(dst: str, overwrite: bool) -> None:
    # Checked before converting: `save_pretrained` only logs an error for a file path and writes nothing.
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise _BadPath(f"DST {dst} is an existing file; give a folder to write the converted model into (new or empty).")
    if os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise _BadPath(f"DST {dst} is a folder that is not empty; give a new or empty one, or pass --overwrite.")


def _error(message: Any, status: int) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """`convert-transformers-perceiver SRC DST`: convert a transformers Perceiver checkpoint (a local folder or a Hub
    id) into an hf-flash-perceiver checkpoint in DST, with the source's tokenizer / image-processor files
    ([`PROCESSOR_FILES`] that exist), and print what was written.

    Returns the exit status: 0 when DST was written; 2 when SRC is a file or DST an existing file or non-empty folder
    (without `--overwrite`); 1 when SRC is not a convertible transformers Perceiver checkpoint or cannot be read, or
    DST cannot be written. Errors are one `convert-transformers-perceiver: error: ...` line on stderr.
    """
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description=(
            "Convert a transformers Perceiver checkpoint (model_type 'perceiver': PerceiverForMaskedLM, "
            "PerceiverForSequenceClassification, PerceiverForImageClassification{Learned,Fourier,ConvProcessing}, "
            "PerceiverForOpticalFlow, PerceiverModel) into hf-flash-perceiver's format. The tokenizer / image "
            "processor files of SRC are copied along, so that pipeline(...) works on DST after "
            "`import hf_flash_perceiver`."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="transformers checkpoint: a local folder or a Hub model id")
    parser.add_argument("dst", metavar="DST", help="output folder (new or empty)")
    parser.add_argument("--revision", default=None, help="Hub revision of SRC (branch, tag or commit)")
    parser.add_argument("--token", default=None, help="Hub token for a private SRC")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty DST folder")
    args = parser.parse_args(argv)

    try:
        _check_destination(args.dst, args.overwrite)
        src = _resolve_source(args.src, args.revision, args.token)
    except _BadPath as error:
        return _error(error, EXIT_BAD_PATH)
    except (ValueError, OSError) as error:  # Hub errors are OSErrors / ValueErrors
        return _error(f"cannot get {args.src}: {error}", EXIT_FAILED)
    try:
        source_dict = read_transformers_config(src)
        if source_dict is None:
            raise ValueError(f"{args.src} is not a transformers Perceiver checkpoint (model_type 'perceiver').")
        _, target_name = config_from_transformers(source_dict)
        model = load_transformers_checkpoint(getattr(_modeling(), target_name), src)
    except (ValueError, OSError) as error:
        return _error(error, EXIT_FAILED)

    try:
        os.makedirs(args.dst, exist_ok=True)
        model.save_pretrained(args.dst)
        copied = []
        for name in PROCESSOR_FILES:
            path = os.path.join(src, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(args.dst, name))
                copied.append(name)
    except OSError as error:
        return _error(f"cannot write {args.dst}: {error}", EXIT_FAILED)
    print(f"Converted {args.src} ({source_dict['architectures'][0]}) to hf-flash-perceiver's {target_name} in "
          f"{args.dst}:")
    for name in sorted(os.listdir(args.dst)):
        print(f"  {os.path.join(args.dst, name)}" + (" (copied from SRC)" if name in copied else ""))
    return 0


__all__ = [
    "ARCHITECTURES",
    "PROCESSOR_FILES",
    "ProjectLearnedPositions",
    "config_from_transformers",
    "load_transformers_checkpoint",
    "main",
    "read_transformers_config",
    "weight_mapping",
]


if __name__ == "__main__":
    sys.exit(main())

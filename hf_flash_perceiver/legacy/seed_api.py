"""The `flash-perceiver` 0.2.0 API (`Perceiver`, `PerceiverIO`) as thin wrappers over the transformers models.

Mapping (each wrapper holds one HF model in `.model`; `to_hf()` returns it, `from_hf()` wraps one):

- `Perceiver(output_dim=None)` -> [`PerceiverModel`]; returns the final latents.
- `Perceiver(output_dim=k, output_mode=mode)` -> [`PerceiverForSequenceClassification`] with `num_labels=k`,
  `pooling=mode` (pool + LayerNorm + Linear; the wrapper never computes a loss).
- `PerceiverIO(depth=d, proj_dim=p)` -> [`PerceiverIOModel`] with `depth=1`, `self_per_cross_attn=d`, `output_dim=p`
  (the seed's Perceiver IO is one cross-attention followed by `d` self-attentions).

The forward of every wrapper is the HF model's forward; the wrappers only translate arguments and outputs.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn
from transformers import AutoConfig

from ..configuration_perceiver import POOLING_MODES, PerceiverConfig
from ..modeling_perceiver import (
    InputsType,
    MaskType,
    PerceiverForSequenceClassification,
    PerceiverIOModel,
    PerceiverModel,
    PerceiverModelOutput,
    PerceiverPreTrainedModel,
)


# The seed's block wiring, for exact reproduction of its checkpoints (`seed_wiring=True`, and the converter): the
# block returns only its MLP branch, inputs enter the cross-attention un-normalised, the gated MLP is a sigmoid GLU,
# self-attention has a biased fused Wqkv and cross-attention unbiased Wq/Wkv.
SEED_WIRING = dict(
    mlp_residual=False, cross_input_norm=False, mlp_gate_activation="sigmoid", latent_qkv_bias=True, cross_qkv_bias=False
)
# flash-attn's GatedMlp rounds its hidden width up to a multiple of 128 (flash-attn >= 2.4; 256 up to 2.3).
SEED_MLP_MULTIPLE_OF = 128
OUTPUT_MODE_ALIASES = {"mean": "average"}
# `from_pretrained` arguments that locate the checkpoint (also needed to read its config first).
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")

# Default of an argument the caller must pass (the marker `inspect.signature` uses, so signatures compare directly).
REQUIRED = inspect.Parameter.empty


class SeedArg(NamedTuple):
    """One constructor argument of `flash-perceiver` 0.2.0's `Perceiver` / `PerceiverIO`.

    Attributes:
        name (`str`): the argument's name.
        default (`Any`): its default in the seed and in [`Perceiver`] / [`PerceiverIO`] here (`REQUIRED`: none).
        models (`tuple[str, ...]`): the seed classes that take it, `"Perceiver"` and/or `"PerceiverIO"`.
        to_config (`bool`): True when it becomes the [`PerceiverConfig`] field of the same name unchanged; False when
            [`seed_config`] maps it (`depth`, the output arguments, `use_flash_attn`).
    """

    name: str
    default: Any
    models: tuple[str, ...]
    to_config: bool


_BOTH = ("Perceiver", "PerceiverIO")
_PERCEIVER = ("Perceiver",)
_IO = ("PerceiverIO",)

# The seed's constructor arguments, the one place they are listed: the wrappers' signatures are checked against it
# (tests/test_seed_api.py), and `seed_config` and the converter's defaults and argument checks are derived from it.
# Listed in the order of both signatures (each class's arguments, in table order, are its signature).
SEED_ARGS: tuple[SeedArg, ...] = (
    SeedArg("input_dim", REQUIRED, _BOTH, True),
    SeedArg("query_dim", REQUIRED, _IO, True),
    SeedArg("depth", REQUIRED, _BOTH, False),
    SeedArg("output_dim", None, _PERCEIVER, False),
    # The seed's signature said "mean", which its forward rejected; "average" is what it computed ("mean" is an alias).
    SeedArg("output_mode", "average", _PERCEIVER, False),
    SeedArg("proj_dim", None, _IO, False),
    SeedArg("num_latents", 512, _BOTH, True),
    SeedArg("latent_dim", 512, _BOTH, True),
    SeedArg("cross_heads", 1, _BOTH, True),
    SeedArg("cross_head_dim", 64, _BOTH, True),
    SeedArg("cross_rotary_emb_dim", 0, _BOTH, True),
    SeedArg("cross_attn_dropout", 0.0, _BOTH, True),
    SeedArg("latent_heads", 8, _BOTH, True),
    SeedArg("latent_head_dim", 64, _BOTH, True),
    SeedArg("latent_rotary_emb_dim", 0, _BOTH, True),
    SeedArg("latent_attn_dropout", 0.0, _BOTH, True),
    SeedArg("latent_drop", 0.0, _BOTH, True),
    SeedArg("query_heads", 1, _IO, True),
    SeedArg("query_head_dim", 64, _IO, True),
    SeedArg("query_rotary_emb_dim", 0, _IO, True),
    SeedArg("query_attn_dropout", 0.0, _IO, True),
    SeedArg("weight_tie_layers", False, _BOTH, True),
    SeedArg("gated_mlp", True, _BOTH, True),
    SeedArg("self_per_cross_attn", 1, _PERCEIVER, True),
    SeedArg("num_zero_tokens", None, _BOTH, True),
    SeedArg("use_flash_attn", True, _BOTH, False),
)
SEED_MODELS = _BOTH
# Encoder arguments shared by both classes that carry over to `PerceiverConfig` under the same name.
SEED_ENCODER_ARGS = tuple(a.name for a in SEED_ARGS if a.models == _BOTH and a.to_config)


def seed_args(model: str) -> tuple[SeedArg, ...]:
    """The constructor arguments of the seed's `model` (`"Perceiver"` or `"PerceiverIO"`), in its signature's order."""
    if model not in SEED_MODELS:
        raise ValueError(f"`model` must be one of {list(SEED_MODELS)}, got {model!r}.")
    return tuple(a for a in SEED_ARGS if model in a.models)


def seed_defaults(model: str) -> dict[str, Any]:
    """`{name: default}` of the seed's `model` for the arguments that have a default."""
    return {a.name: a.default for a in seed_args(model) if a.default is not REQUIRED}


def seed_mlp_hidden_size(latent_dim: int, multiple_of: int = SEED_MLP_MULTIPLE_OF) -> int:
    """Hidden width of the seed's gated MLP: `4 * latent_dim` rounded up to a multiple of `multiple_of`."""
    return -(-4 * latent_dim // multiple_of) * multiple_of


def attn_implementation_for(use_flash_attn: bool) -> str:
    """`use_flash_attn=True` -> the fused `"sdpa"` backend; False -> the `"eager"` matmul/softmax reference."""
    if not isinstance(use_flash_attn, bool):
        raise TypeError(f"`use_flash_attn` must be a bool, got {type(use_flash_attn).__name__}.")
    return "sdpa" if use_flash_attn else "eager"


def pooling_for(output_mode: str) -> str:
    """The `PerceiverConfig.pooling` of a seed `output_mode` (`"mean"` is an alias of `"average"`)."""
    pooling = OUTPUT_MODE_ALIASES.get(output_mode, output_mode)
    if pooling not in POOLING_MODES:
        raise ValueError(
            f"Unknown output_mode {output_mode!r}; expected one of {list(POOLING_MODES) + list(OUTPUT_MODE_ALIASES)}."
        )
    return pooling


def seed_config(
    model: str,
    arguments: Mapping[str, Any],
    *,
    seed_wiring: bool = False,
    mlp_hidden_size: int | None = None,
) -> PerceiverConfig:
    """A [`PerceiverConfig`] for the seed's `model` built with `arguments`.

    Args:
        model (`str`): `"Perceiver"` or `"PerceiverIO"`.
        arguments (`Mapping[str, Any]`): the seed constructor arguments of `model` (see `SEED_ARGS`); those left
            out take the seed's defaults.
        seed_wiring (`bool`, *optional*, defaults to `False`): add the seed's block quirks (`SEED_WIRING`) and its
            gated-MLP width (`mlp_hidden_size`, or [`seed_mlp_hidden_size`] when not given); False keeps this
            package's defaults (residual MLP, normalised inputs, GELU gate, `4 * width` hidden).
        mlp_hidden_size (`int`, *optional*): the gated MLP's hidden width.

    Mapping: `Perceiver(depth=d, output_dim=k, output_mode=m)` -> `depth=d`, `num_labels=k`, `pooling=m`;
    `PerceiverIO(depth=d, proj_dim=p)` -> `depth=1`, `self_per_cross_attn=d`, `output_dim=p` (the seed's Perceiver IO
    is one cross-attention followed by `d` self-attentions); `use_flash_attn` -> the `"sdpa"` or `"eager"` backend.
    Every other argument is the config field of the same name.
    """
    table = {a.name: a for a in seed_args(model)}
    unknown = sorted(set(arguments) - set(table))
    if unknown:
        raise TypeError(f"Unknown argument(s) {unknown} for flash-perceiver's {model}; expected some of {list(table)}.")
    args = {name: arguments.get(name, a.default) for name, a in table.items()}
    missing = [name for name, value in args.items() if value is REQUIRED]
    if missing:
        raise TypeError(f"flash-perceiver's {model} needs the argument(s) {missing}.")
    fields = {name: args[name] for name, a in table.items() if a.to_config}
    if isinstance(fields["input_dim"], (list, tuple)):
        fields["input_dim"] = list(fields["input_dim"])
    if model == "Perceiver":
        fields.update(depth=args["depth"], pooling=pooling_for(args["output_mode"]))
        if args["output_dim"] is not None:
            fields["num_labels"] = args["output_dim"]
    else:
        fields.update(depth=1, self_per_cross_attn=args["depth"], output_dim=args["proj_dim"])
    if seed_wiring:
        fields.update(SEED_WIRING)
        if fields["gated_mlp"]:
            fields["mlp_hidden_size"] = mlp_hidden_size or seed_mlp_hidden_size(fields["latent_dim"])
    elif mlp_hidden_size is not None:
        fields["mlp_hidden_size"] = mlp_hidden_size
    widths = fields["input_dim"] if isinstance(fields["input_dim"], list) else [fields["input_dim"]]
    if 1 in widths:
        # The seed never normalised inputs; over one feature LayerNorm would erase the input, so keep them raw.
        fields["cross_input_norm"] = False
    attn_implementation = attn_implementation_for(args["use_flash_attn"])
    config = PerceiverConfig(**fields)
    config._attn_implementation = attn_implementation
    return config


def _arguments_of(model: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The seed arguments of `model` picked from a constructor's `locals()`."""
    return {a.name: namespace[a.name] for a in seed_args(model)}


def _with_attention(out: Tensor, attentions: tuple[Tensor, ...] | None, return_attn_weights: bool):
    return (out, list(attentions)) if return_attn_weights else out


class _SeedWrapper(nn.Module):
    """Shared part of [`Perceiver`] and [`PerceiverIO`]: owns the HF model, exposes the seed's properties."""

    _hf_classes: tuple[type[PerceiverPreTrainedModel], ...] = ()

    def __init__(self, model: PerceiverPreTrainedModel):
        super().__init__()
        self.model = model

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, model: PerceiverPreTrainedModel):
        """Wrap an existing HF model (no copy: the wrapper and `model` share parameters)."""
        if not isinstance(model, cls._hf_classes):
            expected = " or ".join(c.__name__ for c in cls._hf_classes)
            raise TypeError(f"{cls.__name__}.from_hf expects a {expected}, got {type(model).__name__}.")
        wrapper = cls.__new__(cls)
        _SeedWrapper.__init__(wrapper, model)
        wrapper.training = model.training  # `from_pretrained` models come in eval mode; keep theirs
        return wrapper

    def to_hf(self) -> PerceiverPreTrainedModel:
        """The wrapped HF model (shares parameters with the wrapper): `save_pretrained`, `push_to_hub`, Trainer."""
        return self.model

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """`to_hf().save_pretrained(...)`: the directory loads with the Auto classes or `from_pretrained`."""
        self.model.save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a directory or Hub repo saved by `save_pretrained` (of the wrapper or of the matching HF model)."""
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        architectures = set(getattr(config, "architectures", None) or ())
        for hf_class in cls._hf_classes:
            if hf_class.__name__ in architectures:
                return cls.from_hf(hf_class.from_pretrained(pretrained_model_name_or_path, **kwargs))
        expected = ", ".join(c.__name__ for c in cls._hf_classes)
        raise ValueError(
            f"{cls.__name__}.from_pretrained expects a checkpoint of {expected}; {pretrained_model_name_or_path} "
            f"holds {sorted(architectures) or 'no recorded architecture'}."
        )

    # ------------------------------------------------------------------ seed properties
    @property
    def config(self) -> PerceiverConfig:
        return self.model.config

    @property
    def encoder_model(self) -> PerceiverModel:
        """The bare [`PerceiverModel`] inside the wrapped model."""
        return self.model if isinstance(self.model, PerceiverModel) else self.model.perceiver

    @property
    def latents(self) -> nn.Parameter | None:
        """The learned latents `(num_latents, latent_dim)` (None with `num_latents=None`)."""
        return self.encoder_model.latents

    @property
    def input_dims(self) -> list[int]:
        return self.encoder_model.encoder.input_dims

    @property
    def num_latents(self) -> int | None:
        return self.config.num_latents

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def self_per_cross_attn(self) -> int:
        return self.config.self_per_cross_attn

    @property
    def num_attention_layers_per_block(self) -> int:
        return 1 + self.self_per_cross_attn

    @property
    def num_attention_layers(self) -> int:
        return self.depth * self.num_attention_layers_per_block

    @property
    def num_self_attention_layers(self) -> int:
        return self.depth * self.self_per_cross_attn

    @property
    def num_cross_attention_layers(self) -> int:
        return self.depth

    @property
    def use_flash_attn(self) -> bool:
        """Whether a fused attention backend is in use (anything but `"eager"`)."""
        return self.config._attn_implementation != "eager"

    def set_flash_attn(self, use_flash_attn: bool) -> None:
        """Switch between the fused `"sdpa"` backend (True) and the `"eager"` reference (False)."""
        self.model.set_attn_implementation(attn_implementation_for(use_flash_attn))

    def _encode(
        self, data: InputsType, mask: MaskType, latents: Tensor | None, return_attn_weights: bool
    ) -> PerceiverModelOutput:
        if not isinstance(return_attn_weights, bool):
            raise TypeError(f"`return_attn_weights` must be a bool, got {type(return_attn_weights).__name__}.")
        return self.encoder_model(
            data, mask, latents, output_attentions=return_attn_weights, output_hidden_states=False, return_dict=True
        )


class Perceiver(_SeedWrapper):
    r"""
    The `flash-perceiver` 0.2.0 `Perceiver`, on this package's models (see the module docstring for the mapping).

    New models use this package's block wiring (residual MLP, normalised inputs, GELU-gated MLP); `seed_wiring=True`
    builds the seed's exact wiring instead (what [`convert_flash_perceiver_checkpoint`] does for trained weights).

    Args:
        input_dim (`int` or `list[int]`): input width, or one per cross-attention block (`len == depth`).
        depth (`int`): number of blocks (one cross-attention + `self_per_cross_attn` self-attentions each).
        output_dim (`int`, *optional*): pool the latents and project to this width; None returns the latents.
        output_mode (`str`, *optional*, defaults to `"average"`): pooling, `"average"` (alias `"mean"`, the seed's
            signature default), `"concat"` or `"first"`.
        num_latents (`int`, *optional*, defaults to 512): learned latents; None means `latents` on every call.
        latent_dim (`int`, *optional*, defaults to 512): latent width.
        cross_heads, cross_head_dim, cross_rotary_emb_dim, cross_attn_dropout: the cross-attention.
        latent_heads, latent_head_dim, latent_rotary_emb_dim, latent_attn_dropout: the latent self-attention.
        latent_drop (`float`, *optional*, defaults to 0.0): fraction of latents dropped per sample in training.
        weight_tie_layers (`bool`, *optional*, defaults to `False`): share the weights of blocks after the first.
        gated_mlp (`bool`, *optional*, defaults to `True`): gated MLP instead of a plain GELU MLP.
        self_per_cross_attn (`int`, *optional*, defaults to 1): self-attentions per cross-attention.
        num_zero_tokens (`int`, *optional*): learned tokens prepended to every input.
        use_flash_attn (`bool`, *optional*, defaults to `True`): fused `"sdpa"` attention; False selects `"eager"`.
        seed_wiring (`bool`, *optional*, defaults to `False`): build the seed's block wiring (no MLP residual, raw
            inputs to cross-attention, sigmoid GLU with the seed's hidden width, biased self-attention Wqkv).

    Example:

    ```python
    >>> import torch
    >>> from hf_flash_perceiver import Perceiver

    >>> model = Perceiver(input_dim=16, depth=2, output_dim=3, num_latents=8, latent_dim=32)
    >>> model(torch.randn(2, 10, 16)).shape
    torch.Size([2, 3])
    ```
    """

    _hf_classes = (PerceiverModel, PerceiverForSequenceClassification)

    def __init__(
        self,
        *,
        input_dim: int | list[int],
        depth: int,
        output_dim: int | None = None,
        output_mode: str = "average",
        num_latents: int | None = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        cross_head_dim: int = 64,
        cross_rotary_emb_dim: int = 0,
        cross_attn_dropout: float = 0.0,
        latent_heads: int = 8,
        latent_head_dim: int = 64,
        latent_rotary_emb_dim: int = 0,
        latent_attn_dropout: float = 0.0,
        latent_drop: float = 0.0,
        weight_tie_layers: bool = False,
        gated_mlp: bool = True,
        self_per_cross_attn: int = 1,
        num_zero_tokens: int | None = None,
        use_flash_attn: bool = True,
        seed_wiring: bool = False,
    ):
        config = seed_config("Perceiver", _arguments_of("Perceiver", locals()), seed_wiring=seed_wiring)
        hf_class = PerceiverModel if output_dim is None else PerceiverForSequenceClassification
        super().__init__(hf_class(config))

    @property
    def output_dim(self) -> int | None:
        return self.config.num_labels if isinstance(self.model, PerceiverForSequenceClassification) else None

    @property
    def output_mode(self) -> str:
        return self.config.pooling

    def forward(
        self,
        data: InputsType,
        mask: MaskType = None,
        latents: Tensor | None = None,
        return_embeddings: bool = False,
        return_attn_weights: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        r"""
        Args:
            data (`torch.FloatTensor` of shape `(batch, seq_len, input_dim)`, or a list with one per block):
                The input, read by every cross-attention (one tensor) or one per block (a list).
            mask (`torch.BoolTensor` of shape `(batch, seq_len)`, or a list like `data` with None allowed, *optional*):
                Key padding, True = attend.
            latents (`torch.FloatTensor` of shape `(m, latent_dim)` or `(batch, m, latent_dim)`, *optional*):
                Custom latents instead of the learned ones.
            return_embeddings (`bool`, *optional*, defaults to `False`):
                Return the final latents even when `output_dim` is set.
            return_attn_weights (`bool`, *optional*, defaults to `False`):
                Also return one attention map per layer, `[cross_0, self_0_0, ..., cross_1, ...]`: cross maps
                `(batch, cross_heads, num_latents, seq_len)`, self maps `(batch, latent_heads, num_latents,
                num_latents)`. Works with every backend (the maps are computed for this call by the eager reference).

        Returns:
            `(batch, output_dim)` with `output_dim` set (and not `return_embeddings`), else the latents
            `(batch, num_latents, latent_dim)`; as `(output, attn_weights)` with `return_attn_weights`.
        """
        enc = self._encode(data, mask, latents, return_attn_weights)
        out = enc.last_hidden_state
        if self.output_dim is not None and not return_embeddings:
            out = self.model.forward_head(out)
        return _with_attention(out, enc.attentions, return_attn_weights)


class PerceiverIO(_SeedWrapper):
    r"""
    The `flash-perceiver` 0.2.0 `PerceiverIO`: one cross-attention, `depth` self-attentions, then queries
    cross-attend to the latents (a [`PerceiverIOModel`], see the module docstring).

    Args:
        input_dim (`int` or `list[int]` of length 1): input width.
        query_dim (`int`): width of the queries.
        depth (`int`): number of self-attention blocks after the single cross-attention.
        proj_dim (`int`, *optional*): LayerNorm + Linear of the decoder output to this width.
        query_heads, query_head_dim, query_rotary_emb_dim, query_attn_dropout: the queries' cross-attention.
        other arguments: as in [`Perceiver`].

    Example:

    ```python
    >>> import torch
    >>> from hf_flash_perceiver import PerceiverIO

    >>> model = PerceiverIO(input_dim=16, query_dim=8, depth=2, proj_dim=4, num_latents=8, latent_dim=32)
    >>> model(torch.randn(2, 10, 16), queries=torch.randn(5, 8)).shape
    torch.Size([2, 5, 4])
    ```
    """

    _hf_classes = (PerceiverIOModel,)

    def __init__(
        self,
        *,
        input_dim: int | list[int],
        query_dim: int,
        depth: int,
        proj_dim: int | None = None,
        num_latents: int | None = 512,
        latent_dim: int = 512,
        cross_heads: int = 1,
        cross_head_dim: int = 64,
        cross_rotary_emb_dim: int = 0,
        cross_attn_dropout: float = 0.0,
        latent_heads: int = 8,
        latent_head_dim: int = 64,
        latent_rotary_emb_dim: int = 0,
        latent_attn_dropout: float = 0.0,
        latent_drop: float = 0.0,
        query_heads: int = 1,
        query_head_dim: int = 64,
        query_rotary_emb_dim: int = 0,
        query_attn_dropout: float = 0.0,
        weight_tie_layers: bool = False,
        gated_mlp: bool = True,
        num_zero_tokens: int | None = None,
        use_flash_attn: bool = True,
        seed_wiring: bool = False,
    ):
        config = seed_config("PerceiverIO", _arguments_of("PerceiverIO", locals()), seed_wiring=seed_wiring)
        super().__init__(PerceiverIOModel(config))

    @property
    def query_dim(self) -> int:
        return self.config.decoder_query_dim

    @property
    def proj_dim(self) -> int | None:
        return self.config.output_dim

    def forward(
        self,
        data: InputsType,
        mask: MaskType = None,
        latents: Tensor | None = None,
        queries: Tensor | None = None,
        query_mask: Tensor | None = None,
        return_attn_weights: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        r"""
        Args:
            data, mask, latents: as in [`Perceiver.forward`].
            queries (`torch.FloatTensor` of shape `(num_queries, query_dim)` or `(batch, num_queries, query_dim)`, *optional*):
                Decoder queries. None returns the final latents (as the seed does), unless the wrapped model has
                learned queries (`config.num_queries`), which are then decoded.
            query_mask (`torch.BoolTensor` of shape `(batch, num_queries)`, *optional*):
                False marks padded queries; their outputs are exactly zero.
            return_attn_weights (`bool`, *optional*, defaults to `False`):
                Also return the encoder's attention maps (as in [`Perceiver.forward`]; the decoder's map is in the
                HF model's `cross_attentions`).

        Returns:
            `(batch, num_queries, proj_dim or query_dim)`, or the latents without queries; as
            `(output, attn_weights)` with `return_attn_weights`.
        """
        if queries is None and self.model.decoder.queries is None:
            if query_mask is not None:
                raise ValueError("`query_mask` was given without `queries`; pass the queries it masks.")
            enc = self._encode(data, mask, latents, return_attn_weights)
            return _with_attention(enc.last_hidden_state, enc.attentions, return_attn_weights)
        if not isinstance(return_attn_weights, bool):
            raise TypeError(f"`return_attn_weights` must be a bool, got {type(return_attn_weights).__name__}.")
        out = self.model(
            data, mask, queries=queries, query_mask=query_mask, latents=latents,
            output_attentions=return_attn_weights, output_hidden_states=False, return_dict=True,
        )
        return _with_attention(out.logits, out.attentions, return_attn_weights)


__all__ = [
    "Perceiver",
    "PerceiverIO",
    "REQUIRED",
    "SEED_ARGS",
    "SEED_ENCODER_ARGS",
    "SEED_WIRING",
    "SeedArg",
    "seed_args",
    "seed_config",
    "seed_defaults",
    "seed_mlp_hidden_size",
]

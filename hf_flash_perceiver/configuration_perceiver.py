"""Configuration of the hf-flash-perceiver models."""

from functools import wraps
from typing import Any, Literal, get_args

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig


PoolingMode = Literal["average", "first", "concat", "query"]
MlpGateActivation = Literal["gelu", "sigmoid", "silu"]
ImageAdapter = Literal["linear", "conv1x1", "pixels", "conv"]
POOLING_MODES = get_args(PoolingMode)
IMAGE_ADAPTERS = get_args(ImageAdapter)
MLP_GATE_ACTIVATIONS = get_args(MlpGateActivation)


# Field validators: `@strict` runs them (after the type check) at construction and on every assignment, and
# `save_pretrained` runs the class validators (`validate_*`) again, so no invalid config is ever written.
def _positive(value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"must be positive, got {value!r}")


def _non_negative(value: Any) -> None:
    if value < 0:
        raise ValueError(f"must be >= 0, got {value!r}")


def _probability(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be in [0, 1), got {value!r}")


def _rotary_dim(value: int) -> None:
    if value < 0 or value % 2:
        raise ValueError(f"must be an even number >= 0, got {value!r}")


def positive(default: Any) -> Any:
    return validated_field(_positive, default=default)


def probability(default: float = 0.0) -> Any:
    return validated_field(_probability, default=default)


def rotary(default: int = 0) -> Any:
    return validated_field(_rotary_dim, default=default)


@strict
class PerceiverConfig(PreTrainedConfig):
    r"""
    Configuration of a fused-attention Perceiver / Perceiver IO model.

    The defaults describe the encoder of `flash-perceiver` 0.2.0 (512 latents of width 512, one single-head
    cross-attention and one 8-head self-attention per block) with modern block wiring (pre-LayerNorm, residual
    attention *and* residual MLP, normalised inputs). The `seed_*`-style switches (`mlp_residual`,
    `cross_input_norm`, `mlp_gate_activation`, `mlp_hidden_size`, `*_qkv_bias`) exist so that a `flash-perceiver`
    checkpoint can be reproduced exactly; keep their defaults for new models.

    Args:
        input_dim (`int` or `list[int]`, *optional*):
            Feature width of the raw input. A list gives one width per cross-attention block (`len == depth`), in which
            case the model takes one input per block. `None` means a head's input adapter sets the width
            (`latent_dim` is then used); a raw-feature [`PerceiverModel`] needs it set.
        input_names (`list[str]`, *optional*):
            Names of the inputs, one per cross-attention block, so that `inputs` may be passed as a dict.
        depth (`int`, *optional*, defaults to 8):
            Number of blocks; each is one cross-attention followed by `self_per_cross_attn` self-attentions.
        num_latents (`int`, *optional*, defaults to 512):
            Number of learned latents. `None` means the caller passes `latents` on every forward.
        latent_dim (`int`, *optional*, defaults to 512):
            Width of the latents.
        cross_heads (`int`, *optional*, defaults to 1):
            Heads of the cross-attention.
        cross_head_dim (`int`, *optional*, defaults to 64):
            Head width of the cross-attention.
        cross_rotary_emb_dim (`int`, *optional*, defaults to 0):
            Rotary dimensions of the cross-attention (0 disables rotary). Even and at most `cross_head_dim`.
        cross_attn_dropout (`float`, *optional*, defaults to 0.0):
            Attention-probability dropout of the cross-attention.
        cross_v_head_dim (`int`, *optional*):
            Value width per cross-attention head (`cross_head_dim` when unset): queries/keys and values may differ.
        cross_query_residual (`bool`, *optional*, defaults to `True`):
            Add the cross-attention's output to the latents (the residual around the attention). transformers'
            Perceiver calls it `use_query_residual`.
        cross_mlp_ratio (`float`, *optional*):
            MLP width multiple of the cross-attention blocks (`mlp_ratio` / `mlp_hidden_size` when unset).
        latent_heads (`int`, *optional*, defaults to 8):
            Heads of the latent self-attention.
        latent_head_dim (`int`, *optional*, defaults to 64):
            Head width of the latent self-attention.
        latent_rotary_emb_dim (`int`, *optional*, defaults to 0):
            Rotary dimensions of the latent self-attention. Even and at most `latent_head_dim`.
        latent_attn_dropout (`float`, *optional*, defaults to 0.0):
            Attention-probability dropout of the latent self-attention.
        latent_v_head_dim (`int`, *optional*):
            Value width per self-attention head (`latent_head_dim` when unset).
        latent_stack_repeats (`int`, *optional*, defaults to 1):
            Times the `self_per_cross_attn` self-attentions after each cross-attention are applied, with the same
            weights (transformers' Perceiver: `num_blocks` repeats of `num_self_attends_per_block` layers after one
            cross-attention).
        latent_drop (`float`, *optional*, defaults to 0.0):
            Fraction of latents dropped per sample in training; `floor((1 - p) * m)` latents are kept.
        weight_tie_layers (`bool`, *optional*, defaults to `False`):
            Share the weights of every block after the first.
        gated_mlp (`bool`, *optional*, defaults to `True`):
            Gated (GLU-style) MLP instead of a plain GELU MLP.
        mlp_ratio (`float`, *optional*, defaults to 4.0):
            MLP hidden width as a multiple of the block width.
        mlp_hidden_size (`int`, *optional*):
            Absolute MLP hidden width for every block (overrides `mlp_ratio`).
        mlp_gate_activation (`str`, *optional*, defaults to `"gelu"`):
            Activation of the gate in a gated MLP: `"gelu"`, `"silu"` or `"sigmoid"` (the seed's GLU).
        mlp_residual (`bool`, *optional*, defaults to `True`):
            Residual connection around the MLP. `flash-perceiver` 0.2.0 had none (`False` reproduces it).
        cross_input_norm (`bool`, *optional*, defaults to `True`):
            LayerNorm the inputs before the cross-attention's key/value projection (`False` as in the seed). Over
            very narrow inputs LayerNorm discards information (over 2 features it outputs +-1, over 1 feature 0,
            which is refused): turn it off, or embed such inputs first.
        cross_qkv_bias (`bool`, *optional*, defaults to `False`):
            Bias on the cross-attention's query/key/value projections.
        latent_qkv_bias (`bool`, *optional*, defaults to `False`):
            Bias on the self-attention's fused query/key/value projection (`True` in the seed).
        self_per_cross_attn (`int`, *optional*, defaults to 1):
            Self-attention blocks after each cross-attention.
        num_zero_tokens (`int`, *optional*):
            Learned tokens prepended to every input that the latents can always attend to.
        rotary_base (`float`, *optional*, defaults to 10000.0):
            Base of the rotary frequencies.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            LayerNorm epsilon.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the truncated-normal initialiser of linear layers.
        cross_attention_checkpointing (`bool`, *optional*, defaults to `False`):
            Compute the cross-attention's input side (LayerNorm, key/value projection, attention) chunk by chunk
            over the keys and recompute it in backward instead of keeping it: training memory per input token drops
            to the input itself, for some recompute time. For long inputs.
        cross_attention_chunk_size (`int`, *optional*, defaults to 131072):
            Token rows (batch x keys) per chunk with `cross_attention_checkpointing`: bounds the transient memory.
        pooling (`str`, *optional*, defaults to `"average"`):
            Latent pooling of classification heads: `"average"`, `"first"`, `"concat"` or `"query"`.
        num_channels (`int`, *optional*, defaults to 3):
            Image channels (image heads).
        image_size (`int`, *optional*, defaults to 224):
            Image height and width (image heads).
        patch_size (`int`, *optional*, defaults to 1):
            Patch size of the image adapter (1 = one token per pixel).
        num_fourier_bands (`int`, *optional*, defaults to 16):
            Fourier position bands per spatial axis of the image adapter (0 = learned positions).
        image_adapter (`str`, *optional*, defaults to `"linear"`):
            How images become tokens. `"linear"`: patches (+ Fourier positions) projected by a Linear to `input_dim`
            (learned positions are added). The others concatenate positions to unprojected features and set
            `input_dim` themselves: `"conv1x1"`: a 1x1 convolution to `image_embed_dim` channels; `"pixels"`: the raw
            pixels; `"conv"`: a 7x7 stride-2 convolution to `image_embed_dim` channels, BatchNorm, ReLU and a 3x3
            stride-2 max-pool (4x fewer tokens per axis). Positions: Fourier features (`num_fourier_bands` > 0), or
            for `"conv1x1"` a learned table of width `image_position_dim` (`num_fourier_bands=0`).
        image_embed_dim (`int`, *optional*, defaults to 256):
            Channels of the `"conv1x1"` / `"conv"` image adapters, and of the optical-flow patch projection.
        image_position_dim (`int`, *optional*, defaults to 256):
            Width of the learned positions the `"conv1x1"` adapter concatenates.
        fourier_max_resolution (`list[int]`, *optional*):
            The grid (per axis) the Fourier frequencies are chosen for; the adapter's token grid at `image_size` when
            unset. Fixing it lets one model read other sizes with the same frequencies.
        num_frames (`int`, *optional*, defaults to 2):
            Frames per sample of [`PerceiverForOpticalFlow`] (stacked per pixel before the patch projection).
        flow_rescale_factor (`float`, *optional*, defaults to 100.0):
            [`PerceiverForOpticalFlow`] divides its decoder outputs by this to give the flow in pixels.
        vocab_size (`int`, *optional*, defaults to 262):
            Vocabulary of token heads (262 = transformers' byte-level `PerceiverTokenizer`).
        max_position_embeddings (`int`, *optional*, defaults to 2048):
            Longest token sequence of token heads.
        query_dim (`int`, *optional*):
            Width of the Perceiver IO decoder queries (`latent_dim` when unset).
        num_queries (`int`, *optional*):
            Number of learned decoder queries; `None` means queries are passed in.
        output_dim (`int`, *optional*):
            Output width of the Perceiver IO decoder (no projection when unset).
        query_heads (`int`, *optional*, defaults to 1):
            Heads of the decoder's cross-attention.
        query_head_dim (`int`, *optional*, defaults to 64):
            Head width of the decoder's cross-attention.
        query_rotary_emb_dim (`int`, *optional*, defaults to 0):
            Rotary dimensions of the decoder's cross-attention.
        query_attn_dropout (`float`, *optional*, defaults to 0.0):
            Attention-probability dropout of the decoder.
        query_v_head_dim (`int`, *optional*):
            Value width per decoder head (`query_head_dim` when unset).
        query_residual (`bool`, *optional*, defaults to `True`):
            Add the decoder cross-attention's output to its queries (and to the `pooling="query"` query). Off when
            queries and outputs mean different things (positions in, pixels out).
        query_mlp_ratio (`float`, *optional*):
            MLP width multiple of the decoder block and of the pooling query's block (`mlp_ratio` / `mlp_hidden_size`
            when unset).
        output_norm (`bool`, *optional*, defaults to `True`):
            LayerNorm before every output projection: the Perceiver IO decoder's `output_dim` projection, the
            classifier and the masked-LM head. transformers' Perceiver has none (`False`).
        text_input (`bool`, *optional*, defaults to `False`):
            [`PerceiverForSequenceClassification`] reads token ids (`input_ids`) through the text adapter (token +
            position embeddings of width `input_dim`) instead of raw features.
        classifier_dropout (`float`, *optional*, defaults to 0.0):
            Dropout before classification heads.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Tie the masked-LM decoder to the input embedding.

    Example:

    ```python
    >>> from hf_flash_perceiver import PerceiverConfig, PerceiverModel

    >>> config = PerceiverConfig(input_dim=32, depth=2, num_latents=64, latent_dim=128)
    >>> model = PerceiverModel(config)
    ```
    """

    model_type = "flash_perceiver"

    # encoder
    input_dim: int | list[int] | tuple[int, ...] | None = None
    input_names: list[str] | tuple[str, ...] | None = None
    depth: int = positive(8)
    num_latents: int | None = positive(512)
    latent_dim: int = positive(512)
    cross_heads: int = positive(1)
    cross_head_dim: int = positive(64)
    cross_rotary_emb_dim: int = rotary()
    cross_attn_dropout: float | int = probability()
    cross_v_head_dim: int | None = positive(None)
    cross_query_residual: bool = True
    cross_mlp_ratio: float | int | None = positive(None)
    latent_heads: int = positive(8)
    latent_head_dim: int = positive(64)
    latent_rotary_emb_dim: int = rotary()
    latent_attn_dropout: float | int = probability()
    latent_v_head_dim: int | None = positive(None)
    latent_stack_repeats: int = positive(1)
    latent_drop: float | int = probability()
    weight_tie_layers: bool = False
    gated_mlp: bool = True
    mlp_ratio: float | int = positive(4.0)
    mlp_hidden_size: int | None = positive(None)
    mlp_gate_activation: MlpGateActivation = "gelu"
    mlp_residual: bool = True
    cross_input_norm: bool = True
    cross_qkv_bias: bool = False
    latent_qkv_bias: bool = False
    self_per_cross_attn: int = positive(1)
    num_zero_tokens: int | None = positive(None)
    rotary_base: float | int = positive(10000.0)
    layer_norm_eps: float | int = positive(1e-5)
    initializer_range: float | int = validated_field(_non_negative, default=0.02)
    cross_attention_checkpointing: bool = False
    cross_attention_chunk_size: int = positive(131072)
    # heads and input adapters
    pooling: PoolingMode = "average"
    num_channels: int = positive(3)
    image_size: int = positive(224)
    patch_size: int = positive(1)
    num_fourier_bands: int = validated_field(_non_negative, default=16)
    image_adapter: ImageAdapter = "linear"
    image_embed_dim: int = positive(256)
    image_position_dim: int = positive(256)
    fourier_max_resolution: list[int] | tuple[int, ...] | None = None
    num_frames: int = positive(2)
    flow_rescale_factor: float | int = positive(100.0)
    vocab_size: int = positive(262)
    max_position_embeddings: int = positive(2048)
    query_dim: int | None = positive(None)
    num_queries: int | None = positive(None)
    output_dim: int | None = positive(None)
    query_heads: int = positive(1)
    query_head_dim: int = positive(64)
    query_rotary_emb_dim: int = rotary()
    query_attn_dropout: float | int = probability()
    query_v_head_dim: int | None = positive(None)
    query_residual: bool = True
    query_mlp_ratio: float | int | None = positive(None)
    output_norm: bool = True
    text_input: bool = False
    classifier_dropout: float | int = probability()
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        # JSON turns tuples into lists; normalise so that a round trip compares equal.
        if isinstance(self.input_dim, tuple):
            self.input_dim = list(self.input_dim)
        if isinstance(self.input_names, tuple):
            self.input_names = list(self.input_names)
        if isinstance(self.fourier_max_resolution, tuple):
            self.fourier_max_resolution = list(self.fourier_max_resolution)
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "PerceiverConfig":
        # transformers' own Perceiver configs (model_type "perceiver") have other fields: convert them (the model
        # classes' from_pretrained converts the weights too). Any other model type is not a Perceiver: refuse it,
        # rather than build a default model that silently ignores the checkpoint.
        model_type = config_dict.get("model_type")
        if model_type == "perceiver":
            from .transformers_conversion import config_from_transformers

            config_dict = config_from_transformers(config_dict)[0].to_dict()
        elif model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"This checkpoint has model_type {model_type!r}, not {cls.model_type!r} (or transformers' "
                "'perceiver', which is converted): it is not a Perceiver checkpoint this package can read."
            )
        return super().from_dict(config_dict, **kwargs)

    # `output_attentions` must not force eager attention: every backend here can return attention maps (the
    # attention entry point computes them for that call only), so the base class's switch-to-eager and its
    # "not supported with sdpa" refusal do not apply.
    @property
    def output_attentions(self) -> bool:
        return self._output_attentions

    @output_attentions.setter
    def output_attentions(self, value: bool):
        self._output_attentions = value

    def validate_output_attentions(self):
        return None

    @property
    def input_dims(self) -> list[int]:
        """Input width of each cross-attention block (`latent_dim` where `input_dim` is unset)."""
        if isinstance(self.input_dim, list):
            return list(self.input_dim)
        width = self.latent_dim if self.input_dim is None else self.input_dim
        return [width] * self.depth

    @property
    def num_self_attention_layers(self) -> int:
        """Self-attention layer applications (repeats included)."""
        return self.depth * self.self_per_cross_attn * self.latent_stack_repeats

    @property
    def num_attention_layers(self) -> int:
        return self.depth + self.num_self_attention_layers

    @property
    def decoder_query_dim(self) -> int:
        return self.latent_dim if self.query_dim is None else self.query_dim

    def mlp_ratio_for(self, role: str) -> float | None:
        """The MLP width multiple of a block role (`"cross"`, `"latent"` or `"query"`); None means
        `mlp_hidden_size` (if set) or `mlp_ratio`."""
        return {"cross": self.cross_mlp_ratio, "latent": None, "query": self.query_mlp_ratio}[role]

    def validate_architecture(self):
        """Part of `@strict` validation (at construction and in `save_pretrained`): the constraints between fields."""
        super().validate_architecture()
        if self.cross_attention_checkpointing and self.cross_attn_dropout > 0:
            raise ValueError("`cross_attention_checkpointing` does not support `cross_attn_dropout` > 0.")
        self._validate_inputs()
        for rotary_field, head in (("cross_rotary_emb_dim", "cross_head_dim"), ("latent_rotary_emb_dim", "latent_head_dim"),
                                   ("query_rotary_emb_dim", "query_head_dim")):
            if getattr(self, rotary_field) > getattr(self, head):
                raise ValueError(
                    f"`{rotary_field}` ({getattr(self, rotary_field)}) must be at most `{head}` ({getattr(self, head)})."
                )
        for width, ratio_field in ((self.latent_dim, "mlp_ratio"), (self.decoder_query_dim, "mlp_ratio"),
                                   (self.latent_dim, "cross_mlp_ratio"), (self.decoder_query_dim, "query_mlp_ratio")):
            ratio = getattr(self, ratio_field)
            if ratio is None or (ratio_field == "mlp_ratio" and self.mlp_hidden_size is not None):
                continue
            if int(round(width * ratio)) < 1:
                raise ValueError(
                    f"`{ratio_field}={ratio}` gives a zero-width MLP for width {width}; raise it"
                    + (" or set `mlp_hidden_size`." if ratio_field == "mlp_ratio" else ".")
                )
        if self.image_adapter in ("pixels", "conv") and self.num_fourier_bands == 0:
            raise ValueError(
                f"`image_adapter={self.image_adapter!r}` concatenates Fourier positions: `num_fourier_bands` must be > 0."
            )
        if self.image_adapter != "linear" and self.patch_size != 1:
            raise ValueError(f"`patch_size` applies to `image_adapter='linear'` only, got {self.patch_size}.")
        if self.fourier_max_resolution is not None and (
            not self.fourier_max_resolution or any(r < 1 for r in self.fourier_max_resolution)
        ):
            raise ValueError(f"`fourier_max_resolution` must be positive sizes, got {self.fourier_max_resolution!r}.")
        if self.num_latents is not None and self.latent_drop > 0 and int((1 - self.latent_drop) * self.num_latents) < 1:
            raise ValueError(
                f"`latent_drop={self.latent_drop}` keeps no latent of `num_latents={self.num_latents}` (it keeps "
                "floor((1 - latent_drop) * num_latents)): lower it or use more latents."
            )
        if self.pooling == "concat" and (self.num_latents is None or self.latent_drop > 0):
            raise ValueError("`pooling='concat'` needs a fixed number of latents: set `num_latents` and `latent_drop=0`.")
        problem_types = ("regression", "single_label_classification", "multi_label_classification")
        if self.problem_type is not None and self.problem_type not in problem_types:
            raise ValueError(f"`problem_type` must be one of {problem_types} or None, got {self.problem_type!r}.")
        if self.num_labels < 1:
            raise ValueError(f"`num_labels` must be at least 1, got {self.num_labels}.")
        if self.image_size % self.patch_size:
            raise ValueError(f"`image_size` ({self.image_size}) must be divisible by `patch_size` ({self.patch_size}).")

    def _validate_inputs(self):
        if isinstance(self.input_dim, list):
            if len(self.input_dim) != self.depth:
                raise ValueError(
                    f"`input_dim` is a list of {len(self.input_dim)} widths but `depth` is {self.depth}: give one "
                    "width per cross-attention block."
                )
            if self.weight_tie_layers:
                raise ValueError("`weight_tie_layers=True` needs one `input_dim` for every block, got a list.")
        if self.input_dim is not None:
            widths = self.input_dim if isinstance(self.input_dim, list) else [self.input_dim]
            if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
                raise ValueError(f"`input_dim` must be a positive integer or a list of them, got {self.input_dim!r}.")
            if self.cross_input_norm and 1 in widths:
                # LayerNorm over a single feature is identically zero: the model would never see the input's values.
                raise ValueError(
                    f"`input_dim` {self.input_dim!r} has a width of 1, which `cross_input_norm=True` (LayerNorm over "
                    "the features) maps to 0: set `cross_input_norm=False` or embed the input to a wider feature first."
                )
        if self.input_names is not None:
            if len(self.input_names) != self.depth or len(set(self.input_names)) != len(self.input_names):
                raise ValueError(
                    f"`input_names` must hold {self.depth} distinct names (one per cross-attention block), got "
                    f"{self.input_names!r}."
                )


class PerceiverConfigValueError(StrictDataclassError, ValueError):
    """An invalid config value: a `ValueError`, and the `@strict` error family transformers' configs raise."""


class PerceiverConfigTypeError(StrictDataclassError, TypeError):
    """A config value of the wrong type: a `TypeError`, and the `@strict` error family transformers' configs raise."""


def _builtin_errors(method):
    """`@strict` reports through its own exception classes (plain `Exception`s); ours are also the `ValueError` /
    `TypeError` that bad input gets everywhere else in this package, with the same message (field and cause)."""

    @wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except StrictDataclassError as error:
            if isinstance(error, (PerceiverConfigValueError, PerceiverConfigTypeError)):
                raise
            kind = PerceiverConfigTypeError if isinstance(error.__cause__, TypeError) else PerceiverConfigValueError
            raise kind(str(error)) from error

    return wrapper


# Construction, every assignment and `validate()` (which `save_pretrained` calls).
for _name in ("__init__", "__setattr__", "validate"):
    setattr(PerceiverConfig, _name, _builtin_errors(getattr(PerceiverConfig, _name)))


__all__ = ["PerceiverConfig", "PerceiverConfigTypeError", "PerceiverConfigValueError"]

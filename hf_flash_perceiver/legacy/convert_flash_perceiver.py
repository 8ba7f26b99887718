"""Convert a `flash-perceiver` 0.2.0 `state_dict` into this package's models, with identical outputs.

Python: `convert_flash_perceiver_checkpoint(state_dict, **seed_kwargs)` returns a seed-API [`Perceiver`] or
[`PerceiverIO`] (its `.to_hf()` is the transformers model). Command line:

    convert-flash-perceiver-checkpoint seed.pt out_dir --seed-kwargs '{"cross_heads": 1, "cross_head_dim": 64, ...}'

The converted config reproduces the seed's block wiring (`mlp_residual=False`, `cross_input_norm=False`, sigmoid GLU,
the seed's MLP width, biased `Wqkv`), so the converted model computes what the seed computed.

What the weights tell, the converter reads (widths, depth, latents, MLP width and gating, zero tokens, tying, output
and query widths); a seed argument passed anyway is checked against them. What they cannot tell it asks for: heads vs
head width (a 512-wide projection fits 8x64 and 16x32), the latent rotary width, and, where ambiguous, `output_mode`
and `shared_input` (see [`convert_flash_perceiver_checkpoint`]).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..modeling_perceiver import PerceiverForSequenceClassification, PerceiverIOModel, PerceiverModel
from .seed_api import (
    OUTPUT_MODE_ALIASES,
    Perceiver,
    PerceiverIO,
    seed_args,
    seed_config,
    seed_defaults,
    seed_mlp_hidden_size,
)

# Arguments of the conversion itself (not of the seed classes).
CONVERTER_KWARGS = ("flash_attn_version", "mlp_multiple_of", "shared_input")
# Not recorded in a checkpoint and not recoverable from weight shapes: the caller must say.
_REQUIRED = ("cross_heads", "cross_head_dim", "latent_heads", "latent_head_dim", "latent_rotary_emb_dim")
_REQUIRED_IO = ("query_heads", "query_head_dim")
# flash-attn's GatedMlp rounds `4 * latent_dim` up to a multiple of 256 up to 2.3, of 128 from 2.4 on.
_MLP_MULTIPLES = (128, 256)
# Wrappers that prefix every key (DistributedDataParallel, torch.compile); stripped when all keys carry one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Seed sub-module names -> ours, inside one block.
_BLOCK_PARTS = {
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "mixer.Wq": "attn.q_proj",
    "mixer.Wkv": "attn.kv_proj", "mixer.Wqkv": "attn.qkv_proj", "mixer.out_proj": "attn.o_proj",
}


@dataclass
class _SeedParam:
    """One tensor of a seed checkpoint: its expected shape, where it goes in our model, and, for a weight-tied
    duplicate, the key it must equal."""

    key: str
    shape: tuple[int, ...]
    targets: tuple[str, ...] = ()
    tied_to: str | None = None


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TypeError(f"Seed argument `{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def _as_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"`state_dict` must be a mapping of parameter names to tensors, got {type(state_dict).__name__}.")
    bad = [k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"`state_dict` must map names to tensors; these entries do not: {bad[:10]}.")
    sd = dict(state_dict)
    for prefix in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _check_kwargs(seed_kwargs: dict[str, Any], is_io: bool) -> dict[str, Any]:
    """Reject unknown names, ask for what the weights cannot tell, alias `output_mode='mean'`."""
    kind = "PerceiverIO" if is_io else "Perceiver"
    defaults = seed_defaults(kind)
    names = [a.name for a in seed_args(kind)]
    unknown = sorted(set(seed_kwargs) - set(names) - set(CONVERTER_KWARGS))
    if unknown:
        raise TypeError(
            f"Unknown argument(s) {unknown} for a flash-perceiver {kind} checkpoint; expected the seed's constructor "
            f"arguments {sorted(names)} or converter options {list(CONVERTER_KWARGS)}."
        )
    required = _REQUIRED + (_REQUIRED_IO if is_io else ())
    missing = [name for name in required if name not in seed_kwargs]
    if missing:
        shown_defaults = ", ".join(f"{name}={defaults[name]!r}" for name in missing)
        raise ValueError(
            f"Pass {missing} exactly as given to the seed model's constructor: a checkpoint does not record them and "
            "its weights cannot tell them apart (a projection of width 512 fits 8 heads x 64 as well as 16 x 32; "
            f"rotary adds no weights). The seed's defaults were {shown_defaults}."
        )
    kwargs = dict(seed_kwargs)
    for name in required:
        _positive_int(name, kwargs[name], minimum=0 if name.endswith("rotary_emb_dim") else 1)
    for name in ("cross_rotary_emb_dim", "query_rotary_emb_dim"):
        if kwargs.get(name, 0):
            # flash-attn's MHA asserts "MHA with rotary embedding does not support cross-attention yet" (2.3 - 2.7),
            # so no seed model with this setting could be built.
            raise ValueError(
                f"`{name}={kwargs[name]}`: flash-perceiver could not build a model with rotary cross-attention "
                "(flash-attn refuses it), so no checkpoint has one; pass 0 or leave it out."
            )
    if "output_mode" in kwargs:
        kwargs["output_mode"] = OUTPUT_MODE_ALIASES.get(kwargs["output_mode"], kwargs["output_mode"])
        if kwargs["output_mode"] not in ("average", "concat", "first"):
            raise ValueError(f"`output_mode` must be 'average' (or 'mean'), 'concat' or 'first', got {kwargs['output_mode']!r}.")
    return kwargs


def _shape(sd: dict[str, Tensor], key: str) -> tuple[int, ...] | None:
    return tuple(sd[key].shape) if key in sd else None


def _layer_indices(sd: dict[str, Tensor], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return sorted(found)


def _mlp_hidden(sd: dict[str, Tensor], kw: dict[str, Any], latent_dim: int) -> int | None:
    """The gated MLP's hidden width: read from the weights, checked against `flash_attn_version`/`mlp_multiple_of`."""
    multiple = kw.get("mlp_multiple_of")
    version = kw.get("flash_attn_version")
    if version is not None:
        match = re.match(r"^\s*(\d+)\.(\d+)", str(version))
        if not match:
            raise ValueError(f"`flash_attn_version` must look like '2.3.6', got {version!r}.")
        from_version = 256 if (int(match.group(1)), int(match.group(2))) < (2, 4) else 128
        if multiple is not None and multiple != from_version:
            raise ValueError(
                f"`mlp_multiple_of={multiple}` contradicts `flash_attn_version={version!r}` (whose GatedMlp rounds to "
                f"{from_version})."
            )
        multiple = from_version
    fc2 = _shape(sd, "layers.0.0.mlp.fc2.weight")
    read = fc2[1] if fc2 is not None and len(fc2) == 2 else None
    if multiple is not None:
        expected = seed_mlp_hidden_size(latent_dim, _positive_int("mlp_multiple_of", multiple))
        return expected  # a different width in the weights shows up as a shape mismatch
    if read is None:
        return seed_mlp_hidden_size(latent_dim)  # the key is missing and will be reported
    candidates = {seed_mlp_hidden_size(latent_dim, m) for m in _MLP_MULTIPLES}
    if read not in candidates:
        raise ValueError(
            f"The gated MLP of the checkpoint is {read} wide; flash-perceiver builds 4 * latent_dim ({4 * latent_dim}) "
            f"rounded up to a multiple of 128 or 256, i.e. one of {sorted(candidates)}. Is `latent_dim` right?"
        )
    return read


def _complete(sd: dict[str, Tensor], kw: dict[str, Any], is_io: bool) -> dict[str, Any]:
    """The full set of seed arguments: the caller's, and for the rest what the weights show (else seed defaults)."""
    # `input_dim`, `depth` (and `query_dim`) have no default: they are read from the weights below when not given.
    seed = {**seed_defaults("PerceiverIO" if is_io else "Perceiver"), **kw}

    def given(name: str) -> bool:
        return name in kw

    if not given("latent_dim"):
        shape = _shape(sd, "layers.0.0.norm1.weight") or _shape(sd, "latents")
        if shape:
            seed["latent_dim"] = shape[-1]
    latent_dim = _positive_int("latent_dim", seed["latent_dim"])
    if not given("num_latents"):
        seed["num_latents"] = _shape(sd, "latents")[0] if "latents" in sd else None
    layers = _layer_indices(sd, r"^layers\.(\d+)\.")
    # The seed's PerceiverIO is one cross-attention block whose `depth` counts its self-attentions.
    if is_io:
        num_blocks = 1
    else:
        num_blocks = _positive_int("depth", seed["depth"] if given("depth") else (layers[-1] + 1 if layers else 1))
        seed["depth"] = num_blocks
    self_key = "depth" if is_io else "self_per_cross_attn"
    if not given(self_key):
        self_blocks = _layer_indices(sd, r"^layers\.0\.1\.(\d+)\.")
        seed[self_key] = self_blocks[-1] + 1 if self_blocks else 1
    _positive_int(self_key, seed[self_key])
    if not given("input_dim"):
        widths = [(_shape(sd, f"layers.{i}.0.mixer.Wkv.weight") or (0, latent_dim))[-1] for i in range(num_blocks)]
        seed["input_dim"] = widths[0] if len(set(widths)) == 1 else widths
    if not given("gated_mlp"):
        fc1, fc2 = _shape(sd, "layers.0.0.mlp.fc1.weight"), _shape(sd, "layers.0.0.mlp.fc2.weight")
        if fc1 and fc2:
            seed["gated_mlp"] = fc1[0] == 2 * fc2[1]
    seed["mlp_hidden"] = _mlp_hidden(sd, kw, latent_dim) if seed["gated_mlp"] else None
    if not given("num_zero_tokens"):
        shape = _shape(sd, "zero_tokens.0")
        seed["num_zero_tokens"] = shape[0] if shape else None
    if isinstance(seed["input_dim"], tuple):
        seed["input_dim"] = list(seed["input_dim"])
    if isinstance(seed["input_dim"], list) and len(seed["input_dim"]) != num_blocks:
        raise ValueError(
            f"`input_dim` lists {len(seed['input_dim'])} widths but the model has {num_blocks} cross-attention blocks."
        )
    if not given("weight_tie_layers"):
        # Tying repeats block 1's tensors under every later index; untied blocks are initialised independently.
        block1 = {k: v for k, v in sd.items() if k.startswith("layers.1.")}
        seed["weight_tie_layers"] = num_blocks > 2 and bool(block1) and all(
            (other := sd.get(k.replace("layers.1.", f"layers.{i}.", 1))) is not None and torch.equal(v, other)
            for i in range(2, num_blocks)
            for k, v in block1.items()
        )
    head = "out_proj.1.weight"
    if is_io:
        if not given("query_dim"):
            seed["query_dim"] = (_shape(sd, "query_block.norm1.weight") or (latent_dim,))[0]
        if not given("proj_dim"):
            seed["proj_dim"] = _shape(sd, head)[0] if head in sd else None
    else:
        if not given("output_dim"):
            seed["output_dim"] = _shape(sd, head)[0] if head in sd else None
        if seed["output_dim"] is not None and not given("output_mode"):
            width = (_shape(sd, head) or (0, latent_dim))[1]
            concat_width = (seed["num_latents"] or 0) * latent_dim
            if width == concat_width and width != latent_dim:
                seed["output_mode"] = "concat"
            else:
                raise ValueError(
                    "The checkpoint has an output projection, and 'average' and 'first' pooling have the same weights: "
                    "pass `output_mode` as given to the seed model ('average' or 'first'; its default 'mean' is "
                    "'average')."
                )
        seed["output_mode"] = OUTPUT_MODE_ALIASES.get(seed["output_mode"], seed["output_mode"])
    shared = kw.get("shared_input")
    ambiguous = (not is_io) and seed["num_zero_tokens"] and num_blocks > 1 and not isinstance(seed["input_dim"], list)
    if ambiguous and shared is None:
        raise ValueError(
            "This checkpoint has zero tokens and several cross-attention blocks on one input width. flash-perceiver "
            "used block 0's zero tokens in every block when called with ONE input tensor, and each block's own when "
            "called with a LIST of inputs. Pass `shared_input=True` (the model was called with one tensor) or "
            "`shared_input=False` (with a list)."
        )
    if shared is not None and not isinstance(shared, bool):
        raise TypeError(f"`shared_input` must be a bool, got {shared!r}.")
    seed["shared_input"] = bool(ambiguous and shared)
    return seed


def _block_params(seed_prefix: str, our_prefix: str, dim: int, kv_dim: int | None, inner: int, hidden: int,
                  gated: bool, qkv_bias: bool) -> list[_SeedParam]:
    """The tensors of one flash-attn `Block` (pre-norm, MHA mixer, MLP) and their place in a `PerceiverBlock`."""
    shapes: dict[str, tuple[int, ...]] = {"norm1.weight": (dim,), "norm1.bias": (dim,)}
    if kv_dim is None:
        shapes["mixer.Wqkv.weight"] = (3 * inner, dim)
        if qkv_bias:
            shapes["mixer.Wqkv.bias"] = (3 * inner,)
    else:
        shapes["mixer.Wq.weight"] = (inner, dim)
        shapes["mixer.Wkv.weight"] = (2 * inner, kv_dim)
    shapes.update({
        "mixer.out_proj.weight": (dim, inner), "mixer.out_proj.bias": (dim,),
        "norm2.weight": (dim,), "norm2.bias": (dim,),
        "mlp.fc1.weight": (2 * hidden if gated else hidden, dim), "mlp.fc1.bias": (2 * hidden if gated else hidden,),
        "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,),
    })
    params = []
    for name, shape in shapes.items():
        part, leaf = name.rsplit(".", 1)
        params.append(_SeedParam(seed_prefix + name, shape, (f"{our_prefix}{_BLOCK_PARTS[part]}.{leaf}",)))
    return params


def _seed_layout(seed: dict[str, Any], is_io: bool) -> list[_SeedParam]:
    """Every tensor a flash-perceiver model built with `seed` has, mapped onto our model's keys."""
    latent_dim, num_blocks = seed["latent_dim"], (1 if is_io else seed["depth"])
    self_blocks = seed["depth"] if is_io else seed["self_per_cross_attn"]
    input_dims = seed["input_dim"] if isinstance(seed["input_dim"], list) else [seed["input_dim"]] * num_blocks
    gated = seed["gated_mlp"]
    hidden = seed["mlp_hidden"] if gated else 4 * latent_dim
    cross_inner = seed["cross_heads"] * seed["cross_head_dim"]
    latent_inner = seed["latent_heads"] * seed["latent_head_dim"]
    tied = seed["weight_tie_layers"]
    enc = "" if (not is_io and seed["output_dim"] is None) else "perceiver."
    params: list[_SeedParam] = []
    if seed["num_latents"] is not None:
        params.append(_SeedParam("latents", (seed["num_latents"], latent_dim), (f"{enc}latents",)))
    for i in range(num_blocks):
        b = min(i, 1) if tied else i
        block = _block_params(f"layers.{i}.0.", f"{enc}encoder.cross_layers.{b}.", latent_dim, input_dims[i],
                              cross_inner, hidden, gated, qkv_bias=False)
        for j in range(self_blocks):
            block += _block_params(f"layers.{i}.1.{j}.", f"{enc}encoder.self_layers.{b}.{j}.", latent_dim, None,
                                   latent_inner, hidden, gated, qkv_bias=True)
        if b != i:  # a tied duplicate of block 1: check it, load nothing from it
            block = [_SeedParam(p.key, p.shape, (), p.key.replace(f"layers.{i}.", "layers.1.", 1)) for p in block]
        params += block
    if seed["num_zero_tokens"]:
        for i in range(num_blocks):
            shape = (seed["num_zero_tokens"], input_dims[i])
            if seed["shared_input"]:
                # One input tensor: the seed prepended block 0's zero tokens everywhere (the others were never used).
                targets = tuple(f"{enc}encoder.zero_tokens.{k}" for k in range(num_blocks)) if i == 0 else ()
            else:
                targets = (f"{enc}encoder.zero_tokens.{i}",)
            params.append(_SeedParam(f"zero_tokens.{i}", shape, targets))
    if is_io:
        q = seed["query_dim"]
        # The seed gave the query block the encoder's MLP class: a gated MLP keeps the 4 * latent_dim width.
        q_hidden = seed["mlp_hidden"] if gated else 4 * q
        params += _block_params("query_block.", "decoder.block.", q, latent_dim, seed["query_heads"] * seed["query_head_dim"],
                                q_hidden, gated, qkv_bias=False)
        if seed["proj_dim"] is not None:
            params += _projection("decoder.norm", "decoder.proj", q, seed["proj_dim"])
    elif seed["output_dim"] is not None:
        width = latent_dim * seed["num_latents"] if seed["output_mode"] == "concat" else latent_dim
        params += _projection("head.norm", "head.classifier", width, seed["output_dim"])
    return params


def _projection(norm: str, linear: str, width: int, out: int) -> list[_SeedParam]:
    """The seed's `out_proj = Sequential(LayerNorm(width), Linear(width, out))`."""
    return [
        _SeedParam("out_proj.0.weight", (width,), (f"{norm}.weight",)),
        _SeedParam("out_proj.0.bias", (width,), (f"{norm}.bias",)),
        _SeedParam("out_proj.1.weight", (out, width), (f"{linear}.weight",)),
        _SeedParam("out_proj.1.bias", (out,), (f"{linear}.bias",)),
    ]


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"  {item}" for item in items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}):\n{shown}{more}"


def _check_against_layout(sd: dict[str, Tensor], layout: list[_SeedParam], seed: dict[str, Any]) -> None:
    expected = {p.key: p for p in layout}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(
        f"{k}: expected {p.shape}, got {tuple(sd[k].shape)}"
        for k, p in expected.items()
        if k in sd and tuple(sd[k].shape) != p.shape
    )
    untied = sorted(p.key for p in layout if p.tied_to and p.key in sd and p.tied_to in sd
                    and sd[p.key].shape == sd[p.tied_to].shape and not torch.equal(sd[p.key], sd[p.tied_to]))
    if missing or unexpected or mismatched or untied:
        shown = {k: v for k, v in seed.items() if k not in ("mlp_hidden", "use_flash_attn")}
        parts = [f"The state dict does not match a flash-perceiver model with {shown}"]
        if seed.get("mlp_hidden"):
            parts[0] += f" (gated MLP width {seed['mlp_hidden']})"
        parts[0] += "."
        if missing:
            parts.append(_listing("Missing keys", missing))
        if unexpected:
            parts.append(_listing("Unexpected keys", unexpected))
        if mismatched:
            parts.append(_listing("Shape mismatches", mismatched))
        if untied:
            parts.append(_listing("weight_tie_layers=True, but these differ from block 1's", untied))
        raise ValueError("\n".join(parts))


def convert_flash_perceiver_checkpoint(state_dict: Mapping[str, Tensor], **seed_kwargs: Any) -> Perceiver | PerceiverIO:
    r"""
    Load a `flash-perceiver` 0.2.0 `state_dict` (of its `Perceiver` or `PerceiverIO`) into this package's model.

    Args:
        state_dict (`Mapping[str, torch.Tensor]`):
            The seed model's `state_dict()` (keys `latents`, `layers.{i}.0.mixer.Wq.weight`, ...; a `module.` or
            `_orig_mod.` prefix on every key is stripped). A `PerceiverIO` checkpoint is recognised by its
            `query_block.*` keys.
        seed_kwargs:
            The arguments the seed model was built with. Required, because the weights cannot tell them:
            `cross_heads`, `cross_head_dim`, `latent_heads`, `latent_head_dim`, `latent_rotary_emb_dim`, and for
            Perceiver IO `query_heads`, `query_head_dim`; `output_mode` when the checkpoint has an output projection
            that is not `'concat'`. Any other seed argument (`input_dim`, `depth`, `num_latents`, `latent_dim`,
            `gated_mlp`, `self_per_cross_attn`, `num_zero_tokens`, `weight_tie_layers`, `output_dim`, `query_dim`,
            `proj_dim`, dropouts, `use_flash_attn`) may be passed and is then checked against the weights. Converter
            options:

            - `shared_input` (`bool`): required when the model has zero tokens, several blocks and one input width.
              The seed prepended block 0's zero tokens in every block when called with a single tensor (True), each
              block's own when called with a list (False).
            - `flash_attn_version` (`str`) or `mlp_multiple_of` (`int`): the flash-attn the seed ran on (its gated
              MLP is `4 * latent_dim` rounded up to 256 up to 2.3, to 128 from 2.4); by default the width is read from
              the weights.

    Returns:
        [`Perceiver`] or [`PerceiverIO`] in eval mode, whose forward gives the seed's outputs (its `.to_hf()` is a
        [`PerceiverModel`], [`PerceiverForSequenceClassification`] or [`PerceiverIOModel`] with the seed-parity
        config: `mlp_residual=False`, `cross_input_norm=False`, `mlp_gate_activation="sigmoid"`,
        `latent_qkv_bias=True`).

    Raises:
        `TypeError`: unknown argument names or wrongly typed values.
        `ValueError`: a required argument is missing, or the state dict does not fit (listing missing and unexpected
            keys, shape mismatches, and tied duplicates that differ).
    """
    sd = _as_state_dict(state_dict)
    is_io = "query_dim" in seed_kwargs or any(k.startswith("query_block.") for k in sd)
    kw = _check_kwargs(seed_kwargs, is_io)
    seed = _complete(sd, kw, is_io)
    layout = _seed_layout(seed, is_io)
    _check_against_layout(sd, layout, seed)

    kind = "PerceiverIO" if is_io else "Perceiver"
    config = seed_config(
        kind, {a.name: seed[a.name] for a in seed_args(kind)}, seed_wiring=True, mlp_hidden_size=seed["mlp_hidden"]
    )
    if is_io:
        hf_class, wrapper = PerceiverIOModel, PerceiverIO
    else:
        hf_class = PerceiverModel if seed["output_dim"] is None else PerceiverForSequenceClassification
        wrapper = Perceiver
    model = hf_class(config)
    converted = {target: sd[p.key] for p in layout for target in p.targets}
    # strict: our model must receive exactly one tensor per parameter (a miss here is a converter bug).
    model.load_state_dict(converted, strict=True)
    return wrapper.from_hf(model.eval())


# ---------------------------------------------------------------------------------------------------- command line
# What `load_state_dict_file` accepts, said in every error it raises about a file's content.
_EXPECTED_FILE = "expected a PyTorch state dict saved with torch.save (.pt/.pth/.bin/.ckpt) or a .safetensors file"


def _not_a_state_dict(path: str, what: str) -> ValueError:
    return ValueError(f"{path} {what}; {_EXPECTED_FILE}.")


def _torch_load(path: str) -> Any:
    """`torch.load(weights_only=True)`, with every failure to read the bytes turned into one `ValueError`.

    torch reports unreadable files with whatever its reader hit (`UnpicklingError`, `EOFError`, `KeyError`,
    `RuntimeError` from the zip reader, ...), and its weights-only message advises `weights_only=False`, i.e. running
    the file's code. Neither helps someone who passed the wrong file, so only OS errors (missing file, no permission)
    keep their type; anything else becomes a message that names the file and what was expected.
    """
    try:
        with warnings.catch_warnings():
            # Raised for pickles torch.save did not write, just before they fail to load: noise next to our error.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as err:
        # A torch.save file that also pickles other objects (an optimizer, a config class): name the first one.
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if unsupported:
            raise _not_a_state_dict(
                path,
                f"holds objects other than tensors ({unsupported.group(1)}), which a weights-only load does not read "
                "(save the model's state_dict() alone)",
            ) from None
        raise _not_a_state_dict(path, "is not a torch.save file") from None
    except Exception:  # noqa: BLE001 - any reader failure means the bytes are not a torch.save file (see docstring)
        kind = "a zip archive but not a torch.save checkpoint" if zipfile.is_zipfile(path) else "not a torch.save file"
        raise _not_a_state_dict(path, f"is {kind}") from None


def _safetensors_load(path: str) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as err:
        raise _not_a_state_dict(path, f"is not a valid .safetensors file ({err})") from None


def load_state_dict_file(path: str | os.PathLike, prefix: str = "") -> dict[str, Tensor]:
    """Read a state dict saved with `torch.save` (.pt/.pth/.bin/.ckpt, loaded with `weights_only=True`) or
    safetensors. A checkpoint dict holding it under `state_dict`, `model_state_dict` or `model` is unwrapped;
    `prefix` is stripped from the keys that carry it (others are dropped).

    Raises:
        `ValueError`: the file is empty, is not a `torch.save` / safetensors file, or does not hold a state dict (the
            message names the file and what was expected); no key carries `prefix`.
        `OSError`: the file cannot be opened (missing, a directory, no permission).
    """
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise _not_a_state_dict(path, "is empty")
    obj: Any = _safetensors_load(path) if path.endswith(".safetensors") else _torch_load(path)
    if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise _not_a_state_dict(path, f"holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    if prefix:
        obj = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
        if not obj:
            raise ValueError(f"No key of {path} starts with the prefix {prefix!r}.")
    return dict(obj)


def _read_seed_kwargs(text: str) -> dict[str, Any]:
    if os.path.isfile(text):
        with open(text, encoding="utf-8") as f:
            text = f.read()
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--seed-kwargs must be a JSON object or the path of a JSON file: {err}") from err
    if not isinstance(kwargs, dict):
        raise ValueError(f"--seed-kwargs must be a JSON object, got {type(kwargs).__name__}.")
    return kwargs


# Exit codes of the command line: 2 (as argparse uses for bad arguments) when an argument names an unusable path (the
# checkpoint is not a state dict file, the output path is a file), 1 when reading or converting fails otherwise.
EXIT_BAD_PATH = 2
EXIT_FAILED = 1
_PROG = "convert-flash-perceiver-checkpoint"


def _error(message: object, code: int) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """`convert-flash-perceiver-checkpoint CHECKPOINT OUTPUT_DIR --seed-kwargs JSON`: convert and `save_pretrained`.

    Returns the exit status: 0 when the model was written; 2 when CHECKPOINT is not a state dict file (empty, not a
    torch.save or safetensors file, not a state dict) or OUTPUT_DIR exists as a file; 1 when `--seed-kwargs` is not
    valid, a file cannot be read or written, or the state dict does not fit the seed arguments. Errors are one
    `convert-flash-perceiver-checkpoint: error: ...` message on stderr, without a traceback, and nothing is written.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Convert a flash-perceiver 0.2.0 state dict into a hf-flash-perceiver model directory "
        "(loadable with transformers' Auto classes or Perceiver/PerceiverIO.from_pretrained).",
    )
    parser.add_argument("checkpoint", help="the seed model's state_dict: .pt/.pth/.bin/.ckpt (torch.save) or .safetensors")
    parser.add_argument("output_dir", help="directory to write (save_pretrained); created if missing")
    parser.add_argument(
        "--seed-kwargs", required=True,
        help='the seed constructor arguments as a JSON object or a JSON file, at least {"cross_heads": 1, '
        '"cross_head_dim": 64, "latent_heads": 8, "latent_head_dim": 64, "latent_rotary_emb_dim": 0}; converter '
        "options shared_input / flash_attn_version / mlp_multiple_of go here too",
    )
    parser.add_argument("--prefix", default="", help="strip this prefix from the keys (e.g. 'model.' for Lightning)")
    args = parser.parse_args(argv)
    # Checked before converting: `save_pretrained` only logs an error for a file path and writes nothing.
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        return _error(
            f"the output path {args.output_dir} is an existing file; expected a directory to write the converted "
            "model into (an existing one, or a path to create).",
            EXIT_BAD_PATH,
        )
    try:
        seed_kwargs = _read_seed_kwargs(args.seed_kwargs)
    except (ValueError, OSError) as err:
        return _error(err, EXIT_FAILED)
    try:
        state_dict = load_state_dict_file(args.checkpoint, args.prefix)
    except ValueError as err:
        return _error(err, EXIT_BAD_PATH)
    except OSError as err:
        # `err` names the file when it has no `strerror` (safetensors' FileNotFoundError).
        message = f"cannot read the checkpoint {args.checkpoint}: {err.strerror}" if err.strerror else err
        return _error(message, EXIT_FAILED)
    try:
        model = convert_flash_perceiver_checkpoint(state_dict, **seed_kwargs)
    except (ValueError, TypeError) as err:
        return _error(err, EXIT_FAILED)
    hf_model = model.to_hf()
    try:
        hf_model.save_pretrained(args.output_dir)
    except OSError as err:
        return _error(f"cannot write {args.output_dir}: {err}", EXIT_FAILED)
    print(f"Saved {type(hf_model).__name__} ({type(model).__name__} API) to {args.output_dir}")
    return 0


__all__ = ["convert_flash_perceiver_checkpoint", "load_state_dict_file", "main"]

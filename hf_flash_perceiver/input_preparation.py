"""Checking and preparing what a forward call is given: inputs and their padding masks, latents, decoder queries.

Every check raises a `ValueError`/`TypeError` that names what was expected and what came, so that a bad batch
fails here, at the model's door, rather than as a shape or dtype error from deep inside torch. Floating inputs,
latents and queries are brought to the model's compute dtype (as transformers' vision models do with
`pixel_values`), except under autocast, which mixes dtypes itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from .attention_backends import KeyPaddingMask
from .configuration_perceiver import PerceiverConfig
from .context_parallel import current_group, shard_input
from .cross_attention import CrossInput


InputsType = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
MaskType = Tensor | Sequence[Tensor | None] | Mapping[str, Tensor | None] | None


def type_name(value) -> str:
    return type(value).__name__


def to_compute_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """`x` in the model's parameter dtype, unless autocast is on (it casts per op, and a long half-precision input
    must not be widened to fp32 first)."""
    if x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(dtype)


def check_floating(x, name: str, expected: str) -> None:
    """`x` must be a real floating-point tensor with data (not on the meta device)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type_name(x)}.")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape {expected}, got dtype {x.dtype}.")
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device (no data); move it to a real device first.")


def as_bool_mask(mask, name: str, dims: str, expected: tuple[int, ...]) -> Tensor:
    """Validate a padding mask (bool, or 0/1 integers as tokenizers give them) of shape `expected` and return it as
    bool. `name`/`dims` word the errors, e.g. `"Mask 0"` and `"batch, seq_len"`."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({dims}) = {expected} or None, got {type_name(mask)}.")
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


def per_block(config: PerceiverConfig, inputs: InputsType, attention_mask: MaskType) -> tuple[list, list]:
    """Bring `inputs`/`attention_mask` (tensor, list or dict) to one entry per cross-attention block."""
    depth, names = config.depth, config.input_names
    if isinstance(inputs, Tensor):
        if attention_mask is not None and not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"`attention_mask` must be a tensor when `inputs` is a tensor, got {type_name(attention_mask)}."
            )
        return [inputs] * depth, [attention_mask] * depth
    if isinstance(inputs, Mapping):
        if names is None:
            raise ValueError("`inputs` is a dict but `config.input_names` is not set; pass a list or set the names.")
        if set(inputs) != set(names):
            raise ValueError(f"`inputs` keys must be exactly {sorted(names)}, got {sorted(inputs)}.")
        if attention_mask is None:
            return [inputs[name] for name in names], [None] * depth
        if not isinstance(attention_mask, Mapping):
            raise TypeError(f"`attention_mask` must be a dict like `inputs`, got {type_name(attention_mask)}.")
        unknown = set(attention_mask) - set(names)
        if unknown:
            raise ValueError(f"`attention_mask` has unknown keys {sorted(unknown)}; expected a subset of {names}.")
        return [inputs[name] for name in names], [attention_mask.get(name) for name in names]
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        if len(inputs) != depth:
            raise ValueError(f"Expected {depth} inputs (one per cross-attention block), got {len(inputs)}.")
        if attention_mask is None:
            return list(inputs), [None] * depth
        if not isinstance(attention_mask, Sequence) or isinstance(attention_mask, str):
            raise TypeError(f"`attention_mask` must be a list like `inputs`, got {type_name(attention_mask)}.")
        if len(attention_mask) != depth:
            raise ValueError(f"Expected {depth} masks (one per input, None allowed), got {len(attention_mask)}.")
        return list(inputs), list(attention_mask)
    raise TypeError(f"`inputs` must be a tensor, a list of tensors or a dict of tensors, got {type_name(inputs)}.")


def _prepare_one(i: int, x, mask, width: int, dtype: torch.dtype) -> CrossInput:
    check_floating(x, f"Input {i}", f"(batch, seq_len, {width})")
    if x.dim() != 3:
        raise ValueError(f"Input {i} must have shape (batch, seq_len, {width}), got {tuple(x.shape)}.")
    if x.shape[-1] != width:
        raise ValueError(f"Input {i} has feature dim {x.shape[-1]} but the model expects input_dim={width}.")
    x = to_compute_dtype(x, dtype)
    if mask is not None:
        mask = as_bool_mask(mask, f"Mask {i}", "batch, seq_len", tuple(x.shape[:2]))
    group = current_group()
    if group is not None:
        # This rank's slice of a context-parallel sequence: the mask's sample-level view is global.
        shard, key_mask = shard_input(x, mask, group)
        if mask is not None:
            x = x.masked_fill(~mask[..., None], 0.0)
        return CrossInput(x, key_mask, shard=shard)
    if mask is None:
        return CrossInput(x)
    # An all-True mask is no mask, and dropping it keeps the unmasked fast path; but only a mask in host memory is
    # checked. On an accelerator the check would wait for the device to finish all queued work, every step, and leave
    # it idle while the host then issues the step (the masked kernels compute the same result). Eager mode only: a
    # data-dependent branch would break a compiled graph.
    if not torch.compiler.is_compiling() and mask.device.type == "cpu" and bool(mask.all()):
        return CrossInput(x)
    # Padding content must not matter, whatever the kernel does with masked keys: zero it (NaN/Inf in padding
    # would otherwise leak through 0 * NaN in some kernels). NaN/Inf in attended tokens is *not* hidden.
    return CrossInput(x.masked_fill(~mask[..., None], 0.0), KeyPaddingMask.from_mask(mask))


def prepare_inputs(
    config: PerceiverConfig,
    input_dims: list[int],
    inputs: InputsType,
    attention_mask: MaskType,
    dtype: torch.dtype,
    zero_tokens: nn.ParameterList | None = None,
) -> list[CrossInput]:
    """Validate inputs and masks and build each block's [`CrossInput`] once per forward.

    A tensor passed for several blocks (of the same width) is prepared once and shared — same mask object, so the
    varlen packing is computed once, and the same LayerNorm cache. Zero tokens are per-block parameters: each block
    gets its own prefix, while the mask over prefix + tokens is shared by the blocks that read the same input.
    """
    tensors, masks = per_block(config, inputs, attention_mask)
    prepared: list[CrossInput] = []
    seen: list[tuple[Tensor, Tensor | None, int, CrossInput]] = []
    for i, (x, mask) in enumerate(zip(tensors, masks)):
        # Identity, not equality: the same tensor object passed for several blocks is prepared once per width
        # (`is` rather than an id()-keyed dict: torch.compile traces it on every supported torch).
        found = next((c for x0, m0, w0, c in seen if x0 is x and m0 is mask and w0 == input_dims[i]), None)
        if found is None:
            found = _prepare_one(i, x, mask, input_dims[i], dtype)
            seen.append((x, mask, input_dims[i], found))
        if found.tokens.shape[0] != (prepared[0] if prepared else found).tokens.shape[0]:
            raise ValueError(
                f"All inputs must share one batch size; input 0 has {prepared[0].tokens.shape[0]}, "
                f"input {i} has {found.tokens.shape[0]}."
            )
        prepared.append(found)
    if zero_tokens is not None:
        extended: list[tuple[KeyPaddingMask, KeyPaddingMask]] = []
        prepared = [_add_zero_tokens(zero_tokens[i], c, extended) for i, c in enumerate(prepared)]
    return prepared


def _add_zero_tokens(
    tokens: Tensor, context: CrossInput, extended: list[tuple[KeyPaddingMask, KeyPaddingMask]]
) -> CrossInput:
    x, mask = context.tokens, context.mask
    prefix = tokens.to(x.dtype).expand(x.shape[0], -1, -1)
    if mask is not None:
        # Zero tokens are always attendable; blocks sharing one input share the extended mask too.
        found = next((m1 for m0, m1 in extended if m0 is mask), None)
        if found is None:
            ones = mask.mask.new_ones(x.shape[0], prefix.shape[1])
            found = KeyPaddingMask.from_mask(torch.cat([ones, mask.mask & mask.has_keys[:, None]], 1))
            extended.append((mask, found))
        mask = found
    # `replace` keeps the tokens' LayerNorm cache shared with the other blocks that read this input.
    return replace(context, mask=mask, prefix=prefix)


def expand_tokens(tokens, batch_size: int, width: int, name: str, dtype: torch.dtype) -> Tensor:
    """Latents or queries given as `(n, width)` or `(batch, n, width)` -> `(batch, n, width)` in `dtype`."""
    count = f"num_{name}"
    expected = f"({count}, {width}) or (batch, {count}, {width})"
    check_floating(tokens, f"`{name}`", expected)
    if tokens.dim() not in (2, 3) or tokens.shape[-1] != width:
        raise ValueError(f"`{name}` must have shape {expected}, got {tuple(tokens.shape)}.")
    if tokens.shape[-2] == 0:
        raise ValueError(f"`{name}` must hold at least one token ({count} >= 1), got shape {tuple(tokens.shape)}.")
    if tokens.dim() == 3 and tokens.shape[0] != batch_size:
        raise ValueError(f"`{name}` has batch size {tokens.shape[0]} but the inputs have {batch_size}.")
    tokens = to_compute_dtype(tokens, dtype)
    return tokens.expand(batch_size, -1, -1) if tokens.dim() == 2 else tokens


__all__ = ["InputsType", "MaskType", "as_bool_mask", "expand_tokens", "per_block", "prepare_inputs"]

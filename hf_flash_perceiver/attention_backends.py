"""Attention backends and the one entry point that dispatches to them.

Every backend takes queries `(batch, q_len, heads, head_dim)` and keys/values `(batch, kv_len, heads, head_dim)` in
the layout flash-attn uses natively (SDPA gets transposed *views*, no copies), an optional [`KeyPaddingMask`], and
returns `(output (batch, q_len, heads, head_dim), attention weights or None)`.

Backends:

- `"sdpa"` (default): `torch.nn.functional.scaled_dot_product_attention`. Unmasked, PyTorch picks its fused kernel
  (FlashAttention-2 / cuDNN on CUDA), except that FlashAttention-2 is tried first for a few query tiles over a long
  input, where cuDNN leaves the GPU mostly idle (`flash_beats_cudnn`). With a key-padding mask on CUDA in half
  precision the cuDNN kernel is *forced*: left to itself SDPA falls back to its memory-efficient kernel, which is
  several times slower for long masked cross-attention (`benchmarks/attention_kernels.py` measures the choices).
- `"varlen"`: PyTorch's own FlashAttention varlen kernel (`torch.nn.attention.varlen.varlen_attn`, CUDA, half
  precision) on packed keys when a mask is present; SDPA otherwise.
- `"flash_attention_2"`: the optional `flash-attn` package (`flash_attn_func`, and `flash_attn_varlen_func` on packed
  keys with dense queries when masked). transformers' own flash helper is not used: it unpads the *queries* with the
  key mask, which is wrong for cross-attention where latents != input length.
- `"flash_attention_4"`: the optional `flash-attn-4` package (FlashAttention-4 CuTe-DSL kernels, `flash_attn.cute`),
  dense, or varlen on packed keys when masked.
- Heads wider than the fused kernels take (over 256 channels, or not a multiple of 8) in half precision on CUDA run,
  on every backend but eager, as two tensor-core GEMMs around a softmax (`gemm_attention`; the softmax and its
  dropout one Triton kernel each way, fused_softmax.py): SDPA's own choice for them (its memory-efficient kernel, or
  fp32 math) is several times slower in backward.
- `"eager"`: matmul + softmax in fp32; the reference, and the only backend that materialises attention weights.
  Asking for weights routes *that call* through it, whatever backend the model uses.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fused_softmax import softmax_dropout


FLASH_ATTN_INSTALL = "pip install flash-attn --no-build-isolation"
FLASH_ATTN_4_INSTALL = "pip install flash-attn-4"
HALF_DTYPES = (torch.float16, torch.bfloat16)
# Read once: torch.compile cannot trace `torch.backends.cudnn.is_available()` (it returns a Python bool).
CUDNN_AVAILABLE = torch.backends.cudnn.is_available()


@dataclass
class KeyPaddingMask:
    """A validated key-padding mask, built once per input and shared by every layer that attends to that input.

    Attributes:
        mask (`torch.BoolTensor` of shape `(batch, kv_len)`):
            True = attend. Rows without any valid key are set all-True so that no kernel sees a fully masked row
            (SDPA returns NaN there); `has_keys` zeroes their output afterwards.
        has_keys (`torch.BoolTensor` of shape `(batch,)`):
            Whether a sample has at least one valid key. Its cross-attention output is zero otherwise.
    """

    mask: Tensor
    has_keys: Tensor
    _packed: tuple[Tensor, Tensor, int] | None = None
    _key_bias: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_mask(cls, mask: Tensor) -> KeyPaddingMask:
        mask = mask.bool()
        has_keys = mask.any(dim=-1)
        return cls(mask=mask | ~has_keys[:, None], has_keys=has_keys)

    def packed(self) -> tuple[Tensor, Tensor, int]:
        """`(indices of valid keys in the flattened (batch*kv_len) axis, cu_seqlens (batch+1,) int32, max_seqlen)`.

        Computed on first use and cached: one host sync per input and forward, not per layer.
        """
        if self._packed is None:
            lengths = self.mask.sum(dim=-1, dtype=torch.int32)
            indices = torch.nonzero(self.mask.flatten(), as_tuple=False).flatten()
            cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
            self._packed = (indices, cu_seqlens, int(lengths.max()))
        return self._packed

    def key_bias(self, dtype: torch.dtype) -> Tensor:
        """[`additive_key_bias`] of the whole mask, made once per dtype and shared by every layer attending to this
        input."""
        bias = self._key_bias.get(dtype)
        if bias is None:
            bias = self._key_bias[dtype] = additive_key_bias(self.mask, dtype)
        return bias

    def zero_empty_rows(self, out: Tensor) -> Tensor:
        """Cross-attention over no keys contributes nothing: zero the rows of samples that had none."""
        return out * self.has_keys.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)


def additive_key_bias(keep: Tensor, dtype: torch.dtype) -> Tensor:
    """A key-padding mask `keep (batch, kv_len)` (True = attend) as an additive bias `(batch, 1, 1, kv_len)` in
    `dtype`, for the kernels that take one (cuDNN's attention): 0 where attended, a large *finite* negative elsewhere
    (a chunk of the chunked cross-attention in which a sample has no valid key then merges with weight exp(-huge) = 0
    rather than NaN; every sample has a valid key somewhere, which [`KeyPaddingMask`] guarantees)."""
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return bias.masked_fill_(~keep, torch.finfo(dtype).min / 2)[:, None, None, :]


def eager_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: KeyPaddingMask | None, *, scale: float, dropout: float
) -> tuple[Tensor, Tensor]:
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.mask[:, None, None, :], float("-inf"))
    weights = scores.softmax(dim=-1)
    if mask is not None:
        weights = mask.zero_empty_rows(weights)
    probs = F.dropout(weights, p=dropout) if dropout > 0 else weights
    out = torch.matmul(probs, v.float()).to(query.dtype).transpose(1, 2)
    return out, weights.to(query.dtype)


def fused_kernels_fit(query: Tensor, value: Tensor | None = None) -> bool:
    """Whether PyTorch's fused FlashAttention-2 / cuDNN kernels take this call: CUDA, half precision, a head width
    they support (one width for queries/keys and values). The one check for every caller that picks a kernel itself
    (masked SDPA, chunked cross-attention)."""
    head_dim = query.shape[-1]
    if value is not None and value.shape[-1] != head_dim:
        return False
    return query.is_cuda and query.dtype in HALF_DTYPES and head_dim % 8 == 0 and head_dim <= 128 and CUDNN_AVAILABLE


# Widest head the fused FlashAttention / cuDNN kernels take.
FUSED_MAX_HEAD_DIM = 256


def is_wide_head(query: Tensor, v_head_dim: int) -> bool:
    """A half-precision CUDA call whose head width no fused kernel takes (over 256, or not a multiple of 8: the
    single 512- to 1280-wide heads and the 261/322-wide ones of transformers' pretrained Perceivers). Left to itself
    SDPA runs those on its memory-efficient kernel, whose backward is very slow at these widths, or on its fp32 math
    path."""
    widths = (query.shape[-1], v_head_dim)
    return (
        query.is_cuda and query.dtype in HALF_DTYPES
        and any(w > FUSED_MAX_HEAD_DIM or w % 8 for w in widths)
    )


# Unmasked calls where FlashAttention-2 beats SDPA's own choice (cuDNN on Hopper): cuDNN's kernels give each
# (sample, head, 128-query tile) one thread block and walk the whole key axis inside it, so a call with a few such
# tiles over a long input (latents cross-attending to long inputs at a small batch) leaves most of the GPU idle;
# FlashAttention-2 splits a long key axis over thread blocks in forward and is parallel over key blocks in backward.
# Thresholds from `benchmarks/attention_kernels.py --backends` (forward + backward, 256 queries, head widths 32 to
# 128): at 65 536 keys and more with at most 32 tiles FlashAttention-2 took 0.16 to 0.98 of cuDNN's time; with more
# tiles, or fewer keys, SDPA's own choice was within a few percent of the faster kernel.
FLASH_MIN_KEYS = 65536
FLASH_MAX_QUERY_TILES = 32


def flash_beats_cudnn(batch: int, heads: int, q_len: int, kv_len: int) -> bool:
    """Whether an unmasked fused call of this shape runs faster on FlashAttention-2 than on cuDNN (see above)."""
    return kv_len >= FLASH_MIN_KEYS and batch * heads * -(-q_len // 128) <= FLASH_MAX_QUERY_TILES


# SDPA's backends in the order an unmasked long-input call tries them (FlashAttention-2 first, then SDPA's usual
# order), where `sdpa_kernel` takes `set_priority` (recent torch releases; SDPA keeps its own order on older ones).
_FLASH_FIRST = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_HAS_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def gemm_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: KeyPaddingMask | None, *, scale: float, dropout: float
) -> Tensor:
    """Attention as two half-precision GEMMs around a softmax ([`softmax_dropout`]: fp32 inside the kernel, stored
    in half precision), differentiated by autograd: for wide heads, where the scores matrix is cheap next to the head
    width and tensor-core GEMMs beat every fused kernel that accepts the shape.

    Returns `(batch, q_len, heads, v_head_dim)`."""
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    probs, _ = softmax_dropout(scores, None if mask is None else mask.mask, dropout)
    out = torch.matmul(probs, v).transpose(1, 2)
    return out if mask is None else mask.zero_empty_rows(out)


def sdpa_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: KeyPaddingMask | None, *, scale: float, dropout: float
) -> tuple[Tensor, None]:
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    if mask is None:
        batch, q_len, heads = query.shape[:3]
        if (
            _HAS_SET_PRIORITY and not torch.compiler.is_compiling() and fused_kernels_fit(query, value)
            and flash_beats_cudnn(batch, heads, q_len, key.shape[1])
        ):
            with sdpa_kernel(_FLASH_FIRST, set_priority=True):
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
        return out.transpose(1, 2), None
    attn_mask = mask.mask[:, None, None, :]
    if fused_kernels_fit(query, value):
        # Force cuDNN: SDPA's own choice for a masked call is the memory-efficient kernel, several times slower.
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)
    else:
        # fp32 or CPU: no fused masked kernel exists; SDPA picks the best it has.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=scale)
    return mask.zero_empty_rows(out.transpose(1, 2)), None


def _pack_keys(key: Tensor, value: Tensor, mask: KeyPaddingMask) -> tuple[Tensor, Tensor, Tensor, int]:
    indices, cu_seqlens_k, max_k = mask.packed()
    batch, kv_len, heads = key.shape[:3]
    k = key.reshape(batch * kv_len, heads, key.shape[-1]).index_select(0, indices)
    v = value.reshape(batch * kv_len, heads, value.shape[-1]).index_select(0, indices)
    return k, v, cu_seqlens_k, max_k


def _dense_query_seqlens(query: Tensor) -> Tensor:
    batch, q_len = query.shape[:2]
    return torch.arange(0, (batch + 1) * q_len, q_len, device=query.device, dtype=torch.int32)


def _packed_varlen(kernel: Callable, query: Tensor, key: Tensor, value: Tensor, mask: KeyPaddingMask):
    """Dense queries over the mask's packed keys through a varlen kernel called as
    `kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k)` (every varlen API shares that order)."""
    batch, q_len, heads, head_dim = query.shape
    k, v, cu_seqlens_k, max_k = _pack_keys(key, value, mask)
    queries = query.reshape(batch * q_len, heads, head_dim)
    out = kernel(queries, k, v, _dense_query_seqlens(query), cu_seqlens_k, q_len, max_k)
    out = out[0] if isinstance(out, tuple) else out  # some kernels also return the log-sum-exp
    return mask.zero_empty_rows(out.view(batch, q_len, heads, value.shape[-1])), None


def varlen_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: KeyPaddingMask | None, *, scale: float, dropout: float
) -> tuple[Tensor, None]:
    if dropout > 0 and mask is not None:
        # Checked on every device, so that a config that cannot run on the GPU fails the same way on a CPU.
        raise ValueError("attn_implementation='varlen' has no attention dropout; use 'sdpa' or set dropout to 0.")
    if mask is None or not (query.is_cuda and query.dtype in HALF_DTYPES):
        return sdpa_attention(query, key, value, mask, scale=scale, dropout=dropout)
    from torch.nn.attention.varlen import varlen_attn

    return _packed_varlen(varlen_attn, query, key, value, mask)


def flash_attn_available() -> bool:
    # `flash_attn` alone is not enough: flash-attn-4 installs a `flash_attn` namespace holding only `cute`.
    try:
        return importlib.util.find_spec("flash_attn.flash_attn_interface") is not None
    except (ImportError, ValueError):
        return False


def _require(available: Callable[[], bool], backend: str, package: str, install: str) -> None:
    """Our own error for an optional kernel package that is missing: it names the install command."""
    if not available():
        raise ImportError(
            f"attn_implementation='{backend}' needs the optional {package}, which is not installed. Install it with "
            f"`{install}`, or use attn_implementation='sdpa' (PyTorch's built-in FlashAttention-2/cuDNN kernels)."
        )


def require_flash_attn() -> None:
    _require(flash_attn_available, "flash_attention_2", "`flash-attn` package", FLASH_ATTN_INSTALL)


def flash_attention_2(
    query: Tensor, key: Tensor, value: Tensor, mask: KeyPaddingMask | None, *, scale: float, dropout: float
) -> tuple[Tensor, None]:
    require_flash_attn()
    # Imported here: the package is optional and only this backend needs it.
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if mask is None:
        return flash_attn_func(query, key, value, dropout_p=dropout, softmax_scale=scale), None
    return _packed_varlen(partial(flash_attn_varlen_func, dropout_p=dropout, softmax_scale=scale), query, key, value, mask)


def flash_attn_4_available() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):  # `flash_attn` absent, or a flash-attn 2 install without the `cute` module
        return False


def require_flash_attn_4() -> None:
    _require(flash_attn_4_available, "flash_attention_4",
             "`flash-attn-4` package (FlashAttention-4 CuTe-DSL kernels, `flash_attn.cute`)", FLASH_ATTN_4_INSTALL)


def flash_attention_4(
    query: Tensor, key: Tensor, value: Tensor, mask: KeyPaddingMask | None, *, scale: float, dropout: float
) -> tuple[Tensor, None]:
    if dropout > 0:
        raise ValueError("attn_implementation='flash_attention_4' has no attention dropout; set it to 0 or use 'sdpa'.")
    require_flash_attn_4()
    # Imported here: the package is optional and only this backend needs it.
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    if mask is None:
        out = flash_attn_func(query, key, value, softmax_scale=scale)
        return (out[0] if isinstance(out, tuple) else out), None

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k):  # flash_attn.cute's varlen takes these by keyword
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                                      max_seqlen_k=max_k, softmax_scale=scale)

    return _packed_varlen(kernel, query, key, value, mask)


AttentionFunction = Callable[..., tuple[Tensor, Tensor | None]]

ATTENTION_FUNCTIONS: dict[str, AttentionFunction] = {
    "sdpa": sdpa_attention,
    "varlen": varlen_attention,
    "flash_attention_2": flash_attention_2,
    "flash_attention_4": flash_attention_4,
    "eager": eager_attention,
}


# Backends whose kernels need queries/keys and values of one head width.
SAME_WIDTH_BACKENDS = ("varlen", "flash_attention_2", "flash_attention_4")

# Backends whose kernels take no attention dropout (the dense SDPA fallback of `varlen` would, but the packed-key
# kernel it exists for does not: refusing the combination up front keeps it from failing at the first padded batch).
BACKENDS_WITHOUT_DROPOUT = ("varlen", "flash_attention_4")


def check_backend_dropout(name: str, config) -> None:
    """Refuse a backend without attention dropout for a config that asks for some, when the backend is chosen."""
    if name not in BACKENDS_WITHOUT_DROPOUT:
        return
    fields = ("cross_attn_dropout", "latent_attn_dropout", "query_attn_dropout")
    asked = {f: getattr(config, f) for f in fields if getattr(config, f, 0.0) > 0}
    if asked:
        raise ValueError(
            f"attn_implementation={name!r} has no attention dropout, but the config asks for {asked}; use 'sdpa' or "
            "set them to 0."
        )


def check_attn_implementation(name: str | None) -> str:
    """Validate a requested backend name (None = default) and return the one to use."""
    name = "sdpa" if name is None else name
    if not isinstance(name, str) or name not in ATTENTION_FUNCTIONS:
        raise ValueError(
            f"Unknown attn_implementation {name!r}; expected one of {sorted(ATTENTION_FUNCTIONS)}."
        )
    if name == "flash_attention_2":
        require_flash_attn()
    if name == "flash_attention_4":
        require_flash_attn_4()
    return name


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: KeyPaddingMask | None = None,
    *,
    implementation: str = "sdpa",
    dropout: float = 0.0,
    scale: float | None = None,
    output_attentions: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """The attention entry point of every layer.

    Args:
        query (`torch.Tensor` of shape `(batch, q_len, heads, head_dim)`): queries.
        key (`torch.Tensor` of shape `(batch, kv_len, heads, head_dim)`): keys.
        value (`torch.Tensor` of shape `(batch, kv_len, heads, v_head_dim)`): values (any width).
        mask ([`KeyPaddingMask`], *optional*): key padding (True = attend).
        implementation (`str`): a key of `ATTENTION_FUNCTIONS`.
        dropout (`float`): attention-probability dropout (pass 0 in eval).
        scale (`float`, *optional*): softmax scale, `1/sqrt(head_dim)` by default.
        output_attentions (`bool`): return the attention weights; this call then runs the eager reference, whatever
            `implementation` says (fused kernels never materialise the weights).

    Returns:
        `(output, weights)`: output `(batch, q_len, heads, v_head_dim)`, weights `(batch, heads, q_len, kv_len)` or None.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if output_attentions:
        implementation = "eager"
    elif is_wide_head(query, value.shape[-1]):
        # No fused kernel of any backend takes this head width.
        return gemm_attention(query, key, value, mask, scale=scale, dropout=dropout), None
    qk_dim, v_dim = query.shape[-1], value.shape[-1]
    if qk_dim != v_dim and implementation in SAME_WIDTH_BACKENDS:
        # FlashAttention kernels take one head width: zero channels change neither the scores (query/key) nor the
        # kept outputs (value), so pad the narrower side and slice the output back.
        # The scale goes into the queries: a varlen kernel applies its default, 1/sqrt(padded width).
        width = max(qk_dim, v_dim)
        padded_scale = 1.0 / math.sqrt(width)
        query = F.pad(query * (scale / padded_scale), (0, width - qk_dim))
        key = F.pad(key, (0, width - qk_dim))
        value = F.pad(value, (0, width - v_dim))
        out, weights = ATTENTION_FUNCTIONS[implementation](
            query, key, value, mask, scale=padded_scale, dropout=dropout
        )
        return out[..., :v_dim], weights
    return ATTENTION_FUNCTIONS[implementation](query, key, value, mask, scale=scale, dropout=dropout)

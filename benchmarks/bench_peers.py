"""Model builders for the benchmark: this package and its two peers, behind one call signature.

Every builder returns an `nn.Module` whose `forward(inputs, mask)` takes `inputs (batch, n, input_dim)` and an
optional bool key-padding mask `(batch, n)` (True = attend) and returns the final latents
`(batch, num_latents, latent_dim)`, so the timing loop never needs to know which model it drives.

Peers (read for their constructor arguments only; nothing of theirs is copied here):

- `perceiver-pytorch` (lucidrains) `Perceiver`, the seed's own baseline. `final_classifier_head=False` makes its
  output the final latents, the same tensor our encoder returns (its classifier would add a mean-pool and a Linear
  that our bare `PerceiverModel` does not have). `fourier_encode_data=False` feeds the raw 128-wide features, as
  our model gets them. Its block is cross-attention + GEGLU feed-forward + `self_per_cross_attn` x (self-attention
  + feed-forward), the same wiring and MLP width as ours.
- transformers' `PerceiverModel` with no preprocessor or decoder: the inputs go in as embeddings (`d_model` wide)
  and the eager attention (its only one) runs. transformers shares `qk_channels`/`v_channels` between the
  cross-attention and the self-attentions and requires the self-attention's value width to equal `d_latents`
  (residual), so 64-wide heads everywhere are impossible with 1 cross head and 8 self heads. The default here is
  transformers' own sizing (`qk_channels=v_channels=None`: one 128-wide cross head, eight 32-wide self heads), the
  closest to our model in FLOPs across n; `--tf-qk-channels` in `run.py` overrides it. Each model's own FLOPs
  are in the results, so any difference in work is visible.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from dataclasses import dataclass

import torch
from torch import Tensor, nn


PERCEIVER_PYTORCH_INSTALL = "pip install perceiver-pytorch"


class PeerUnavailable(RuntimeError):
    """A peer (or optional kernel) is not installed: its records are reported as skipped, not as failures."""


@dataclass(frozen=True)
class Shape:
    """The architecture every implementation is built at (our `PerceiverConfig` names)."""

    input_dim: int
    depth: int
    num_latents: int
    latent_dim: int
    cross_heads: int
    cross_head_dim: int
    latent_heads: int
    latent_head_dim: int
    self_per_cross_attn: int = 1

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------- this package
# The package's module-level off switches (`<module>.enabled`, each on by default) an A/B variant may turn off for its
# forwards.
SWITCHES = ("weight_cast", "fused_activation", "fused_norm", "encoder_graphs")


class HFFlashPerceiver(nn.Module):
    """Our `PerceiverModel` (or its `torch.compile` wrapper, which shares its parameters) behind the common
    `forward(inputs, mask)`; `fused_branches` is the `fused_block.enabled` setting its forwards run under (the
    package's default, the module path, when False), and `disabled` names package modules of `SWITCHES` whose
    `enabled` switch is off during them (the default path has every one on): `weight_cast` (autocast converting each
    projection weight instead of a block's together), `fused_activation` (the MLP activation in PyTorch's ops
    instead of Triton kernels), `fused_norm` (every LayerNorm in PyTorch's op), `encoder_graphs` (the encoder run
    eagerly every call instead of replayed from CUDA graphs). Compiled models read the settings when traced, and are
    retraced when they change."""

    def __init__(self, model: nn.Module, fused_branches: bool | str = False, disabled: tuple[str, ...] = ()):
        super().__init__()
        unknown = set(disabled) - set(SWITCHES)
        if unknown:
            raise ValueError(f"disabled names switches of {SWITCHES}, got {sorted(unknown)}")
        self.model = model
        self.fused_branches = fused_branches
        self.disabled = tuple(disabled)

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        from hf_flash_perceiver.fused_block import fused_branches

        modules = [importlib.import_module(f"hf_flash_perceiver.{name}") for name in self.disabled]
        previous = [module.enabled for module in modules]
        try:
            for module in modules:
                module.enabled = False
            with fused_branches(self.fused_branches):
                return self.model(inputs, attention_mask=mask).last_hidden_state
        finally:
            for module, setting in zip(modules, previous):
                module.enabled = setting


def flash_attn_4_available() -> bool:
    """flash-attn-4's CuTe kernels are importable *and* this package has a backend for them (older checkouts don't)."""
    backends = importlib.import_module("hf_flash_perceiver.attention_backends")
    if "flash_attention_4" not in backends.ATTENTION_FUNCTIONS:
        return False
    return getattr(backends, "flash_attn_4_available", lambda: False)()


def flash_attn_2_available() -> bool:
    from hf_flash_perceiver.attention_backends import flash_attn_available

    return flash_attn_available()


def build_ours(
    shape: Shape,
    attn: str = "sdpa",
    cross_attention_checkpointing: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
    gradient_checkpointing: bool = False,
    fused_branches: bool | str = False,
    disabled: tuple[str, ...] = (),
) -> HFFlashPerceiver:
    """This package's `PerceiverModel` at `shape`, on backend `attn`, in training mode, its forwards run with the
    fused residual branches set to `fused_branches` (see `hf_flash_perceiver.fused_block`) and the package switches
    named in `disabled` off (see [`HFFlashPerceiver`])."""
    from hf_flash_perceiver import PerceiverConfig, PerceiverModel

    config = PerceiverConfig(**shape.as_dict(), cross_attention_checkpointing=cross_attention_checkpointing)
    model = PerceiverModel(config)
    model.set_attn_implementation(attn)
    if gradient_checkpointing:
        # transformers >= 5.24 renamed the switch (the old name warns there); older 5.x only has the old one.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    model.train()
    return HFFlashPerceiver(torch.compile(model, fullgraph=True, mode=compile_mode) if compile else model,
                            fused_branches, disabled)


# ---------------------------------------------------------------------------------------------------- peers
class PerceiverPytorch(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.model(inputs, mask=mask)


def build_perceiver_pytorch(shape: Shape) -> PerceiverPytorch:
    """lucidrains' `Perceiver` at `shape` (raw features, no classifier: it returns the final latents)."""
    if importlib.util.find_spec("perceiver_pytorch") is None:
        raise PeerUnavailable(f"perceiver-pytorch is not installed ({PERCEIVER_PYTORCH_INSTALL})")
    from perceiver_pytorch import Perceiver

    model = Perceiver(
        num_freq_bands=1,  # unused with fourier_encode_data=False, but required
        max_freq=1.0,  # idem
        depth=shape.depth,
        input_channels=shape.input_dim,
        input_axis=1,
        num_latents=shape.num_latents,
        latent_dim=shape.latent_dim,
        cross_heads=shape.cross_heads,
        cross_dim_head=shape.cross_head_dim,
        latent_heads=shape.latent_heads,
        latent_dim_head=shape.latent_head_dim,
        self_per_cross_attn=shape.self_per_cross_attn,
        fourier_encode_data=False,
        final_classifier_head=False,
    )
    return PerceiverPytorch(model.train())


class TransformersPerceiver(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.model(inputs=inputs, attention_mask=mask).last_hidden_state


def build_transformers_perceiver(
    shape: Shape, qk_channels: int | None = None, v_channels: int | None = None
) -> TransformersPerceiver:
    """transformers' `PerceiverModel` at `shape`: one cross-attention, then `depth * self_per_cross_attn`
    self-attentions (transformers repeats a block of self-attentions after a single cross-attention, so `shape`
    must have `depth == 1` or the self-attentions are counted as `depth * self_per_cross_attn`)."""
    from transformers import PerceiverConfig as TransformersConfig
    from transformers import PerceiverModel as TransformersModel

    if shape.depth != 1:
        raise ValueError(
            f"transformers' Perceiver has a single cross-attention; got depth={shape.depth}. Use the IO shape."
        )
    mlp_ratio = 4  # our PerceiverConfig's default mlp_ratio, for both the cross and the self blocks
    config = TransformersConfig(
        d_model=shape.input_dim,
        num_latents=shape.num_latents,
        d_latents=shape.latent_dim,
        num_blocks=1,
        num_self_attends_per_block=shape.self_per_cross_attn,
        num_cross_attention_heads=shape.cross_heads,
        num_self_attention_heads=shape.latent_heads,
        qk_channels=qk_channels,
        v_channels=v_channels,
        self_attention_widening_factor=mlp_ratio,
        cross_attention_widening_factor=mlp_ratio,
        # Its default (0.1) would add dropout work that no other implementation here does.
        attention_probs_dropout_prob=0.0,
    )
    return TransformersPerceiver(TransformersModel(config).train())


def transformers_head_widths(shape: Shape, qk_channels: int | None, v_channels: int | None) -> dict[str, int]:
    """Per-head widths transformers derives from its shared channel settings (for the records)."""
    cross_qk = qk_channels if qk_channels is not None else shape.input_dim  # cross_attention_shape_for_attention="kv"
    cross_v = v_channels if v_channels is not None else cross_qk
    self_qk = qk_channels if qk_channels is not None else shape.latent_dim
    self_v = v_channels if v_channels is not None else self_qk
    return {
        "cross_qk_head_dim": cross_qk // shape.cross_heads,
        "cross_v_head_dim": cross_v // shape.cross_heads,
        "self_qk_head_dim": self_qk // shape.latent_heads,
        "self_v_head_dim": self_v // shape.latent_heads,
    }

"""Projection weights converted once per block under autocast (weight_cast.py), checked on the CPU's bf16 autocast.

What is exact here: which ops run (counted by a dispatch mode), which parameters get gradients, and the converted
weights themselves. Outputs and gradients are compared with the module path (autocast converting each weight) to a
tolerance: both compute the same bf16 GEMMs on the same bf16 weights, but the two paths allocate their copies apart,
and a CPU's GEMM may round differently with another alignment.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from hf_flash_perceiver import PerceiverModel, weight_cast
from hf_flash_perceiver.layers import PerceiverBlock
from hf_flash_perceiver.weight_cast import cast_tensors

from core_common import OpCounter, small_config

# Same bf16 operands on both paths; this covers a GEMM that blocks or accumulates differently, nothing more (a missing
# bias or a wrong weight is off by O(1)).
OUT_TOL = dict(rtol=2e-2, atol=2e-2)


class _Ops(OpCounter):
    """Counts aten ops, and the `_to_copy`s whose input is one of `watched` (by storage)."""

    def __init__(self, watched: list[torch.Tensor]):
        super().__init__()
        self.watched = {t.untyped_storage().data_ptr() for t in watched}
        self.param_casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ == "_to_copy" and isinstance(args[0], torch.Tensor):
            self.param_casts += args[0].untyped_storage().data_ptr() in self.watched
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextmanager
def _weight_cast(on: bool):
    before, weight_cast.enabled = weight_cast.enabled, on
    try:
        yield
    finally:
        weight_cast.enabled = before


def _projection_params(model: nn.Module) -> list[torch.Tensor]:
    return [
        p for block in model.modules() if isinstance(block, PerceiverBlock)
        for lin in block.attn.projections() + [block.mlp.fc1, block.mlp.fc2] for p in lin.parameters()
    ]


def _step(model: nn.Module, x: torch.Tensor, on: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], _Ops]:
    model.zero_grad(set_to_none=True)
    with _weight_cast(on), _Ops(_projection_params(model)) as ops:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).last_hidden_state
        out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), grads, ops


@pytest.mark.parametrize("tied", [False, True])
def test_projections_converted_together_once_per_forward(tied):
    """Under autocast each block's projection weights and biases are converted by one multi-tensor copy (and their
    gradients back by one), instead of one cast per tensor each way; blocks that share modules (tied layers, the
    repeated latent stack) share the conversion. Outputs and gradients are those of the module path."""
    torch.manual_seed(0)
    config = small_config(depth=3, weight_tie_layers=tied, latent_stack_repeats=2, latent_qkv_bias=True)
    model = PerceiverModel(config).train()
    x = torch.randn(2, 9, config.input_dim)

    out_off, grads_off, ops_off = _step(model, x, on=False)
    out_on, grads_on, ops_on = _step(model, x, on=True)

    blocks = {id(m) for m in model.modules() if isinstance(m, PerceiverBlock)}
    assert ops_off.param_casts >= len(_projection_params(model))  # autocast: one cast per weight, at least
    assert ops_on.param_casts == 0
    # One copy per distinct block forward (shared modules converted once) and one per block in backward.
    assert ops_on.ops["_foreach_copy_"] == 2 * len(blocks)
    assert ops_off.ops["_foreach_copy_"] == 0
    assert ops_on.ops["_to_copy"] <= ops_off.ops["_to_copy"] - ops_off.param_casts

    torch.testing.assert_close(out_on, out_off, **OUT_TOL)
    assert grads_on.keys() == grads_off.keys()
    for name, g in grads_on.items():
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, grads_off[name], **OUT_TOL, msg=name)


class _FoldOps(OpCounter):
    """Records the dtype of each `mv`/`addmv` (the fold's bias) and counts the single-tensor conversions
    (`_to_copy`) of tensors shaped like `kv_proj`'s weight."""

    def __init__(self, weight_shape: torch.Size):
        super().__init__()
        self.weight_shape = weight_shape
        self.fold_dtypes = []
        self.weight_casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mv", "addmv"):
            self.fold_dtypes.append(args[1 if name == "mv" else 2].dtype)
        if name == "_to_copy" and args[0].shape == self.weight_shape:
            self.weight_casts += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


@pytest.mark.parametrize("tied", [False, True])
def test_cross_attention_fold_is_computed_in_fp32_and_converted_with_the_block(tied):
    """The input norm's affine folded into `kv_proj` is computed with autocast off (in fp32: on CUDA autocast would
    run its matrix-vector product in bf16 and convert each operand) and converted by the block's one copy instead
    of one conversion per call; tied cross blocks fold once per forward. Outputs and every gradient are those of the
    module path."""
    torch.manual_seed(3)
    config = small_config(depth=3, weight_tie_layers=tied, cross_qkv_bias=True)
    model = PerceiverModel(config).train()
    x = torch.randn(2, 9, config.input_dim)
    kv_shape = model.encoder.cross_layers[0].attn.kv_proj.weight.shape
    with _weight_cast(False), _FoldOps(kv_shape) as off:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    with _weight_cast(True), _FoldOps(kv_shape) as on:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    assert off.weight_casts >= config.depth  # autocast converts the folded weight for every cross-attention call
    assert on.weight_casts == 0
    # One fold per distinct cross block (tied blocks share theirs), its bias by one fp32 addmv.
    assert on.fold_dtypes == [torch.float32] * len(model.encoder.cross_layers)
    out_off, grads_off, _ = _step(model, x, on=False)
    out_on, grads_on, ops = _step(model, x, on=True)
    assert ops.ops["_foreach_copy_"] == 2 * len({id(m) for m in model.modules() if isinstance(m, PerceiverBlock)})
    torch.testing.assert_close(out_on, out_off, **OUT_TOL)
    assert any("context_norm" in name for name in grads_on) and grads_on.keys() == grads_off.keys()
    for name, g in grads_on.items():
        torch.testing.assert_close(g, grads_off[name], **OUT_TOL, msg=name)


def test_frozen_and_hooked_projections_keep_the_module_path():
    """A frozen projection gets no gradient (and its copy none either); a projection with a forward hook, or a
    subclass of `nn.Linear` (as PEFT's wrappers are), is called as a module so that its hook or forward runs."""
    torch.manual_seed(1)
    config = small_config(depth=1)
    model = PerceiverModel(config).train()
    block = model.encoder.self_layers[0][0]
    block.mlp.fc1.requires_grad_(False)
    calls = []
    block.attn.o_proj.register_forward_hook(lambda m, i, o: calls.append("hook"))

    class Wrapped(nn.Linear):
        def forward(self, x):
            calls.append("wrapped")
            return super().forward(x)

    fc2 = Wrapped(block.mlp.fc2.in_features, block.mlp.fc2.out_features)
    fc2.load_state_dict(block.mlp.fc2.state_dict())
    block.mlp.fc2 = fc2
    x = torch.randn(2, 5, config.input_dim)

    out_off, grads_off, _ = _step(model, x, on=False)
    assert calls == ["hook", "wrapped"]
    calls.clear()
    out_on, grads_on, ops = _step(model, x, on=True)
    assert calls == ["hook", "wrapped"]
    assert block.mlp.fc1.weight.grad is None and block.mlp.fc1.bias.grad is None
    assert block.mlp.fc2.weight.grad is not None and block.attn.qkv_proj.weight.grad is not None
    assert ops.ops["_foreach_copy_"] >= 2  # the other projections were still converted together
    torch.testing.assert_close(out_on, out_off, **OUT_TOL)
    assert grads_on.keys() == grads_off.keys()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_keeps_the_module_path_and_the_gradients(reentrant):
    """A block recomputed under activation checkpointing converts nothing itself (its recompute runs outside the
    forward's scope): training under autocast gives the gradients of the plain run."""
    torch.manual_seed(2)
    config = small_config(depth=2)
    model = PerceiverModel(config).train()
    x = torch.randn(2, 7, config.input_dim)
    _, grads_plain, _ = _step(model, x, on=True)
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 renamed the switch
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    _, grads_ckpt, ops = _step(model, x, on=True)
    assert ops.ops["_foreach_copy_"] == 0
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, g in grads_ckpt.items():
        torch.testing.assert_close(g, grads_plain[name], **OUT_TOL, msg=name)


def test_no_autocast_or_no_grad_paths():
    """Without autocast nothing is converted; under `no_grad` (inference) the copies are made without autograd."""
    torch.manual_seed(3)
    config = small_config(depth=1)
    model = PerceiverModel(config).eval()
    x = torch.randn(1, 4, config.input_dim)
    with _Ops([]) as ops:
        model(x)
    assert ops.ops["_foreach_copy_"] == 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _Ops([]) as ops:
        out = model(x).last_hidden_state
    assert ops.ops["_foreach_copy_"] > 0 and not out.requires_grad


def test_cast_tensors_is_one_multi_tensor_copy():
    """`cast_tensors` converts weights and biases with one `torch._foreach_copy_`: each comes back in the target
    dtype with its own values (the conversion is exact rounding, compared bit for bit with `.to`), absent biases stay
    None, and tensors already in that dtype are passed through without a copy."""
    g = torch.Generator().manual_seed(7)
    w1, b1, w2 = torch.randn(12, 8, generator=g), torch.randn(12, generator=g), torch.randn(8, 12, generator=g)
    with _Ops([]) as ops:
        out = cast_tensors(torch.bfloat16, w1, b1, w2, None)
    assert ops.ops["_foreach_copy_"] == 1 and ops.ops["_to_copy"] == 0
    assert out[3] is None
    for src, dst in zip((w1, b1, w2), out[:3]):
        assert dst.dtype == torch.bfloat16 and dst.shape == src.shape
        assert torch.equal(dst, src.to(torch.bfloat16))
    half = [t.to(torch.bfloat16) for t in (w1, b1)]
    assert all(a is b for a, b in zip(cast_tensors(torch.bfloat16, *half, None), half + [None]))


def test_shared_scope_keeps_copies_made_without_grad_apart():
    """Within one scope a projection first converted under `no_grad` (a copy without autograd) is converted again
    when called with grad, so its gradient still reaches the parameter."""
    from hf_flash_perceiver.weight_cast import cast_projections, project, shared_casts

    lin = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with shared_casts(), torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad(), cast_projections([lin], x):
            assert not project(lin, x).requires_grad
        with cast_projections([lin], x):
            y = project(lin, x)
    y.float().sum().backward()
    assert lin.weight.grad is not None and lin.bias.grad is not None
    torch.testing.assert_close(lin.bias.grad, torch.full((3,), 2.0))  # d(sum)/d(bias) = batch size, exact in bf16


def test_shared_copies_prefetched_once_per_scope_with_grad():
    """The fused branches' copies (`shared_copies`, plain and without autograd history): inside a `shared_casts`
    scope with grad on, `prefetch_copies` converts a list of tensors with one multi-tensor copy and later calls
    reuse those copies, converting only what was not prefetched; outside a scope, or without grad, every call
    converts anew and nothing is kept."""
    from hf_flash_perceiver.weight_cast import prefetch_copies, shared_casts, shared_copies

    g = torch.Generator().manual_seed(3)
    w1, b1, w2 = (torch.randn(*shape, generator=g, requires_grad=True) for shape in ((6, 4), (6,), (4, 6)))
    extra = torch.randn(5, generator=g, requires_grad=True)
    with shared_casts():
        with _Ops([]) as ops:
            prefetch_copies(torch.bfloat16, [w1, b1, w2, w1])
            first = shared_copies(torch.bfloat16, w1, b1, None, w2)
            again = shared_copies(torch.bfloat16, w2, extra)
        assert ops.ops["_foreach_copy_"] == 2  # the prefetch, then `extra` alone
        assert first[2] is None and again[0] is first[3]
        for src, dst in zip((w1, b1, w2, extra), (first[0], first[1], first[3], again[1])):
            assert dst.dtype == torch.bfloat16 and not dst.requires_grad and dst.grad_fn is None
            assert torch.equal(dst, src.detach().to(torch.bfloat16))
        with torch.no_grad():
            assert shared_copies(torch.bfloat16, w1)[0] is not first[0]
    with _Ops([]) as ops:
        prefetch_copies(torch.bfloat16, [w1])
        a, b = shared_copies(torch.bfloat16, w1)[0], shared_copies(torch.bfloat16, w1)[0]
    assert ops.ops["_foreach_copy_"] == 2 and a is not b


def test_prefetch_counts_the_calls_reading_each_copy():
    """Given a mapping, `prefetch_copies` records how many calls of the forward read each copy: `converted_once`
    says which blocks may convert theirs again in backward (BackwardCopies) rather than keep it; outside the scope,
    or for a tensor it was not told about, the answer is False (keep)."""
    from hf_flash_perceiver.weight_cast import converted_once, prefetch_copies, shared_casts

    once, twice, untold = (torch.randn(4, 4, requires_grad=True) for _ in range(3))
    with shared_casts():
        prefetch_copies(torch.bfloat16, {once: 1, twice: 2})
        assert converted_once(torch.bfloat16, once)
        assert not converted_once(torch.bfloat16, twice) and not converted_once(torch.bfloat16, untold)
        assert not converted_once(torch.float16, once)
    assert not converted_once(torch.bfloat16, once)


def test_backward_copies_convert_once_per_block_and_drop():
    """BackwardCopies: the registered weights of a block are converted by one call on the first `take`, each branch
    gets its own part, and the copies are dropped once every branch has taken its part (a second backward through
    the same graph converts again)."""
    from hf_flash_perceiver.weight_cast import BackwardCopies

    a, b, c = (torch.randn(3, 3) for _ in range(3))
    copies = BackwardCopies(torch.bfloat16)
    first, second = copies.add(a, b), copies.add(c)
    assert copies._copies is None  # nothing converted in forward
    got_second = copies.take(second)
    assert copies._copies is not None and torch.equal(got_second[0], c.to(torch.bfloat16))
    got_first = copies.take(first)
    assert [t.dtype for t in got_first] == [torch.bfloat16] * 2 and torch.equal(got_first[1], b.to(torch.bfloat16))
    assert copies._copies is None  # dropped after the last branch
    assert torch.equal(copies.take(first)[0], a.to(torch.bfloat16)) and copies._copies is None


def test_unshared_keeps_no_copies_inside_a_shared_scope():
    """`unshared()` (a block under activation checkpointing) hides the enclosing scope: copies made inside are not
    kept for the forward, and the scope's own copies are there again after it."""
    from hf_flash_perceiver.weight_cast import shared_casts, shared_copies, unshared

    w = torch.randn(4, 3, requires_grad=True)
    with shared_casts():
        kept = shared_copies(torch.bfloat16, w)[0]
        with unshared():
            inside = [shared_copies(torch.bfloat16, w)[0] for _ in range(2)]
        assert inside[0] is not kept and inside[1] is not inside[0]
        assert shared_copies(torch.bfloat16, w)[0] is kept

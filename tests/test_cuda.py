"""GPU checks: fused kernels run, agree with the fp32 reference, and masks stay on fast kernels.

Run on a GPU machine with `pytest -m cuda`.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hf_flash_perceiver import PerceiverModel
from hf_flash_perceiver.attention_backends import attention

from reference import reference_forward
from core_common import (OpCounter, build, make_inputs, random_config, rel_err, shared_key_value_reference,
                         small_config)


pytestmark = pytest.mark.cuda

BF16_REL_TOL = 2e-2  # bf16 vs fp32 reference: relative error of the whole output (Frobenius norm)
BF16_GRAD_REL_TOL = 4e-2  # the same for input gradients, which pass through every layer twice
FUSED = ["sdpa", "varlen"]


def cuda_model(cfg, impl, seed=0):
    return build(cfg, impl, seed).cuda()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("impl", FUSED + ["eager"])
def test_bf16_matches_fp32_reference(seed, impl):
    cfg = random_config(seed)
    model = cuda_model(cfg, impl, seed)
    x = make_inputs(cfg, batch=4, seq=37, seed=seed)
    x = [t.cuda() for t in x] if isinstance(x, list) else x.cuda()
    mask = torch.rand(4, 37, device="cuda") < 0.7
    mask[:, 0] = True
    masks = [mask] * cfg.depth
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, masks if isinstance(x, list) else mask).last_hidden_state
    ref, _, _ = reference_forward(model.float().cpu(), [t.cpu() for t in x] if isinstance(x, list) else x.cpu(),
                                  [m.cpu() for m in masks] if isinstance(x, list) else mask.cpu())
    assert rel_err(out.cpu(), ref) <= BF16_REL_TOL


@pytest.mark.parametrize("impl", FUSED)
def test_mask_equals_truncation_cuda(impl):
    cfg = small_config(latent_dim=64, cross_head_dim=64, latent_head_dim=32, cross_rotary_emb_dim=16, num_zero_tokens=2)
    model = cuda_model(cfg, impl).bfloat16()
    x = torch.randn(4, 50, cfg.input_dim, device="cuda", dtype=torch.bfloat16)
    lengths = [50, 31, 7, 1]
    mask = torch.arange(50, device="cuda")[None] < torch.tensor(lengths, device="cuda")[:, None]
    out = model(x, mask).last_hidden_state
    for b, n in enumerate(lengths):
        alone = model(x[b : b + 1, :n]).last_hidden_state
        assert rel_err(out[b : b + 1], alone) <= BF16_REL_TOL


@pytest.mark.parametrize("impl", FUSED)
def test_fully_masked_sample_finite_cuda(impl):
    cfg = small_config(latent_dim=64, cross_head_dim=64)
    model = cuda_model(cfg, impl).bfloat16()
    x = torch.randn(3, 20, cfg.input_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(3, 20, dtype=torch.bool, device="cuda")
    mask[1] = False
    out = model(x, mask).last_hidden_state
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[1] == 0)


def _ops(fn):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("impl, fast_op", [("sdpa", "aten::_scaled_dot_product_cudnn_attention"),
                                            ("varlen", "varlen")])
def test_masked_path_uses_fast_kernel(impl, fast_op):
    cfg = small_config(input_dim=128, latent_dim=256, num_latents=64, cross_head_dim=64, latent_head_dim=64)
    model = cuda_model(cfg, impl).train()
    x = torch.randn(8, 1024, 128, device="cuda")
    mask = torch.rand(8, 1024, device="cuda") < 0.8

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, mask).last_hidden_state.float().mean().backward()

    step()
    ops = _ops(step)
    print(f"\n[{impl}] attention ops:", sorted(o for o in ops if "attention" in o or "attn" in o or "varlen" in o))
    assert any(fast_op in o for o in ops), sorted(ops)
    assert not any("efficient_attention" in o for o in ops), "memory-efficient fallback ran"
    assert not any(o == "aten::_scaled_dot_product_attention_math" for o in ops), "math fallback ran"


def test_unmasked_sdpa_uses_fused_kernel():
    cfg = small_config(input_dim=64, latent_dim=128, cross_head_dim=64, latent_head_dim=64)
    model = cuda_model(cfg, "sdpa")
    x = torch.randn(4, 512, 64, device="cuda")

    def fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)

    ops = _ops(fwd)
    print("\n[sdpa unmasked] attention ops:", sorted(o for o in ops if "attention" in o))
    assert any("flash_attention" in o or "cudnn_attention" in o for o in ops)
    assert not any("efficient_attention" in o or o.endswith("attention_math") for o in ops)


@pytest.mark.parametrize("batch, heads, kv_len, kernel", [
    (2, 1, 65536, "aten::_scaled_dot_product_flash_attention"),  # few query tiles over a long input
    (16, 8, 4096, "aten::_scaled_dot_product_cudnn_attention"),  # SDPA's own choice on Hopper
])
def test_unmasked_sdpa_kernel_choice_and_numerics(batch, heads, kv_len, kernel):
    """The "sdpa" backend sends a few query tiles over a long input to FlashAttention-2 and leaves other calls to
    SDPA's choice; either way forward and gradients match the fp32 eager reference on fresh random inputs."""
    if "cudnn" in kernel and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("SDPA prefers cuDNN attention on Hopper and newer only")
    g = torch.Generator(device="cuda").manual_seed(kv_len)
    q, k, v = (torch.randn(batch, n, heads, 64, device="cuda", generator=g) for n in (256, kv_len, kv_len))
    grad = torch.randn(batch, 256, heads, 64, device="cuda", generator=g)
    half = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    full = [t.clone().requires_grad_() for t in (q, k, v)]

    def step():
        out, _ = attention(*half, None, implementation="sdpa")
        out.backward(grad.bfloat16())
        return out

    ops = _ops(step)
    assert kernel in ops, sorted(o for o in ops if "attention" in o)
    for t in half:
        t.grad = None
    out = step()
    ref, _ = attention(*full, None, implementation="eager")
    ref.backward(grad)
    assert rel_err(out, ref) <= BF16_REL_TOL
    for got, want in zip(half, full):
        assert rel_err(got.grad, want.grad) <= BF16_GRAD_REL_TOL


def test_gradients_bf16_close_to_fp32():
    cfg = small_config(latent_dim=64, cross_head_dim=32, latent_head_dim=32, latent_rotary_emb_dim=16)
    model = cuda_model(cfg, "sdpa").train()
    x = torch.randn(4, 40, cfg.input_dim, device="cuda")
    mask = torch.rand(4, 40, device="cuda") < 0.7
    mask[:, 0] = True

    def grads(autocast):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            model(x, mask).last_hidden_state.float().square().mean().backward()
        return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])

    ref = grads(False)
    got = grads(True)
    assert rel_err(got, ref) <= 5e-2  # bf16 gradients vs fp32: ~1e-2 expected, 5e-2 bound


def test_gradient_checkpointing_cuda():
    cfg = small_config(latent_dim=64, cross_head_dim=32, latent_head_dim=32)
    model = cuda_model(cfg, "sdpa").train()
    x = torch.randn(2, 30, cfg.input_dim, device="cuda")
    model(x).last_hidden_state.sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(x).last_hidden_state.sum().backward()
    for a, b in zip(ref, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_cross_attention_cuda(masked):
    # cross_attention_checkpointing on CUDA: cuDNN per chunk (bias for masks, log-sum-exp merge), grads by
    # recompute; compared with the regular fused path in the same precision.
    cfg = small_config(input_dim=64, latent_dim=128, num_latents=32, cross_head_dim=64, latent_head_dim=64,
                       cross_rotary_emb_dim=16, num_zero_tokens=2)
    regular = cuda_model(cfg, "sdpa").train()
    chunked_cfg = cfg.__class__(**{**cfg.to_dict(), "cross_attention_checkpointing": True,
                                   "cross_attention_chunk_size": 100})
    chunked = PerceiverModel._from_config(chunked_cfg).cuda().train()
    chunked.load_state_dict(regular.state_dict())
    x = torch.randn(4, 450, 64, device="cuda")
    mask = None
    if masked:
        mask = torch.arange(450, device="cuda")[None] < torch.tensor([450, 333, 120, 5], device="cuda")[:, None]

    def run(model):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, mask).last_hidden_state
        out.float().square().mean().backward()
        return out, torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])

    out_r, g_r = run(regular)
    ops = _ops(lambda: run(chunked))
    out_c, g_c = run(chunked)
    assert any("cudnn_attention" in o for o in ops)
    assert rel_err(out_c, out_r) <= BF16_REL_TOL
    assert rel_err(g_c, g_r) <= 5e-2


def test_context_parallel_single_rank_cuda(tmp_path):
    # One NCCL rank: the context-parallel path (fused per-chunk kernels, the all-reduce merge, the summed backward)
    # against the regular fused path in the same precision. Two ranks are tests/test_context_parallel.py (gloo).
    import torch.distributed as dist

    from hf_flash_perceiver import context_parallel

    cfg = small_config(input_dim=64, latent_dim=128, num_latents=32, cross_head_dim=64, latent_head_dim=64,
                       cross_rotary_emb_dim=16, num_zero_tokens=2)
    model = cuda_model(cfg, "sdpa").train()
    x = torch.randn(4, 450, 64, device="cuda")
    mask = torch.arange(450, device="cuda")[None] < torch.tensor([450, 333, 120, 0], device="cuda")[:, None]

    def run():
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, mask).last_hidden_state
        out.float().square().mean().backward()
        return out, torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])

    out_r, g_r = run()
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        with context_parallel():
            ops = _ops(run)
            out_c, g_c = run()
    finally:
        dist.destroy_process_group()
    assert any("cudnn_attention" in o for o in ops)
    assert rel_err(out_c, out_r) <= BF16_REL_TOL
    assert rel_err(g_c, g_r) <= 5e-2


@pytest.mark.parametrize("impl, available", [("flash_attention_2", "flash_attn_available"),
                                             ("flash_attention_4", "flash_attn_4_available")])
def test_optional_flash_backends_match_reference(impl, available):
    import importlib

    attn = importlib.import_module("hf_flash_perceiver.attention_backends")
    if not getattr(attn, available)():
        pytest.skip(f"{impl}: optional package not installed on this machine")
    cfg = small_config(latent_dim=128, cross_head_dim=64, latent_head_dim=64, num_zero_tokens=1)
    model = cuda_model(cfg, impl).bfloat16()
    x = torch.randn(4, 300, cfg.input_dim, device="cuda", dtype=torch.bfloat16)
    mask = torch.rand(4, 300, device="cuda") < 0.7
    out = model(x, mask).last_hidden_state
    ref, _, _ = reference_forward(model.float().cpu(), x.float().cpu(), mask.cpu())
    assert rel_err(out.cpu(), ref) <= BF16_REL_TOL


@pytest.mark.parametrize("kind", ["sequence", "image", "masked_lm", "io_regression"])
def test_heads_train_step_bf16_cuda(kind):
    # Every head through a bf16-autocast training step on CUDA: finite loss and gradients, logits close to fp32.
    from trainer_common import make_case

    model, data = make_case(kind)
    model = model.cuda().train()
    batch = {k: torch.stack([item[k] for item in data.items]).cuda() for k in data.items[0]}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        low = model(**batch).logits
    with torch.no_grad():
        ref = model(**batch).logits
    assert rel_err(low, ref) <= 5e-2  # bf16 autocast vs fp32 logits of the same weights


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("qk,v", [(512, 512), (261, 261), (1024, 96), (32, 96)])
def test_wide_and_mixed_width_heads_cuda(impl, qk, v):
    # transformers' pretrained Perceivers cross-attend with single heads of 261 to 1280 channels, and with value
    # widths unlike the query/key width: no fused kernel takes those, so they run as two GEMMs (or padded): forward
    # and gradients against the fp32 reference / fp32 eager model, with padding.
    cfg = small_config(cross_heads=1, cross_head_dim=qk, cross_v_head_dim=v, latent_dim=64, latent_heads=2,
                       latent_head_dim=32, latent_v_head_dim=48, cross_query_residual=False, latent_stack_repeats=2)
    model = cuda_model(cfg, impl)
    x = torch.randn(3, 300, cfg.input_dim, device="cuda", requires_grad=True)
    mask = torch.rand(3, 300, device="cuda") < 0.8
    mask[:, 0] = True
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x, mask).last_hidden_state
    weights = torch.randn(out.shape, device="cuda")
    (out.float() * weights).sum().backward()
    ref, _, _ = reference_forward(model.float().cpu(), x.detach().cpu(), mask.cpu())
    assert rel_err(out.detach().cpu(), ref) <= BF16_REL_TOL
    x_ref = x.detach().cpu().requires_grad_(True)
    eager = model.cpu()
    eager.config._attn_implementation = "eager"
    (eager(x_ref, mask.cpu()).last_hidden_state * weights.cpu()).sum().backward()
    # bf16 input gradients through a cross-attention and 2 x 2 self-attentions, against fp32 eager.
    assert rel_err(x.grad.cpu(), x_ref.grad) <= BF16_GRAD_REL_TOL
    if qk > 256 or qk % 8:
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                cuda_model(cfg, impl)(x.detach(), mask)

        ops = _ops(run)
        assert not any("efficient_attention" in op or "_math" in op for op in ops), sorted(ops)
        # The softmax over the materialised scores is the Triton kernel, not PyTorch's fp32 one under autocast.
        assert "_softmax_forward" in ops and not any("SoftMaxForward" in op for op in ops), sorted(ops)


# The wide heads' softmax (fused_softmax.py) against fp64: probabilities within one rounding of bf16 (half an ulp;
# 1.01 ulp allowed); gradients within 6e-3 relative: they are computed from the bf16 probabilities and dropped-out
# probabilities kept by the forward and rounded once more when written (2.1e-3 to 3.2e-3 on these cases, emulated in
# PyTorch with the same roundings to nearest).
@pytest.mark.parametrize("n, masked, dropout, sums", [(50176, False, 0.1, True), (5000, True, 0.0, False),
                                                      (300, True, 0.25, True), (256, False, 0.0, True)])
def test_fused_softmax_dropout_matches_fp64(n, masked, dropout, sums):
    from hf_flash_perceiver.fused_softmax import _SoftmaxDropout, fused_softmax_fits, softmax_dropout

    gen = torch.Generator(device="cuda").manual_seed(n)
    batch, rows = 3, 5
    scores = (torch.randn(batch, rows, n, device="cuda", generator=gen) * 3).to(torch.bfloat16).requires_grad_()
    mask = None
    if masked:
        mask = torch.rand(batch, n, device="cuda", generator=gen) < 0.7
        mask[1, 0], mask[1, 1:] = True, False  # one key left (every row keeps one: KeyPaddingMask's guarantee)
    assert fused_softmax_fits(scores, dropout)
    dropped, row_sums = softmax_dropout(scores, mask, dropout, row_sums=sums)
    assert isinstance(dropped.grad_fn, _SoftmaxDropout._backward_cls) and dropped.dtype == torch.bfloat16
    probs = dropped.grad_fn.saved_tensors[0].view_as(dropped)
    s64 = scores.detach().double().requires_grad_()
    ref = torch.softmax(s64 if mask is None else s64.masked_fill(~mask[:, None, :], float("-inf")), -1)
    ulp = torch.finfo(torch.bfloat16).eps * ref.detach().abs()
    assert ((probs.double() - ref.detach()).abs() <= ulp * 1.01 + 1e-30).all()
    keep = dropped != 0 if dropout > 0 else torch.ones_like(dropped, dtype=torch.bool)
    if dropout > 0:
        valid = ref.detach() > 0
        count = valid.sum().item()
        rate = 1 - (keep & valid).sum().item() / count
        # A fresh binomial draw each run (the seed comes from PyTorch's generator): within five standard deviations.
        assert abs(rate - dropout) <= 5 * (dropout * (1 - dropout) / count) ** 0.5, (rate, count)
        torch.testing.assert_close(dropped[keep], (probs[keep].float() / (1 - dropout)).to(torch.bfloat16),
                                   rtol=0.0079, atol=0.0)  # one bf16 ulp: rounded once from fp32, not twice
        # Another call draws another mask.
        assert not torch.equal(softmax_dropout(scores, mask, dropout)[0] != 0, keep)
    if mask is not None:
        assert not dropped.detach()[~mask[:, None, :].expand_as(dropped)].any()
    want = ref * keep / (1 - dropout)
    if sums:
        assert rel_err(row_sums.double(), want.detach().sum(-1)) <= 1e-5
    g = torch.randn(dropped.shape, device="cuda", generator=gen).to(torch.bfloat16)
    d_sums = torch.randn(batch, rows, device="cuda", generator=gen) if sums else None
    ((dropped.float() * g.float()).sum() + ((row_sums * d_sums).sum() if sums else 0)).backward()
    ref_loss = (want * g.double()).sum() + ((want.sum(-1) * d_sums.double()).sum() if sums else 0)
    (want_grad,) = torch.autograd.grad(ref_loss, s64)
    assert rel_err(scores.grad.double(), want_grad) <= 6e-3


@pytest.mark.parametrize("masked, dropout", [(True, 0.1), (False, 0.0)])
def test_shared_key_value_attention_matches_fp64(masked, dropout):
    # `softmax(q x^T) x` as one node (the absorbed cross-attention's core): output, row sums and both inputs'
    # gradients against fp64 autograd with the same dropout mask; bf16 GEMMs and probabilities: BF16_REL_TOL.
    from hf_flash_perceiver.fused_softmax import _SharedKeyValueAttention, shared_key_value_attention

    gen = torch.Generator(device="cuda").manual_seed(3)
    q = (torch.randn(2, 64, 512, device="cuda", generator=gen) * 0.05).to(torch.bfloat16).requires_grad_()
    x = torch.randn(2, 20000, 512, device="cuda", generator=gen).to(torch.bfloat16).requires_grad_()
    mask = None
    if masked:
        mask = torch.rand(2, 20000, device="cuda", generator=gen) < 0.6
        mask[1, :15000] = False
    mixed, sums = shared_key_value_attention(q, x, mask, dropout, row_sums=True)
    assert isinstance(mixed.grad_fn, _SharedKeyValueAttention._backward_cls)
    dropped = mixed.grad_fn.saved_tensors[3]
    keep = dropped != 0 if dropout > 0 else torch.ones_like(dropped, dtype=torch.bool)
    g = torch.randn(mixed.shape, device="cuda", generator=gen).to(torch.bfloat16)
    d_sums = torch.randn(2, 64, device="cuda", generator=gen)
    ((mixed.float() * g.float()).sum() + (sums * d_sums).sum()).backward()
    q64, x64, want_dropped, want = shared_key_value_reference(q, x, mask, keep, dropout)
    want_q, want_x = torch.autograd.grad((want * g.double()).sum() + (want_dropped.sum(-1) * d_sums).sum(), (q64, x64))
    for name, got, ref in [("output", mixed, want), ("sums", sums, want_dropped.sum(-1)), ("q", q.grad, want_q),
                           ("x", x.grad, want_x)]:
        assert rel_err(got.double(), ref.detach()) <= BF16_REL_TOL, name


# Fused LayerNorm: values within one rounding of the output dtype of the fp32 LayerNorm; gradients computed in fp32
# from the same output gradient, differing from autograd's fp32 ones only in summation order.
NORM_GRAD_RTOL = 1e-4


@pytest.mark.parametrize("width", [64, 256, 1000, 1280, 3000])
@pytest.mark.parametrize("case", ["fp32-autocast", "bf16", "fp32", "affine-free-autocast"])
def test_fused_layer_norm_matches_pytorch(width, case):
    from hf_flash_perceiver.fused_norm import fused_layer_norm_fits, layer_norm

    gen = torch.Generator(device="cuda").manual_seed(width)
    in_dtype = torch.bfloat16 if case == "bf16" else torch.float32
    x = (torch.randn(3, 517, width, device="cuda", generator=gen) * 3 + 1).to(in_dtype).requires_grad_()
    affine = case != "affine-free-autocast"
    weight = (torch.randn(width, device="cuda", generator=gen) + 1).requires_grad_() if affine else None
    bias = torch.randn(width, device="cuda", generator=gen).requires_grad_() if affine else None
    autocast = case.endswith("autocast")
    assert fused_layer_norm_fits(x)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = layer_norm(x, weight, bias, 1e-5)
    out_dtype = torch.bfloat16 if autocast or case == "bf16" else torch.float32
    assert y.dtype == out_dtype and y.shape == x.shape

    leaves = [t for t in (x, weight, bias) if t is not None]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = torch.nn.functional.layer_norm(ref_leaves[0], (width,), *(ref_leaves[1:] if affine else (None, None)), 1e-5)
    # One rounding to the output dtype apart (fp32 output: summation order only).
    tol = dict(rtol=2**-7, atol=2**-7) if out_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), ref, **tol)

    dy = torch.randn(x.shape, device="cuda", generator=gen).to(out_dtype)
    grads = torch.autograd.grad(y, leaves, dy)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy.float())
    for got, want, leaf in zip(grads, ref_grads, leaves):
        assert got.dtype == leaf.dtype
        scale = want.abs().max().item()
        # bf16 input gradients are rounded once more on output.
        rtol = 2**-7 if got.dtype == torch.bfloat16 else NORM_GRAD_RTOL
        assert (got.float() - want).abs().max().item() <= rtol * scale, (case, width)


@pytest.mark.parametrize("seed", range(3))
def test_block_norm_kernels_in_a_model(seed, monkeypatch):
    """With every block norm on the Triton path (the size threshold lowered for these small inputs), a bf16 model
    is as close to its fp32 reference as with PyTorch's norms, its norms write bf16 for the projections, and it
    launches fewer kernels per step (no cast after each norm, no gamma/beta kernel of PyTorch's)."""
    from hf_flash_perceiver import fused_norm

    cfg = random_config(seed)
    model = cuda_model(cfg, "sdpa", seed).train()
    x = make_inputs(cfg, batch=3, seq=29, seed=seed)
    x = [t.cuda() for t in x] if isinstance(x, list) else x.cuda()
    dtypes = []
    block = model.encoder.self_layers[0][0]
    block.norm1.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x).last_hidden_state
        out.float().square().mean().backward()
        return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def fp32_step():
        model.zero_grad(set_to_none=True)
        out = model(x).last_hidden_state
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    ref_out, ref_grads = fp32_step()
    native_out, native_grads = step()
    native_kernels = _kernel_count(step)
    monkeypatch.setattr(fused_norm, "BLOCK_NORM_MIN_ELEMENTS", 0)
    dtypes.clear()
    out, grads = step()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert _kernel_count(step) < native_kernels
    assert rel_err(out, ref_out) < BF16_REL_TOL
    # Parameter gradients: about as accurate as the bf16 path with PyTorch's norms (within twice its error against
    # fp32, or the bf16 gradient tolerance where that is larger); a wrong kernel is off by O(1).
    for name, ref in ref_grads.items():
        native_err = rel_err(native_grads[name], ref)
        assert rel_err(grads[name], ref) <= max(BF16_GRAD_REL_TOL, 2 * native_err), (name, native_err)


# The MLP activation as Triton kernels (fused_activation.py): computed in fp32 and rounded once to the output dtype,
# so within one bf16 rounding (2**-8 relative; 2**-7 allowed) of the fp32 PyTorch activation in bf16, and within fp32
# rounding of it in fp32 (erf / exp implementations differ in the last bits).
def _gated_reference(h, name):
    from hf_flash_perceiver.fused_activation import GATE_ACTIVATIONS

    value, gate = h.float().chunk(2, dim=-1)
    return value * GATE_ACTIVATIONS[name](gate)


@pytest.mark.parametrize("name", ["gelu", "silu", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [100, 1024, 1300])
def test_gated_activation_kernels_match_pytorch(name, dtype, hidden):
    from hf_flash_perceiver import fused_activation

    gen = torch.Generator(device="cuda").manual_seed(hidden)
    h = (torch.randn(3, 37, 2 * hidden, device="cuda", generator=gen) * 2).to(dtype).requires_grad_()
    dy = torch.randn(3, 37, hidden, device="cuda", generator=gen).to(dtype)
    with OpCounter() as ops:
        y = fused_activation.gated_activation(h, name)
        (dh,) = torch.autograd.grad(y, h, dy)
    # One Triton kernel each way, nothing from PyTorch's activations or a concatenation.
    assert not {"gelu", "silu", "sigmoid", "mul", "cat", "gelu_backward"} & set(ops.ops), dict(ops.ops)
    assert y.dtype == dh.dtype == dtype and y.shape == dy.shape and dh.shape == h.shape

    ref_h = h.detach().float().requires_grad_()
    ref = _gated_reference(ref_h, name)
    (ref_dh,) = torch.autograd.grad(ref, ref_h, dy.float())
    tol = dict(rtol=2**-7, atol=2**-7) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), ref, **tol)
    torch.testing.assert_close(dh.float(), ref_dh, **tol)


@pytest.mark.parametrize("gate", [None, "gelu", "silu"])
def test_activation_backward_recomputes_the_output(gate):
    """The backward kernel's second output is the forward's output again (what the fused MLP branch uses instead of
    keeping it), and its gradient is the same as without it."""
    from hf_flash_perceiver.fused_activation import activation_backward, activation_forward

    gen = torch.Generator(device="cuda").manual_seed(7)
    hidden = 300
    pre = (torch.randn(517, 2 * hidden if gate else hidden, device="cuda", generator=gen) * 2).bfloat16()
    d_out = torch.randn(517, hidden, device="cuda", generator=gen).bfloat16()
    out = activation_forward(pre, gate)
    d_pre, again = activation_backward(d_out, pre, gate, recompute_output=True)
    d_pre_only, none = activation_backward(d_out, pre, gate)
    assert none is None and again.dtype == out.dtype and again.shape == out.shape
    # The same fp32 expression rounded once in both kernels; the tolerance allows one bf16 rounding step should the
    # compiler contract the two kernels' arithmetic differently.
    torch.testing.assert_close(again.float(), out.float(), rtol=2**-8, atol=2**-8)
    torch.testing.assert_close(d_pre.float(), d_pre_only.float(), rtol=2**-8, atol=2**-8)


@pytest.mark.parametrize("affine", ["weight-and-bias", "weight-only", "none"])
def test_norm_backward_sums_the_residual_gradient(affine):
    """`residual_sum=True`: the row sum of the residual gradient (a projection's bias gradient) from the LayerNorm
    backward's own reduction, beside the affine's gradients, which it leaves unchanged."""
    from hf_flash_perceiver.fused_norm import norm_backward, norm_forward

    gen = torch.Generator(device="cuda").manual_seed(3)
    rows, width = 4099, 384
    x = torch.randn(rows, width, device="cuda", generator=gen) * 2 + 0.5
    weight = torch.randn(width, device="cuda", generator=gen) if affine != "none" else None
    bias = torch.randn(width, device="cuda", generator=gen) if affine == "weight-and-bias" else None
    _, stats = norm_forward(x, weight, bias, 1e-5, torch.bfloat16)
    dy = torch.randn(rows, width, device="cuda", generator=gen).bfloat16()
    residual = torch.randn(rows, width, device="cuda", generator=gen)
    dx, dw, db, dr = norm_backward(x, dy, weight, stats, bias is not None, residual_grad=residual, residual_sum=True)
    dx0, dw0, db0, none = norm_backward(x, dy, weight, stats, bias is not None, residual_grad=residual)
    assert none is None and dr.dtype == torch.float32 and dr.shape == (width,)
    # fp32 sums over 4099 rows in another order than torch.sum's: summation-order rounding only.
    torch.testing.assert_close(dr, residual.sum(0), rtol=1e-4, atol=1e-3)
    assert (dw is None) == (weight is None) and (db is None) == (bias is None)
    for got, want in ((dx, dx0), (dw, dw0), (db, db0)):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, cols, bias", [(128, 128, False), (2304, 261, True), (7, 40, True)])
def test_fold_affine_kernels_match_pytorch(rows, cols, bias):
    """The fused cross-attention branch folds the input norm's affine into kv_proj by one kernel and unfolds the
    gradients by one more: the same values as `fold_norm_affine` and autograd through it, in fp32 (to 1e-5 relative:
    another summation order), the folded weights written in bf16 as the fp32 result rounded once."""
    from hf_flash_perceiver.cross_attention import fold_norm_affine
    from hf_flash_perceiver.fused_norm import fold_affine, unfold_affine_grads

    torch.manual_seed(rows)
    weight = torch.randn(rows, cols, device="cuda", requires_grad=True)
    kv_bias = torch.randn(rows, device="cuda", requires_grad=True) if bias else None
    gamma = (1 + 0.1 * torch.randn(cols, device="cuda")).requires_grad_()
    beta = (0.1 * torch.randn(cols, device="cuda")).requires_grad_()
    ref_w, ref_b = fold_norm_affine(gamma, beta, weight, kv_bias)
    w32, b32 = fold_affine(weight.detach(), None if kv_bias is None else kv_bias.detach(), gamma.detach(),
                           beta.detach(), torch.float32)
    torch.testing.assert_close(w32, ref_w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b32, ref_b.detach(), rtol=1e-5, atol=1e-5)
    w16, b16 = fold_affine(weight.detach(), None if kv_bias is None else kv_bias.detach(), gamma.detach(),
                           beta.detach(), torch.bfloat16)
    assert w16.dtype == b16.dtype == torch.bfloat16
    assert torch.equal(w16, w32.bfloat16())  # the product is exact in fp32 either way: rounded once
    torch.testing.assert_close(b16.float(), b32, rtol=8e-3, atol=1e-5)  # one bf16 rounding of a sum
    d_w, d_b = torch.randn_like(ref_w), torch.randn_like(ref_b)
    wanted = [gamma, beta, weight] + ([kv_bias] if bias else [])
    ref = torch.autograd.grad((ref_w, ref_b), wanted, (d_w, d_b))
    d_gamma, d_beta, d_weight = unfold_affine_grads(d_w, d_b, weight.detach(), gamma.detach(), beta.detach())
    for got, want in zip((d_gamma, d_beta, d_weight), ref):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    if bias:
        torch.testing.assert_close(d_b, ref[3])  # kv_proj's bias gradient is the folded bias's, as the branch uses it


@pytest.mark.usefixtures("fuse_every_branch")
def test_fused_branches_hand_the_half_gradient_on(monkeypatch):
    """Each fused branch whose input is another fused branch's output writes the input gradient in the compute dtype
    too, from its LayerNorm backward kernel, and the branch below uses that copy instead of converting: in a step
    only the branch that gets its gradient from outside the branches (the last) converts. The gradients are those
    of converting everywhere (the same rounding of the same fp32 values; 1e-3 allows for nondeterministic attention
    backward kernels)."""
    from hf_flash_perceiver import encoder_graphs, fused_block

    monkeypatch.setattr(encoder_graphs, "enabled", False)
    cfg = small_config(latent_dim=128, num_latents=32, cross_head_dim=64, latent_head_dim=64, latent_heads=2,
                       input_dim=16, depth=2, self_per_cross_attn=2)
    model = cuda_model(cfg, "sdpa").train()
    x = torch.randn(2, 40, cfg.input_dim, device="cuda", requires_grad=True)
    handed, converted = [], []
    original = fused_block._half_grad

    def recording(dy, dy2, dtype):
        out = original(dy, dy2, dtype)
        copy = getattr(dy, fused_block._HALF_COPY, None)
        (handed if copy is not None and out is copy[0] else converted).append(dy.shape)
        return out

    monkeypatch.setattr(fused_block, "_half_grad", recording)
    out, grads, x_grad = _fused_block_step(model, x)
    branches = cfg.depth * (1 + cfg.self_per_cross_attn) * 2
    assert len(converted) == 1 and len(handed) == branches - 1, (converted, handed)
    monkeypatch.setattr(fused_block, "_takes_branch_output", lambda x: False)
    ref_out, ref_grads, ref_x_grad = _fused_block_step(model, x)
    assert len(converted) == 1 + branches
    assert rel_err(x_grad, ref_x_grad) <= 1e-3
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= 1e-3, name

@pytest.mark.parametrize("rows, cols, dtype", [(65536, 768, torch.bfloat16), (4099, 300, torch.float16),
                                                (37, 1000, torch.float32), (1, 8, torch.bfloat16)])
def test_column_sum_matches_torch_sum(rows, cols, dtype):
    """`column_sum` (a projection's bias gradient in the fused branches): the fp32 column sums of a tall matrix, the
    same on every call (a fixed summation order), with its arrival counters left at zero, eagerly and replayed from a
    CUDA graph; a strided view and an fp32 output dtype too."""
    from hf_flash_perceiver import fused_norm
    from hf_flash_perceiver.fused_norm import column_sum

    gen = torch.Generator(device="cuda").manual_seed(rows + cols)
    x = torch.randn(rows, cols + 16, device="cuda", generator=gen).to(dtype)[:, 8:cols + 8]  # row stride != cols
    got = column_sum(x)
    want = x.double().sum(0)
    assert got.dtype == torch.float32 and got.shape == (cols,)
    # fp32 accumulation over up to 65536 rows of unit-variance values: |sum| ~ sqrt(rows), fp32 rounding ~ 1e-7
    # relative per add; against an fp64 reference.
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * rows**0.5)
    assert torch.equal(column_sum(x), got)
    assert column_sum(x, torch.bfloat16).dtype == torch.bfloat16
    assert all(int(c.count_nonzero()) == 0 for c in fused_norm._COUNTERS.values())

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        column_sum(x)  # counters for this stream made outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            replayed = column_sum(x)
    torch.cuda.current_stream().wait_stream(stream)
    x.add_(1.0)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(replayed.double(), x.double().sum(0), rtol=1e-5, atol=1e-5 * rows**0.5)
    assert all(int(c.count_nonzero()) == 0 for c in fused_norm._COUNTERS.values())


def test_fused_mlp_branch_keeps_no_activation_output():
    """The fused MLP branch saves its first projection's output for backward, not the activation's output (the
    backward kernel writes that again): one `(rows, hidden)` tensor less per MLP. Of its input it saves the fp16
    normalised rows, neither the fp32 input nor the norm's bf16 output."""
    from hf_flash_perceiver.fused_block import fused_branches, mlp_branch

    cfg = small_config(latent_dim=128, num_latents=32, cross_head_dim=64, latent_head_dim=64, latent_heads=2,
                       input_dim=16, gated_mlp=True)
    model = cuda_model(cfg, "sdpa").train()
    block = model.encoder.self_layers[0][0]
    hidden = block.mlp.fc2.in_features
    x = torch.randn(2, 32, cfg.latent_dim, device="cuda", requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with fused_branches(True), torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = mlp_branch(block.norm2, block.mlp, x, torch.bfloat16, residual=True)
    shapes = [shape for shape, _ in saved]
    assert (64, block.mlp.fc1.out_features) in shapes and (64, hidden) not in shapes, saved
    assert [dtype for shape, dtype in saved if shape == (64, cfg.latent_dim)] == [torch.float16], saved
    y.float().square().mean().backward()
    assert block.mlp.fc2.weight.grad is not None and torch.isfinite(block.mlp.fc2.weight.grad).all()


def test_gated_activation_compiles_to_the_custom_op():
    """Under torch.compile (fullgraph) the activation is the custom op, launched by Inductor, not a graph break:
    the same values as the eager kernels (the same kernels), gradients included."""
    from hf_flash_perceiver.layers import PerceiverMLP

    torch.manual_seed(0)
    mlp = PerceiverMLP(small_config(gated_mlp=True), 64).cuda()
    x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.autocast("cuda", torch.bfloat16):
        torch.compile(mlp, backend=record, fullgraph=True)(x)
    assert any("hf_flash_perceiver.gated_activation" in t for t in targets), targets

    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    with torch.autocast("cuda", torch.bfloat16):
        out, eager = compiled(x), mlp(x)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, mlp.fc1.weight], dy)
    want = torch.autograd.grad(eager, [x, mlp.fc1.weight], dy)
    # Same kernels; Inductor may order the GEMMs' bf16 roundings differently.
    torch.testing.assert_close(out, eager, rtol=2e-2, atol=2e-2)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-2


# Fused residual branches (fused_block.py) against the module path on the same weights and inputs, both bf16 autocast:
# each is within ~1e-2 of fp32, so they agree within the bf16 tolerances above.
FUSED_BLOCK_CASES = [
    dict(),
    dict(gated_mlp=False, latent_qkv_bias=True),
    dict(mlp_gate_activation="silu", mlp_residual=False, latent_head_dim=128, latent_heads=1),
    dict(mlp_gate_activation="sigmoid", latent_head_dim=32, latent_heads=4, self_per_cross_attn=2),
    # 160-wide heads (language-perceiver's): fused on Hopper and later, the module path elsewhere.
    dict(latent_head_dim=160, latent_heads=2, latent_qkv_bias=True),
    # The cross-attention branch: biases on its projections, several heads, no input norm, no query residual.
    dict(cross_qkv_bias=True, cross_heads=2, cross_head_dim=32),
    dict(cross_input_norm=False, cross_query_residual=False, cross_heads=4, cross_head_dim=16),
]


def _kernel_count(fn) -> int:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _fused_block_step(model, x, autocast=True, grad=True, mask=None):
    model.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast), torch.set_grad_enabled(grad):
        out = model(x, attention_mask=mask).last_hidden_state
    if grad:
        out.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out.float(), grads, x.grad


@pytest.fixture
def fuse_every_branch():
    """Tests are small: fuse every branch that fits, not only those with enough work to pay for it ("auto")."""
    from hf_flash_perceiver.fused_block import fused_branches

    with fused_branches(True):
        yield


def _module_path(fn):
    from hf_flash_perceiver.fused_block import fused_branches

    with fused_branches(False):
        return fn()


@pytest.mark.usefixtures("fuse_every_branch")
@pytest.mark.parametrize("case", range(len(FUSED_BLOCK_CASES)))
def test_fused_block_matches_module_path(case):
    cfg = small_config(**{**dict(latent_dim=128, num_latents=48, cross_head_dim=64, latent_head_dim=64,
                                 latent_heads=2, input_dim=24), **FUSED_BLOCK_CASES[case]})
    model = cuda_model(cfg, "sdpa", seed=case).train()
    x = torch.randn(3, 70, cfg.input_dim, device="cuda", requires_grad=True)
    ops = _ops(lambda: _fused_block_step(model, x))
    wide = cfg.latent_head_dim > 128 and torch.cuda.get_device_capability()[0] < 9
    assert {"_MLPBranch", "_CrossAttentionBranch"} <= ops and ("_SelfAttentionBranch" in ops) != wide, ops
    out, grads, x_grad = _fused_block_step(model, x)
    # Values and input gradients against the fp32 module path (autocast off), with the bf16 tolerances; two bf16
    # paths can each be ~1e-2 off it in opposite directions.
    fp32_out, fp32_grads, fp32_x_grad = _fused_block_step(model, x, autocast=False)
    fp32_grads = {n: g.clone() for n, g in fp32_grads.items()}
    # 3e-2: without the MLP residual the output is one bf16 MLP, not the fp32 residual stream (2.6e-2 measured).
    assert rel_err(out, fp32_out) <= 3e-2
    # The input gradient there is about as far off for the bf16 module path (4.0e-2 to 4.1e-2 measured): the same
    # rule as for the parameter gradients below.
    ref_out, ref_grads, ref_x_grad = _module_path(lambda: _fused_block_step(model, x))
    assert rel_err(x_grad, fp32_x_grad) <= max(BF16_GRAD_REL_TOL, 2 * rel_err(ref_x_grad, fp32_x_grad))
    # Parameter gradients against the fp32 path, next to the bf16 module path's own error there: the fused path must
    # be about as accurate as the path it replaces. A gradient that passes back through several bf16 layers (the
    # cross-attention's context norm, say) carries each path's rounding independently, so the two bf16 paths are
    # not compared with each other; "about" is within twice the module path's error, or the bf16 tolerance where that
    # is larger. A wrong kernel is off by O(1), far past either.
    for name, ref in ref_grads.items():
        assert grads[name].dtype == ref.dtype == torch.float32
        module_err = rel_err(ref, fp32_grads[name])
        assert rel_err(grads[name], fp32_grads[name]) <= max(BF16_GRAD_REL_TOL, 2 * module_err), (name, module_err)
    # Fewer launches is the point of the fused path.
    fused_kernels = _kernel_count(lambda: _fused_block_step(model, x))
    module_kernels = _module_path(lambda: _kernel_count(lambda: _fused_block_step(model, x)))
    assert fused_kernels < module_kernels, (fused_kernels, module_kernels)


@pytest.mark.usefixtures("fuse_every_branch")
@pytest.mark.parametrize("case", ["masked", "flash"])
def test_fused_cross_attention_masks_and_flash(case, monkeypatch):
    """The fused cross-attention branch with a padding mask (cuDNN with the mask's key bias; a sample whose mask is
    all False gets no attention output, as on the module path) and on FlashAttention-2 (what it picks for a few query
    tiles over a long input): as accurate as the module path against fp32, input gradients included."""
    from hf_flash_perceiver import attention_backends, fused_block

    if case == "masked" and not attention_backends.CUDNN_AVAILABLE:
        pytest.skip("cuDNN attention unavailable")
    if case == "flash":
        monkeypatch.setattr(fused_block, "flash_beats_cudnn", lambda *a: True)
    cfg = small_config(latent_dim=128, num_latents=48, cross_heads=2, cross_head_dim=64, latent_head_dim=64,
                       latent_heads=2, input_dim=24, cross_qkv_bias=True)
    model = cuda_model(cfg, "sdpa", seed=3).train()
    x = torch.randn(4, 70, cfg.input_dim, device="cuda", requires_grad=True)
    mask = None
    if case == "masked":
        mask = torch.arange(70, device="cuda")[None, :] < torch.tensor([70, 41, 5, 0], device="cuda")[:, None]
    step = lambda **kw: _fused_block_step(model, x, mask=mask, **kw)  # noqa: E731
    ops = _ops(step)
    kernel = "aten::_scaled_dot_product_cudnn_attention" if case == "masked" else (
        "aten::_scaled_dot_product_flash_attention")
    assert {"_CrossAttentionBranch", kernel} <= ops, ops
    out, grads, x_grad = step()
    fp32_out, fp32_grads, fp32_x_grad = step(autocast=False)
    fp32_grads = {n: g.clone() for n, g in fp32_grads.items()}
    ref_out, ref_grads, ref_x_grad = _module_path(step)
    assert rel_err(out, fp32_out) <= BF16_REL_TOL
    # The sample without any valid key: its latents never saw the input, on either path (bf16 rounding apart).
    if mask is not None:
        assert rel_err(out[3], ref_out[3]) <= BF16_REL_TOL
    assert rel_err(x_grad, fp32_x_grad) <= max(BF16_GRAD_REL_TOL, 2 * rel_err(ref_x_grad, fp32_x_grad))
    if mask is not None:
        assert x_grad[1, 41:].abs().max() == 0 and x_grad[3].abs().max() == 0  # padded tokens take no gradient
    for name, ref in ref_grads.items():
        module_err = rel_err(ref, fp32_grads[name])
        assert rel_err(grads[name], fp32_grads[name]) <= max(BF16_GRAD_REL_TOL, 2 * module_err), (name, module_err)


@pytest.mark.usefixtures("fuse_every_branch")
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_fused_self_attention_dropout_matches_module_path(kernel, monkeypatch):
    """Attention dropout in training stays on the fused branch, in the attention kernel itself, as SDPA applies it on
    the module path: from the same RNG state both paths draw the same mask (the same kernel consumes the same
    generator offset), so outputs and gradients agree as without dropout, and the mask is really applied (outputs
    differ from the eval-mode ones and between seeds)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from hf_flash_perceiver import attention_backends, encoder_graphs, fused_block

    if kernel == "cudnn" and not attention_backends.CUDNN_AVAILABLE:
        pytest.skip("cuDNN attention unavailable")
    monkeypatch.setattr(encoder_graphs, "enabled", False)  # warm-up replays would draw masks of their own
    # The module path's SDPA must pick the kernel the fused branch calls directly.
    monkeypatch.setattr(attention_backends, "flash_beats_cudnn", lambda *a: kernel == "flash")
    backends = [SDPBackend.CUDNN_ATTENTION] if kernel == "cudnn" else [SDPBackend.FLASH_ATTENTION]
    monkeypatch.setattr(fused_block, "flash_beats_cudnn", lambda *a: kernel == "flash")
    cfg = small_config(latent_dim=128, num_latents=64, cross_head_dim=64, latent_head_dim=64, latent_heads=2,
                       input_dim=24, latent_attn_dropout=0.3, cross_attn_dropout=0.2)
    model = cuda_model(cfg, "sdpa", seed=1).train()
    x = torch.randn(3, 70, cfg.input_dim, device="cuda", requires_grad=True)

    def step(seed):
        torch.manual_seed(seed)
        with sdpa_kernel(backends):
            return _fused_block_step(model, x)

    ops = _ops(lambda: step(0))
    assert {"_SelfAttentionBranch", "_CrossAttentionBranch"} <= ops, ops
    out, grads, x_grad = step(0)
    ref_out, ref_grads, ref_x_grad = _module_path(lambda: step(0))
    # Both bf16 paths with one mask: within the bf16 tolerances of each other (a different mask is O(1) off).
    assert rel_err(out, ref_out) <= 2e-2
    assert rel_err(x_grad, ref_x_grad) <= 5e-2
    for name, ref in ref_grads.items():
        assert rel_err(grads[name], ref) <= 5e-2, name
    # One path is deterministic from one seed, so any difference past rounding is the mask's.
    assert not torch.allclose(step(1)[0], out, rtol=1e-3, atol=1e-3)
    model.eval()
    assert not torch.allclose(step(0)[0], out, rtol=1e-3, atol=1e-3)


@pytest.mark.usefixtures("fuse_every_branch")
def test_fused_branch_weights_converted_once_per_forward(monkeypatch):
    """With grad, every fused branch's projection parameters of a forward are converted to bf16 by one multi-tensor
    copy, before the first block (a repeated latent stack converts once, not per repeat); without grad each branch
    converts its own when it runs (nothing kept past its use)."""
    from hf_flash_perceiver import encoder_graphs, weight_cast

    monkeypatch.setattr(encoder_graphs, "enabled", False)
    calls = []
    original = weight_cast.cast_tensors

    def recording(dtype, *tensors):
        calls.append([id(t) for t in tensors if t is not None])
        return original(dtype, *tensors)

    monkeypatch.setattr(weight_cast, "cast_tensors", recording)
    cfg = small_config(latent_dim=128, num_latents=32, cross_head_dim=64, latent_head_dim=64, latent_heads=2,
                       input_dim=16, depth=2, self_per_cross_attn=2, latent_stack_repeats=3, latent_qkv_bias=True)
    model = cuda_model(cfg, "sdpa").train()
    x = torch.randn(2, 40, cfg.input_dim, device="cuda")
    enc = model.encoder
    latents = torch.empty(2, 32, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused = {id(t) for layer in [*enc.cross_layers, *(l for ls in enc.self_layers for l in ls)]
                 for t in layer.fused_weights(latents)}
        # Both branches of every block, biases included: per self-attention block qkv_proj, o_proj, fc1 and fc2 with
        # their biases (8 tensors); per cross-attention block the same but q_proj's bias (7; its folded key/value
        # projection is converted where it is folded).
        assert len(fused) == cfg.depth * (7 + 8 * cfg.self_per_cross_attn)
        out = model(x).last_hidden_state
        assert [set(call) for call in calls if set(call) & fused] == [fused]
        calls.clear()
        out.float().sum().backward()
    assert enc.self_layers[0][0].attn.qkv_proj.weight.grad is not None
    # In backward, each cross-attention block (called once per forward) converts its branches' weights again, by one
    # copy (weight_cast.BackwardCopies); the repeated self-attention stack keeps the copies that served its repeats.
    cross = [{id(m.weight) for m in (layer.attn.q_proj, layer.attn.o_proj, layer.mlp.fc1, layer.mlp.fc2)}
             for layer in enc.cross_layers]
    assert sorted(map(sorted, (set(call) for call in calls if set(call) & fused))) == sorted(map(sorted, cross))
    calls.clear()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    qkv = id(enc.self_layers[0][0].attn.qkv_proj.weight)
    assert sum(call.count(qkv) for call in calls) == cfg.latent_stack_repeats


@pytest.mark.usefixtures("fuse_every_branch")
def test_fused_block_half_weights_inference_checkpointing_and_frozen():
    cfg = small_config(latent_dim=128, num_latents=32, cross_head_dim=64, latent_head_dim=64, latent_heads=2,
                       input_dim=16)
    model = cuda_model(cfg, "sdpa").train()
    x = torch.randn(2, 50, cfg.input_dim, device="cuda", requires_grad=True)
    # Inference: no graph kept, same values.
    out, _, _ = _fused_block_step(model.eval(), x, grad=False)
    ref, _, _ = _module_path(lambda: _fused_block_step(model, x, grad=False))
    assert rel_err(out, ref) <= BF16_REL_TOL
    model.train()
    # Activation checkpointing recomputes the fused branches: the same gradients as without it.
    out, grads, x_grad = _fused_block_step(model, x)
    model.gradient_checkpointing_enable()
    ck_out, ck_grads, ck_x_grad = _fused_block_step(model, x)
    model.gradient_checkpointing_disable()
    assert rel_err(ck_out, out) <= 1e-3 and rel_err(ck_x_grad, x_grad) <= 1e-3
    for name, g in grads.items():
        assert rel_err(ck_grads[name], g) <= 1e-3, name
    # Frozen parameters get no gradient; the rest still do.
    layer = model.encoder.self_layers[0][0]
    for p in layer.parameters():
        p.requires_grad_(False)
    _, grads, _ = _fused_block_step(model, x)
    assert all(p.grad is None for p in layer.parameters())
    assert all(g is not None for n, g in grads.items() if "self_layers.0.0." not in n)
    for p in layer.parameters():
        p.requires_grad_(True)
    # Half-precision weights without autocast: the residual stream is bf16 too.
    model = model.bfloat16()
    xb = x.detach().bfloat16().requires_grad_()
    out, grads, x_grad = _fused_block_step(model, xb, autocast=False)
    ref_out, ref_grads, ref_x_grad = _module_path(lambda: _fused_block_step(model, xb, autocast=False))
    assert rel_err(out, ref_out) <= BF16_REL_TOL and rel_err(x_grad, ref_x_grad) <= BF16_GRAD_REL_TOL
    for name, ref in ref_grads.items():
        assert grads[name].dtype == torch.bfloat16 and rel_err(grads[name], ref) <= BF16_GRAD_REL_TOL, name


@pytest.mark.parametrize("seed", range(3))
def test_block_wise_weight_conversion_on_cuda(seed):
    """Under bf16 autocast on CUDA, converting each block's projection weights together (the default) gives the
    outputs and gradients of autocast converting each one (same bf16 operands; the tolerance covers another GEMM
    blocking only), and launches no per-tensor cast of those weights."""
    from hf_flash_perceiver import weight_cast

    cfg = random_config(seed)
    model = cuda_model(cfg, "sdpa", seed).train()
    x = make_inputs(cfg, batch=3, seq=29, seed=seed)
    x = [t.cuda() for t in x] if isinstance(x, list) else x.cuda()
    results = {}
    for on in (False, True):
        model.zero_grad(set_to_none=True)
        before, weight_cast.enabled = weight_cast.enabled, on
        try:
            with OpCounter() as ops, torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x).last_hidden_state
            out.float().square().mean().backward()
        finally:
            weight_cast.enabled = before
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[on] = (out.detach().float(), grads, ops.ops)
    (out_off, grads_off, ops_off), (out_on, grads_on, ops_on) = results[False], results[True]
    assert ops_on["_foreach_copy_"] > 0 and ops_on["_to_copy"] < ops_off["_to_copy"]
    assert rel_err(out_on, out_off) < 1e-2
    assert grads_on.keys() == grads_off.keys()
    for name, g in grads_on.items():
        assert g.dtype == torch.float32, name
        assert rel_err(g, grads_off[name]) < 2e-2 or g.norm() < 1e-6, name


def test_all_true_cuda_mask_is_kept_without_a_host_sync():
    """A mask on the GPU is not checked for being all True (the check would wait for the device every step): it
    stays, and the masked kernels give the unmasked result (fp32, 1e-5: another kernel's summation order); a mask
    in host memory is still dropped (tests/test_core.py::test_all_true_mask_is_dropped)."""
    from hf_flash_perceiver.input_preparation import prepare_inputs

    cfg = small_config()
    model = cuda_model(cfg, "sdpa")
    x = torch.randn(3, 9, cfg.input_dim, device="cuda")
    ones = torch.ones(3, 9, dtype=torch.bool, device="cuda")
    contexts = prepare_inputs(cfg, cfg.input_dims, x, ones, torch.float32)
    assert all(c.mask is not None for c in contexts)
    torch.testing.assert_close(model(x, ones).last_hidden_state, model(x).last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["sequence", "masked_lm"])
def test_labelled_step_reads_the_label_check_without_a_host_sync(head, monkeypatch):
    """A training step with labels on the GPU makes no synchronising call once warm: the labels' value check runs
    before the forward and its answer is read behind its own copy (losses.EarlyCheck: an event wait, which the sync
    debug mode does not count), where a check at the loss (`bool(tensor)`) would wait for the whole forward. Bad
    labels on the GPU are refused as on the CPU."""
    from hf_flash_perceiver import PerceiverForMaskedLM, PerceiverForSequenceClassification, encoder_graphs
    from heads_common import tiny

    torch.manual_seed(0)
    if head == "sequence":
        model = PerceiverForSequenceClassification(tiny(input_dim=6, num_labels=5)).cuda().train()
        inputs = dict(inputs=torch.randn(4, 50, 6, device="cuda"))
        labels, bad = torch.tensor([0, 4, -100, 2], device="cuda"), torch.tensor([0, 5, 1, 2], device="cuda")
    else:
        model = PerceiverForMaskedLM(tiny()).cuda().train()
        ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
        inputs, labels, bad = dict(input_ids=ids), ids, ids.masked_fill(ids == ids[0, 0], model.config.vocab_size)

    def step(labels):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs, labels=labels).loss
        loss.backward()

    if head == "masked_lm":
        # The token ids' own range check (PerceiverTextAdapter.check) reads its answer at the forward's start, a sync
        # of its own, before any of the step's work is queued; it is not what this test is about.
        from hf_flash_perceiver.input_adapters import PerceiverTextAdapter

        monkeypatch.setattr(PerceiverTextAdapter, "check", lambda self, input_ids: None)
    encoder_graphs.reset()
    for _ in range(encoder_graphs.WARMUP_CALLS + 2):  # eager, then the capture, then a replay
        step(labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match=r"must be in \["):
        step(bad)
    encoder_graphs.reset()


# The adapters' tokens-with-positions concatenation (fused_concat.py) on the GPU: the Triton kernel ran (not
# PyTorch's strided CatArrayBatchedCopy), its output is `torch.cat`'s exactly (a copy), and the gradients are the
# concatenation's: the tokens' slice exactly, the positions' batch sum to the rounding of its dtype against fp64.
@pytest.mark.parametrize("n, c, p, dtype", [(3136, 256, 256, torch.bfloat16), (1000, 61, 258, torch.float32)])
def test_concat_positions_kernel(n, c, p, dtype):
    from hf_flash_perceiver.fused_concat import concat_fits, concat_positions

    gen = torch.Generator(device="cuda").manual_seed(n)
    tokens = torch.randn(4, n, c, device="cuda", generator=gen).to(dtype).requires_grad_()
    positions = torch.randn(n, p, device="cuda", generator=gen).to(dtype).requires_grad_()
    assert concat_fits(tokens, positions)
    out = {}
    ops = _ops(lambda: out.setdefault("y", concat_positions(tokens, positions)))
    assert "_concat" in ops and not any("CatArrayBatchedCopy" in op for op in ops), sorted(ops)
    want = torch.cat([tokens, positions.expand(4, -1, -1)], -1)
    assert torch.equal(out["y"], want)
    g = torch.randn(want.shape, device="cuda", generator=gen).to(dtype)
    d_tokens, d_positions = torch.autograd.grad(out["y"], (tokens, positions), g)
    assert torch.equal(d_tokens, g[..., :c])
    assert rel_err(d_positions, g[..., c:].double().sum(0)) <= torch.finfo(dtype).eps


# A fused QKV projection's output gradient stacked from attention's per-head gradients, with its bias gradient from
# the same pass (fused_norm.stack_heads_column_sum): the gradients cuDNN's attention backward returns for a packed
# QKV, and parts of other layouts. The stack is a copy (exact); the sums are fp32 sums (1e-5 of fp64's).
@pytest.mark.parametrize("heads, dim", [(8, 128), (4, 64), (2, 48)])
def test_stack_heads_column_sum_kernel(heads, dim):
    from hf_flash_perceiver.fused_norm import stack_heads_column_sum

    gen = torch.Generator(device="cuda").manual_seed(dim)
    batch, length = 4, 300
    qkv = torch.randn(batch, length, 3, heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    q, k, v = (t.transpose(1, 2).detach().requires_grad_() for t in qkv.unbind(2))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    layouts = [grads, [torch.randn(batch, heads, length, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
                       for _ in range(3)]]
    for parts in layouts:
        result = {}
        ops = _ops(lambda: result.setdefault("r", stack_heads_column_sum(parts)))
        stacked, sums = result["r"]
        assert "_column_sum" in ops and not any("CatArrayBatchedCopy" in op for op in ops), sorted(ops)
        want = torch.stack([p.transpose(1, 2) for p in parts], dim=2).reshape(batch * length, -1)
        assert torch.equal(stacked, want)
        assert sums.dtype == torch.float32 and rel_err(sums, want.double().sum(0)) <= 1e-5

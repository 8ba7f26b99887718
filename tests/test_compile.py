"""`torch.compile(model, fullgraph=True)` on the sdpa path: no graph break, same outputs and gradients as eager.

A tiny model keeps the CPU compilation to ~10-20 s per test. On failure the message lists dynamo's graph-break
reasons (`torch._dynamo.explain`), which is what needs fixing in the model.
"""

from __future__ import annotations

import pytest
import torch

from core_common import graph_breaks
from hf_flash_perceiver import PerceiverConfig, PerceiverModel


FP32_TOL = 1e-5


def tiny_config(**kw) -> PerceiverConfig:
    return PerceiverConfig(input_dim=8, depth=2, num_latents=4, latent_dim=16, cross_heads=1, cross_head_dim=8,
                           latent_heads=2, latent_head_dim=8, **kw)


def train_outputs(run, model, x, mask):
    """`run` is the model or its compiled wrapper; gradients land on `model`'s parameters either way."""
    model.zero_grad(set_to_none=True)
    out = run(x, attention_mask=mask).last_hidden_state
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_compiled_matches_eager(config: PerceiverConfig):
    torch.manual_seed(0)
    model = PerceiverModel(config).train()  # training mode: the path Trainer(torch_compile=True) compiles
    x = torch.randn(3, 11, config.input_dim)
    mask = torch.arange(11)[None] < torch.tensor([[11], [7], [3]])
    expected, expected_grads = train_outputs(model, model, x, mask)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    try:
        out, grads = train_outputs(compiled, model, x, mask)
    except Exception as exc:  # fullgraph=True turns a graph break into an error: say which
        pytest.fail(f"torch.compile(fullgraph=True) failed: {type(exc).__name__}: {str(exc)[:300]}\n"
                    f"{graph_breaks(model, x, attention_mask=mask)}")
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, expected, atol=FP32_TOL, rtol=FP32_TOL)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=FP32_TOL, rtol=1e-4, msg=name)


def test_compile_fullgraph_matches_eager_with_a_mask():
    check_compiled_matches_eager(tiny_config())


def test_compile_fullgraph_with_cross_attention_checkpointing():
    # The chunked, recomputing cross-attention is a custom autograd.Function: its backward must trace too.
    check_compiled_matches_eager(tiny_config(cross_attention_checkpointing=True))


def test_compile_fullgraph_with_transformers_perceiver_wiring():
    # The options transformers' pretrained Perceivers load into: value widths unlike the query/key widths, no query
    # residual, a repeated latent stack, per-role non-gated MLPs, chunked cross-attention with those value widths.
    wiring = dict(cross_v_head_dim=12, latent_v_head_dim=4, cross_query_residual=False, latent_stack_repeats=2,
                  gated_mlp=False, cross_mlp_ratio=1, cross_qkv_bias=True, latent_qkv_bias=True)
    check_compiled_matches_eager(tiny_config(**wiring))
    check_compiled_matches_eager(tiny_config(cross_attention_checkpointing=True, **wiring))


def test_trainer_torch_compile(tmp_path):
    """`Trainer(torch_compile=True)` trains a head: the loss is finite and falls, and the compiled graph is in use."""
    from transformers import Trainer

    from trainer_common import args, logged_losses, make_case

    torch._dynamo.reset()
    model, data = make_case("sequence")
    trainer = Trainer(model=model, args=args(tmp_path, torch_compile=True, max_steps=12), train_dataset=data)
    trainer.train()
    losses = logged_losses(trainer)
    torch._dynamo.reset()
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert hasattr(trainer.model_wrapped, "_orig_mod") or hasattr(trainer.model, "_orig_mod"), "model was not compiled"

"""Context-parallel cross-attention on 2 CPU processes (gloo): each rank holds a slice of the input sequence; the
outputs and every gradient equal the single-process result (fp32: equal up to summation order)."""

from __future__ import annotations

import pytest

from hf_flash_perceiver import context_parallel

from context_parallel_common import CASES, run_on_two_ranks


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_context_parallel_equals_one_process(case_name):
    run_on_two_ranks(case_name)


def test_context_parallel_needs_a_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        with context_parallel():
            pass


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("config, train, call, match", [
    (dict(), False, dict(output_attentions=True), "no rank holds the whole attention map"),
    (dict(cross_attn_dropout=0.1), True, dict(), "no attention dropout, but cross_attn_dropout=0.1"),
])
def test_context_parallel_refusals(one_rank, config, train, call, match):
    import torch

    from hf_flash_perceiver import PerceiverConfig, PerceiverModel

    model = PerceiverModel(PerceiverConfig(input_dim=4, depth=1, num_latents=2, latent_dim=8, cross_head_dim=8,
                                           latent_heads=1, latent_head_dim=8, **config)).train(train)
    with context_parallel(), pytest.raises(ValueError, match=match):
        model(torch.randn(1, 5, 4), **call)


def test_context_parallel_on_one_rank_equals_the_regular_path(one_rank):
    import torch

    from hf_flash_perceiver import PerceiverConfig, PerceiverModel

    torch.manual_seed(0)
    model = PerceiverModel(PerceiverConfig(input_dim=4, depth=2, num_latents=3, latent_dim=8, cross_head_dim=8,
                                           latent_heads=1, latent_head_dim=8, num_zero_tokens=1)).eval()
    x, mask = torch.randn(2, 7, 4), torch.rand(2, 7) < 0.6
    with context_parallel():
        parallel = model(x, mask).last_hidden_state
    torch.testing.assert_close(parallel, model(x, mask).last_hidden_state, rtol=1e-5, atol=1e-5)  # fp32 rounding

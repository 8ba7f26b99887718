"""Shared by the context-parallel tests (CPU, gloo: tests/test_context_parallel.py; 2 GPUs, nccl:
tests/test_multi_gpu.py): the cases, and a worker that checks one rank's slice against the single-process result."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distributed_common import end_process_group
from hf_flash_perceiver import PerceiverConfig, PerceiverIOModel, PerceiverModel, context_parallel


# fp32 on both sides; the merge sums the same terms in another order (GPU reductions reorder more).
TOLERANCES = {"cpu": dict(rtol=1e-5, atol=1e-5), "cuda": dict(rtol=1e-4, atol=1e-4)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    # rotary on keys (global positions), zero tokens (rank 0), a mask with a sample padded on all of rank 1's slice,
    # two inputs of different lengths and widths, an uneven split
    "masked-rotary-zero-tokens-two-inputs": dict(
        config=dict(input_dim=[6, 4], depth=2, num_latents=5, latent_dim=16, cross_heads=2, cross_head_dim=8,
                    latent_heads=2, latent_head_dim=8, cross_rotary_emb_dim=4, num_zero_tokens=2),
        lengths=(11, 7), masked=True, io=False),
    # the seed's wiring (no input LayerNorm), a sample with no valid key at all, Perceiver IO on top
    "raw-inputs-empty-sample-io": dict(
        config=dict(input_dim=5, depth=2, num_latents=4, latent_dim=16, cross_heads=1, cross_head_dim=8,
                    latent_heads=2, latent_head_dim=8, cross_input_norm=False, weight_tie_layers=True,
                    query_dim=6, output_dim=3, cross_attention_chunk_size=6),
        lengths=(9,), masked=True, io=True),
    "unmasked": dict(
        config=dict(input_dim=6, depth=1, num_latents=3, latent_dim=16, cross_heads=2, cross_head_dim=8,
                    latent_heads=2, latent_head_dim=8),
        lengths=(8,), masked=False, io=False),
}


def _data(case, batch=3):
    g = torch.Generator().manual_seed(1)
    cfg = PerceiverConfig(**case["config"])
    dims = cfg.input_dims
    xs = [torch.randn(batch, n, dims[i], generator=g) for i, n in enumerate(case["lengths"])]
    masks = None
    if case["masked"]:
        masks = []
        for n in case["lengths"]:
            m = torch.rand(batch, n, generator=g) < 0.7
            m[0, n // 2:] = False  # padded on the whole second half: rank 1's slice holds none of its keys
            m[1, :] = True
            m[2, :] = False if case["io"] else m[2, :]  # no valid key anywhere: a zero update
            masks.append(m)
    return cfg, xs, masks


def _run(model, xs, masks, io):
    inputs = xs if len(xs) > 1 else xs[0]
    attention_mask = None if masks is None else (masks if len(masks) > 1 else masks[0])
    if io:
        queries = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)).to(xs[0].device)
        return model(inputs, attention_mask, queries=queries).logits
    return model(inputs, attention_mask).last_hidden_state


def _worker(rank, world, port, case_name, device_type="cpu"):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
        if device_type == "cuda":
            torch.cuda.set_device(device)
        tol = TOLERANCES[device_type]
        case = CASES[case_name]
        cfg, xs, masks = _data(case)
        xs = [x.to(device) for x in xs]
        masks = None if masks is None else [m.to(device) for m in masks]
        torch.manual_seed(0)
        model = (PerceiverIOModel if case["io"] else PerceiverModel)(cfg).to(device).train()
        # The single-process reference, computed on every rank alone.
        ref_xs = [x.clone().requires_grad_() for x in xs]
        ref = _run(model, ref_xs, masks, case["io"])
        ref.square().sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        # This rank's slice of every input (uneven when the length is odd).
        local_xs, local_masks = [], None if masks is None else []
        for i, x in enumerate(xs):
            cut = (x.shape[1] + 1) // 2
            part = slice(0, cut) if rank == 0 else slice(cut, None)
            local_xs.append(x[:, part].clone().requires_grad_())
            if masks is not None:
                local_masks.append(masks[i][:, part])
        with context_parallel():
            out = _run(model, local_xs, local_masks, case["io"])
        out.square().sum().backward()
        torch.testing.assert_close(out, ref, **tol)
        for name, p in model.named_parameters():
            if name in ref_grads:
                torch.testing.assert_close(p.grad, ref_grads[name], **tol, msg=lambda m: f"{name}: {m}")
        for i, x in enumerate(local_xs):
            cut = (xs[i].shape[1] + 1) // 2
            part = slice(0, cut) if rank == 0 else slice(cut, None)
            torch.testing.assert_close(x.grad, ref_xs[i].grad[:, part], **tol)
    finally:
        end_process_group()


def run_on_two_ranks(case_name: str, device_type: str = "cpu") -> None:
    """Spawn 2 ranks (gloo on CPU, nccl on 2 GPUs) that each check the case against one process."""
    mp.spawn(_worker, args=(2, _free_port(), case_name, device_type), nprocs=2, join=True)

"""Multi-GPU benchmark: data-parallel training throughput on 1 and N GPUs, and context-parallel training steps over
one long sample, in one run.

    python benchmarks/multi_gpu.py --gpus 2                   # seed config, n=4096: samples/s on 1 and 2 GPUs (DDP)
    python benchmarks/multi_gpu.py --gpus 2 --cp-tokens 1e8,1e9   # + context-parallel steps on 1 and 2 GPUs
    python benchmarks/multi_gpu.py --smoke                    # the same code on CPU processes (gloo), tiny sizes

Data parallel: every world size in `--worlds` (default 1 and `--gpus`) spawns that many processes; each trains a
`PerceiverModel` of the seed configuration under `DistributedDataParallel` (bf16 autocast, fp32 weights, AdamW step)
on its own batch of `--batch` samples; the record is the global samples/s over `--iters` steps after `--warmup`.
Context parallel: batch 1, each rank holds `n / world` tokens of bf16 input under `context_parallel()`, with
cross-attention and activation checkpointing; the record is the median step time and the largest per-rank peak
memory (an out-of-memory step is recorded as such). Results go to `<out-dir>/<YYYY-MM-DD>-<card>-multi-gpu.json`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import RESULTS_DIR, SEED_SHAPE, card_name, slugify, write_json  # noqa: E402


GIB = 2**30
SMOKE_SHAPE_KW = dict(input_dim=16, depth=2, num_latents=8, latent_dim=32, cross_heads=1, cross_head_dim=16,
                      latent_heads=2, latent_head_dim=16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(rank: int, use_cuda: bool) -> torch.device:
    if use_cuda:
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model(shape: dict, device: torch.device, **config):
    from hf_flash_perceiver import PerceiverConfig, PerceiverModel

    torch.manual_seed(0)  # the same weights on every rank
    return PerceiverModel(PerceiverConfig(**shape, **config)).to(device).train()


def _data_parallel(rank: int, world: int, args: argparse.Namespace, device: torch.device, shape: dict) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model(shape, device), device_ids=[rank] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.n, shape["input_dim"], device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(x).last_hidden_state.float().mean()
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.iters):
        step()
    _sync(device)
    dist.barrier()
    seconds = time.perf_counter() - start
    return {"mode": "data_parallel", "world": world, "n": args.n, "batch_per_rank": args.batch,
            "step_ms": 1000 * seconds / args.iters, "samples_per_s": world * args.batch * args.iters / seconds}


def _context_parallel(rank: int, world: int, n: int, args: argparse.Namespace, device: torch.device,
                      shape: dict) -> dict:
    from hf_flash_perceiver import context_parallel

    record = {"mode": "context_parallel", "world": world, "n": n, "tokens_per_rank": n // world}
    try:
        model = _model(shape, device, cross_attention_checkpointing=True)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
        x = torch.randn(1, n // world, shape["input_dim"], device=device, dtype=torch.bfloat16)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with context_parallel(), torch.autocast(device.type, dtype=torch.bfloat16):
                model(x).last_hidden_state.float().mean().backward()

        step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.cp_iters):
            _sync(device)
            dist.barrier()
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
        record["seconds"] = statistics.median(times)
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0],
                            device=device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        record["peak_gib_per_rank"] = float(peak) if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        # Every rank runs out together (same sizes); the record says so instead of ending the run.
        record.update(seconds=None, peak_gib_per_rank=None, oom=True)
    return record


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_cuda = not args.smoke and torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        device = _device(rank, use_cuda)
        shape = SMOKE_SHAPE_KW if args.smoke else SEED_SHAPE.as_dict()
        records = [] if args.cp_only else [_data_parallel(rank, world, args, device, shape)]
        records += [_context_parallel(rank, world, n, args, device, shape) for n in args.cp_tokens]
        if rank == 0:
            queue.put(records)
    finally:
        # Collect the DDP model (its reducer, in a reference cycle, holds the group) so that destroying the group
        # joins gloo's worker threads now: left running into interpreter shutdown, one that must take the GIL to
        # free a finished collective's tensors aborts the process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=None, help="largest world size (default: every visible GPU)")
    parser.add_argument("--worlds", default=None, help="comma-separated world sizes (default: 1 and --gpus)")
    parser.add_argument("--n", type=int, default=None, help="input length of the data-parallel records (default 4096)")
    parser.add_argument("--batch", type=int, default=None, help="samples per rank and step (default 128)")
    parser.add_argument("--iters", type=int, default=None, help="timed data-parallel steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="data-parallel warm-up steps")
    parser.add_argument("--cp-tokens", default="", help="comma-separated total lengths for context-parallel records")
    parser.add_argument("--cp-iters", type=int, default=2, help="timed context-parallel steps (median reported)")
    parser.add_argument("--cp-only", action="store_true", help="skip the data-parallel records")
    parser.add_argument("--smoke", action="store_true", help="CPU processes (gloo), tiny shape and sizes")
    parser.add_argument("--out-dir", default=None, help="where the JSON goes")
    args = parser.parse_args(argv)
    args.cp_tokens = [int(float(v)) for v in args.cp_tokens.split(",") if v]
    if args.smoke:
        args.gpus = args.gpus or 2
        args.n, args.batch, args.iters = args.n or 64, args.batch or 2, args.iters or 2
        args.warmup = min(args.warmup, 1)
    else:
        if not torch.cuda.is_available():
            parser.error("needs CUDA GPUs (or --smoke for CPU processes)")
        args.gpus = args.gpus or torch.cuda.device_count()
        args.n, args.batch, args.iters = args.n or 4096, args.batch or 128, args.iters or 20
    args.worlds = sorted({1, args.gpus}) if args.worlds is None else [int(w) for w in args.worlds.split(",")]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    use_cuda = not args.smoke
    card = card_name(torch.device("cuda" if use_cuda else "cpu"))
    if args.out_dir is not None:
        out_dir = Path(args.out_dir)
    else:
        out_dir = RESULTS_DIR if use_cuda else Path(tempfile.mkdtemp(prefix="multi-gpu-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{slugify(card)}-multi-gpu{'-smoke' if args.smoke else ''}"
    path = out_dir / f"{stem}.json"
    payload = {"card": card, "torch": torch.__version__, "worlds": args.worlds, "records": []}
    context = mp.get_context("spawn")
    for world in args.worlds:
        queue = context.SimpleQueue()
        mp.start_processes(_worker, args=(world, _free_port(), args, queue), nprocs=world, join=True,
                           start_method="spawn")
        for record in queue.get():
            payload["records"].append(record)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in record.items()}, flush=True)
        write_json(path, payload)
    one = {r["mode"]: r for r in payload["records"] if r["world"] == 1 and r["mode"] == "data_parallel"}
    for r in payload["records"]:
        if r["mode"] == "data_parallel" and r["world"] > 1 and "data_parallel" in one:
            r["scaling_vs_1"] = r["samples_per_s"] / one["data_parallel"]["samples_per_s"]
    write_json(path, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

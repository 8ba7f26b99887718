"""Training-step benchmark of hf-flash-perceiver against perceiver-pytorch and transformers' Perceiver.

Every record times one training step -- `zero_grad(set_to_none=True)`, forward under bf16 autocast with fp32
parameters, `output.float().mean()` as the loss, backward; no optimizer step -- as the median of `--iters` steps after
`--warmup` warm-up steps (CUDA events on a GPU), with the peak memory of those steps, the model FLOPs of the step
(`torch.utils.flop_counter`), the achieved TFLOP/s and, on a GPU, the MFU against a bf16 matmul ceiling measured in
the same run (off the GPU there is no meaningful bf16 peak: MFU and the ceiling are null). All implementations run
side by side in one process, so their ratios come from one card.

Configurations (`--configs`):

- `seed`: the seed's protocol, depth 8 x (1 cross-attention 1x64 + 1 self-attention 8x64), 256 latents x 256,
  input_dim 128; n/batch = 512/256, 4096/128, 16384/48, 131072/8. Peer: perceiver-pytorch.
- `io`: a Perceiver IO encoder shape, 1 cross-attention + 8 self-attentions, same widths and n/batch. Peer:
  transformers' Perceiver (eager).
- `masked`: the seed shape at 4096/128 and 16384/48 with random lengths in [n/4, n] per sample, each implementation
  also timed on the same padded batch without the mask.
- `large`: latent_dim 1024, 512 latents, 16 self heads x 64, depth 8, n=16384, batch 32 (ours only).

Results go to `<out-dir>/<YYYY-MM-DD>-<card>.json` (rewritten after every record, so a run cut short keeps what it
measured). `--out-dir` defaults to `benchmarks/results/` for a full GPU run only; a `--smoke` run or a run off the
GPU writes into a fresh temporary folder unless `--out-dir` is given, so that it never becomes the "newest" results
that `plot.py` renders. A record that ran out of memory has `oom: true` and `ms: null`; one that failed has `error`; one not run
has `skipped` (peer not installed, time budget spent). Run `python benchmarks/run.py --help` for the options and
`python benchmarks/plot.py` for the plots and the README table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules when run as a script

import bench_report as report  # noqa: E402
from bench_peers import (  # noqa: E402
    PeerUnavailable,
    Shape,
    build_ours,
    build_perceiver_pytorch,
    build_transformers_perceiver,
    flash_attn_2_available,
    flash_attn_4_available,
    num_params,
    transformers_head_widths,
)


RESULTS_DIR = Path(__file__).resolve().parent / "results"
GIB = 2**30


# ---------------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class ConfigSpec:
    shape: Shape
    points: tuple[tuple[int, int], ...]  # (n, batch)
    compile_ns: tuple[int, ...] = ()  # where the +compile variant runs by default (each n is one compilation)
    masked: bool = False  # time every implementation with a random-length mask *and* without it


SEED_SHAPE = Shape(input_dim=128, depth=8, num_latents=256, latent_dim=256, cross_heads=1, cross_head_dim=64,
                   latent_heads=8, latent_head_dim=64)
SEED_POINTS = ((512, 256), (4096, 128), (16384, 48), (131072, 8))

CONFIGS: dict[str, ConfigSpec] = {
    "seed": ConfigSpec(SEED_SHAPE, SEED_POINTS, compile_ns=(4096,)),
    "io": ConfigSpec(Shape(128, 1, 256, 256, 1, 64, 8, 64, self_per_cross_attn=8), SEED_POINTS, compile_ns=(4096,)),
    "masked": ConfigSpec(SEED_SHAPE, ((4096, 128), (16384, 48)), masked=True),
    # Batch 32 keeps ours at roughly 35 GiB (fp32 weights 0.9 GiB, ~1 GiB of activations per sample).
    "large": ConfigSpec(Shape(128, 8, 512, 1024, 1, 64, 16, 64), ((16384, 32),), compile_ns=(16384,)),
}

# Same structure, tiny: every eager code path runs on a CPU in seconds. Compiled variants are left out of a smoke run
# unless named with --impls or --compile-points (one CPU compilation costs 20-60 s; tests/test_compile.py covers it).
SMOKE_SHAPE = Shape(input_dim=16, depth=2, num_latents=8, latent_dim=32, cross_heads=1, cross_head_dim=16,
                    latent_heads=2, latent_head_dim=16)
SMOKE_CONFIGS: dict[str, ConfigSpec] = {
    "seed": ConfigSpec(SMOKE_SHAPE, ((64, 2), (256, 2)), compile_ns=(64,)),
    "io": ConfigSpec(Shape(16, 1, 8, 32, 1, 16, 2, 16, self_per_cross_attn=3), ((64, 2), (256, 2))),
    "masked": ConfigSpec(SMOKE_SHAPE, ((256, 4),), masked=True),
    "large": ConfigSpec(Shape(16, 2, 16, 64, 1, 16, 4, 16), ((128, 2),)),
}


# ---------------------------------------------------------------------------------------------------- implementations
@dataclass(frozen=True)
class ImplSpec:
    configs: tuple[str, ...]
    build: Callable[[Shape, argparse.Namespace], nn.Module]
    # None when usable here, else why not. Unavailable *peers* become skipped records (the comparison is the point of
    # the run); unavailable optional kernels are only named in the notes.
    unavailable: Callable[[], str | None] = lambda: None
    peer: bool = False
    compile: bool = False
    # A/B variants of one package switch: run only when named with --impls (each A/B is its own scoped run and
    # results file), so that the complete run stays within one device call.
    ab: bool = False


def _needs(check: Callable[[], bool], why: str) -> Callable[[], str | None]:
    return lambda: None if check() else why


IMPLS: dict[str, ImplSpec] = {
    "hf-flash-perceiver": ImplSpec(("seed", "io", "masked", "large"), lambda s, a: build_ours(s, "sdpa")),
    "perceiver-pytorch": ImplSpec(("seed", "masked"), lambda s, a: build_perceiver_pytorch(s), peer=True),
    "transformers-perceiver": ImplSpec(
        ("io",), lambda s, a: build_transformers_perceiver(s, a.tf_qk_channels, a.tf_v_channels), peer=True
    ),
    "hf-flash-perceiver+xattn-ckpt": ImplSpec(
        ("seed",), lambda s, a: build_ours(s, "sdpa", cross_attention_checkpointing=True)
    ),
    # The long-input memory mode: chunked, recomputed cross-attention plus block checkpointing of the latent path.
    "hf-flash-perceiver+xattn-ckpt+grad-ckpt": ImplSpec(
        ("seed",), lambda s, a: build_ours(s, "sdpa", cross_attention_checkpointing=True, gradient_checkpointing=True)
    ),
    # The eager path without the CUDA graphs of the encoder (encoder_graphs.py, on by default): every call runs the
    # encoder's kernels from Python, as before the graphs (same run, for the comparison).
    "hf-flash-perceiver+no-encoder-graphs": ImplSpec(
        ("seed", "io", "masked"), lambda s, a: build_ours(s, "sdpa", disabled=("encoder_graphs",))
    ),
    "hf-flash-perceiver+varlen": ImplSpec(("masked",), lambda s, a: build_ours(s, "varlen")),
    # The opt-in fused residual branches (every branch that fits) on every eager call. Replays of the encoder's graphs
    # run them already, so by default this differs from the default path only where a call is not replayed.
    "hf-flash-perceiver+fused-branches": ImplSpec(
        ("seed", "io", "masked", "large"), lambda s, a: build_ours(s, "sdpa", fused_branches=True), ab=True
    ),
    # The default path as it was before projection weights were converted block by block: autocast converting each
    # weight and gradient on its own (same run, for the A/B).
    "hf-flash-perceiver+autocast-casts": ImplSpec(
        ("seed", "io", "large"), lambda s, a: build_ours(s, "sdpa", disabled=("weight_cast",)),
        ab=True,
    ),
    # The default path with the MLP activation in PyTorch ops instead of its Triton kernels (same run, for the A/B).
    "hf-flash-perceiver+torch-activation": ImplSpec(
        ("seed", "io", "large"), lambda s, a: build_ours(s, "sdpa", disabled=("fused_activation",)),
        ab=True,
    ),
    # The default path with every LayerNorm in PyTorch's op (fp32 under autocast, then cast by the next Linear):
    # the input's norm and the block norms that the default runs as Triton kernels (same run, for the A/B).
    "hf-flash-perceiver+torch-norm": ImplSpec(
        ("seed", "io", "large"), lambda s, a: build_ours(s, "sdpa", disabled=("fused_norm",)), ab=True
    ),
    "hf-flash-perceiver+flash-attn": ImplSpec(
        ("seed", "io", "masked", "large"), lambda s, a: build_ours(s, "flash_attention_2"),
        unavailable=_needs(flash_attn_2_available, "flash-attn (flash_attn) is not installed"),
    ),
    "hf-flash-perceiver+flash-attn-4": ImplSpec(
        ("seed", "io", "masked", "large"), lambda s, a: build_ours(s, "flash_attention_4"),
        unavailable=_needs(
            flash_attn_4_available,
            "flash-attn-4 (flash_attn.cute) is not installed or hf_flash_perceiver registers no 'flash_attention_4' "
            "backend",
        ),
    ),
    "hf-flash-perceiver+compile": ImplSpec(
        ("seed", "io", "large"), lambda s, a: build_ours(s, "sdpa", compile=True), compile=True
    ),
    "hf-flash-perceiver+compile+torch-activation": ImplSpec(
        ("seed", "large"), lambda s, a: build_ours(s, "sdpa", compile=True, disabled=("fused_activation",)),
        compile=True, ab=True,
    ),
    # CUDA graphs on top of compile: the eager step is CPU-bound at these sizes (launch overhead), graphs remove it.
    "hf-flash-perceiver+compile-cudagraphs": ImplSpec(
        ("seed", "io", "masked"), lambda s, a: build_ours(s, "sdpa", compile=True, compile_mode="reduce-overhead"),
        compile=True,
    ),
    # Inductor's max-autotune on top of CUDA graphs: each GEMM benchmarked against Triton templates that take
    # pointwise epilogues (bias, residual adds). Minutes of autotuning per shape, so an A/B of its own.
    "hf-flash-perceiver+compile-max-autotune": ImplSpec(
        ("seed", "large"), lambda s, a: build_ours(s, "sdpa", compile=True, compile_mode="max-autotune"),
        compile=True, ab=True,
    ),
}


@dataclass
class Job:
    impl: str
    config: str
    n: int
    batch: int
    masked: bool = False


# ---------------------------------------------------------------------------------------------------- measuring
@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    configs: dict[str, ConfigSpec]
    matmul_tflops: float | None = None  # the MFU denominator; None off the GPU
    ours_flops: dict[tuple[Shape, int], int] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(shape: Shape, n: int, batch: int, masked: bool, device: torch.device,
                seed: int = 0) -> tuple[Tensor, Tensor | None, float]:
    """fp32 inputs (and a random-length mask), the same for a given (n, batch, seed) whether masked or not, and the
    fraction of valid tokens."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, n, shape.input_dim, device=device, generator=gen)
    if not masked:
        return x, None, 1.0
    lengths = torch.randint(n // 4, n + 1, (batch,), generator=torch.Generator().manual_seed(seed + 1))
    mask = (torch.arange(n)[None] < lengths[:, None]).to(device)
    return x, mask, float(lengths.sum()) / (batch * n)


def train_step(model: nn.Module, x: Tensor, mask: Tensor | None) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = model(x, mask)
    out.float().mean().backward()


def time_steps(step: Callable[[], None], device: torch.device, iters: int) -> list[float]:
    """Milliseconds of each of `iters` steps. On CUDA, event pairs are recorded around every step and read after
    one final synchronisation, so no host sync sits between steps."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def step_stats(step: Callable[[], None], device: torch.device, iters: int, profiled: int = 3) -> dict:
    """Where a step's time goes: `wall_ms`, the median wall time of one step run alone (synchronised before and
    after); `host_ms`, the median time the host takes to issue it (the queue drained first: above `device_ms` the
    step is host-bound); and, on a GPU, from `profiled` steps under torch.profiler, `kernels_per_step` (every device
    activity: kernels, memcpy, memset) and `device_ms`, the time per step during which at least one of them runs."""
    wall, host = [], []
    for _ in range(iters):
        synchronize(device)
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        synchronize(device)
        wall.append((time.perf_counter() - t0) * 1e3)
        host.append((t1 - t0) * 1e3)
    stats = {"wall_ms": statistics.median(wall), "host_ms": statistics.median(host),
             "kernels_per_step": None, "device_ms": None}
    if device.type != "cuda":
        return stats
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(profiled):
            step()
        synchronize(device)
    spans = sorted(
        (e.time_range.start, e.time_range.end) for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    busy, end = 0.0, float("-inf")
    for start, stop in spans:  # the union of the activity intervals
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    stats["kernels_per_step"] = len(spans) / profiled
    stats["device_ms"] = busy / 1e3 / profiled
    return stats


def count_train_flops(model: nn.Module, x: Tensor, mask: Tensor | None) -> int:
    with FlopCounterMode(display=False) as counter:
        train_step(model, x, mask)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def model_flops(ctx: Context, job: Job, spec: ConfigSpec, model: nn.Module) -> tuple[int, str]:
    """FLOPs of one training step at `job.batch`, counted at batch 1 (every op works per sample) on the padded shape.

    Our variants share one count, of the same model on the eager attention backend: FlopCounterMode misses custom
    kernels (flash-attn's ops, the varlen op, CPU SDPA), the math is the same, and recomputation is not model work.
    Peers are counted on their own model (matmul/einsum attention, all of it counted).
    """
    x, _, _ = make_inputs(spec.shape, job.n, 1, False, ctx.device)
    if IMPLS[job.impl].peer:
        return count_train_flops(model, x, None) * job.batch, "counted on this model"
    key = (spec.shape, job.n)
    if key not in ctx.ours_flops:
        counter_model = build_ours(spec.shape, "eager").to(ctx.device)
        ctx.ours_flops[key] = count_train_flops(counter_model, x, None)
        del counter_model
    return ctx.ours_flops[key] * job.batch, "hf-flash-perceiver (eager attention) count"


def measure(ctx: Context, job: Job, record: dict) -> None:
    """Fill `record` with the measurements of `job` (exceptions propagate to `run_job`)."""
    args, device = ctx.args, ctx.device
    spec = ctx.configs[job.config]
    impl = IMPLS[job.impl]
    if impl.compile:
        torch._dynamo.reset()  # a fresh compilation per record: static shapes, no cache-size limit surprises
    model = impl.build(spec.shape, args).to(device)
    record["model"] = {"shape": spec.shape.as_dict(), "params": num_params(model)}
    if job.impl == "transformers-perceiver":
        record["model"]["transformers_channels"] = {
            "qk_channels": args.tf_qk_channels, "v_channels": args.tf_v_channels,
            **transformers_head_widths(spec.shape, args.tf_qk_channels, args.tf_v_channels),
        }
    # Ours (compiled too) is counted on a separate eager model, so the compiled wrapper never traces a second graph.
    flops, record["flops_source"] = model_flops(ctx, job, spec, model)
    record["flops"] = flops

    x, mask, valid = make_inputs(spec.shape, job.n, job.batch, job.masked, device)
    if spec.masked:
        record["valid_fraction"] = round(valid, 4)

    def step():
        train_step(model, x, mask)

    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = args.warmup
    if impl.compile:
        t0 = time.perf_counter()
        step()  # compiles forward and backward
        synchronize(device)
        record["compile_s"] = round(time.perf_counter() - t0, 2)
        warmup += 2
    for _ in range(warmup):
        step()
    synchronize(device)
    times = time_steps(step, device, args.iters)
    ms = statistics.median(times)
    record["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    record["ms_min"], record["ms_max"] = min(times), max(times)
    record["samples_per_s"] = job.batch / (ms / 1e3)
    record["tflops_per_s"] = flops / (ms / 1e3) / 1e12
    # MFU only against a measured GPU bf16 ceiling: a CPU's "bf16 matmul" is no peak (tiny models exceeded it).
    record["mfu"] = record["tflops_per_s"] / ctx.matmul_tflops if ctx.matmul_tflops is not None else None
    record.update(step_stats(step, device, args.iters))
    record["ms"] = ms  # last: a record with `ms` is a complete measurement


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    # cuBLAS / cuDNN workspace failures surface as RuntimeErrors rather than OutOfMemoryError.
    return "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def empty_record(job: Job) -> dict:
    return {"impl": job.impl, "config": job.config, "n": job.n, "batch": job.batch, "masked": job.masked, "ms": None,
            "peak_gib": None, "tflops_per_s": None, "mfu": None, "oom": False}


def free_memory(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        # The encoder's CUDA graphs hold their activations' memory until dropped.
        importlib.import_module("hf_flash_perceiver.encoder_graphs").reset()
        # Reference cycles can keep the last record's CUDA tensors alive into the next record's peak-memory
        # measurement. Off the GPU no memory is measured, and a full collection with transformers imported costs
        # about a second per record: most of a smoke run.
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_job(ctx: Context, job: Job) -> dict:
    record = empty_record(job)
    try:
        measure(ctx, job, record)
    except PeerUnavailable as exc:
        record["skipped"] = str(exc)
    except Exception as exc:  # one record's failure must not end the run
        if is_oom(exc):
            record["oom"] = True
            record["oom_message"] = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        else:
            record["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            traceback.print_exc(file=sys.stderr)
        for key in ("ms", "ms_min", "ms_max", "peak_gib", "tflops_per_s", "mfu", "samples_per_s"):
            record[key] = None
    # Outside the `except` blocks: the exception (and the frames holding the model and activations) is gone by now.
    free_memory(ctx.device, IMPLS[job.impl].compile)
    return record


def matmul_ceiling(device: torch.device, size: int, iters: int = 10) -> float:
    """bf16 matmul TFLOP/s (size^3, median of `iters` after warm-up): the MFU denominator of this run."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(25):  # ~40 ms of work on an H100: lets the clocks ramp up before timing
        a @ b
    synchronize(device)
    ms = statistics.median(time_steps(lambda: a @ b, device, iters))
    return 2 * size**3 / (ms / 1e3) / 1e12


# ---------------------------------------------------------------------------------------------------- planning
def plan(ctx: Context) -> tuple[list[Job], list[str]]:
    """Jobs in priority order -- every eager record first (cheap, and what most targets need), then the compiled
    records (each compilation costs ~a minute on a GPU) -- and notes on impls that cannot run here."""
    args = ctx.args
    notes = []
    usable = []
    for name in args.impls:
        why = IMPLS[name].unavailable()
        if why is not None and not IMPLS[name].peer:
            notes.append(f"{name} not run: {why}.")
            continue
        usable.append(name)
    jobs: list[Job] = []
    for config in args.configs:
        spec = ctx.configs[config]
        for n, batch in spec.points:
            if args.ns and n not in args.ns:
                continue
            for impl in usable:
                if IMPLS[impl].compile or config not in IMPLS[impl].configs:
                    continue
                for masked in ((True, False) if spec.masked else (False,)):
                    jobs.append(Job(impl, config, n, batch, masked))
    for impl in [name for name in usable if IMPLS[name].compile]:
        for config, n in compile_points(ctx):
            if config in IMPLS[impl].configs:
                batch = dict(ctx.configs[config].points)[n]
                for masked in ((True, False) if ctx.configs[config].masked else (False,)):
                    jobs.append(Job(impl, config, n, batch, masked))
    return jobs, notes


def compile_points(ctx: Context) -> list[tuple[str, int]]:
    args = ctx.args
    if args.compile_points is not None:
        points = args.compile_points
    else:
        points = [(config, n) for config in args.configs for n in ctx.configs[config].compile_ns]
    valid = []
    for config, n in points:
        if config not in args.configs or not any(config in i.configs for i in IMPLS.values() if i.compile):
            continue
        if args.ns and n not in args.ns:
            continue
        if n not in dict(ctx.configs[config].points):
            raise SystemExit(f"--compile-points {config}:{n}: n={n} is not one of {config}'s points "
                             f"{[p[0] for p in ctx.configs[config].points]}.")
        valid.append((config, n))
    return valid


# ---------------------------------------------------------------------------------------------------- profiling
def launch_attribution(events, steps: int, depth: int = 4) -> list[tuple[float, str, str]]:
    """Device activities per step by what issued them: `(count per step, activity name, the issuing op and up to
    `depth - 1` of its parents, innermost first)`, most frequent first. Every activity (kernel, memset, memcpy) is a
    launch the host pays for, so this is the table to cut launches from; `events` are torch.profiler's
    `prof.events()` (CPU ops carry the activities they launched)."""
    counts: dict[tuple[str, str], int] = {}
    for event in events:
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        for activity in event.kernels:
            chain, parent = [event.name], event.cpu_parent
            while parent is not None and len(chain) < depth:
                chain.append(parent.name)
                parent = parent.cpu_parent
            key = (activity.name, " < ".join(chain))
            counts[key] = counts.get(key, 0) + 1
    rows = [(count / steps, name, chain) for (name, chain), count in counts.items()]
    return sorted(rows, key=lambda row: (-row[0], row[1], row[2]))


def format_attribution(rows: list[tuple[float, str, str]]) -> str:
    if not rows:
        return "(no device activities: a CPU run)\n"
    total = sum(count for count, _, _ in rows)
    lines = [f"{total:.1f} device activities per step", "per step  activity  <-  issued by (innermost first)"]
    lines += [f"{count:8.1f}  {name[:90]}  <-  {chain}" for count, name, chain in rows]
    return "\n".join(lines) + "\n"


def profile_warmup() -> int:
    """Training steps before a profile: the encoder's eager calls before its capture, the capturing call, and one
    replay."""
    from hf_flash_perceiver import encoder_graphs

    return encoder_graphs.WARMUP_CALLS + 2


def profile_steps(step: Callable[[], None], device: torch.device, title: str, note: str = "", steps: int = 3) -> str:
    """`step` (a training step) profiled: past the encoder's eager calls and its capture (and a compiled model's
    recording), so that every profiled step is the step the timings measure, a replay where the encoder is captured;
    then `steps` steps under torch.profiler. Returns the text of a profile file: `title` and `note` (comment lines),
    the top kernels by self device time, then every device activity per step by the op that issued it
    ([`launch_attribution`])."""
    for _ in range(profile_warmup()):
        step()
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    launches = format_attribution(launch_attribution(prof.events(), steps))
    return (f"# {title}, {steps} training steps, sorted by {sort}\n{note}\n{table}\n"
            f"\n# Device activities per step, by the op that issued them\n{launches}")


def profile(ctx: Context, config: str, n: int, impl: str, stem: str) -> Path:
    """[`profile_steps`] of one record's training step, written to `<stem>-profile-CONFIG-N-<variant>.txt`."""
    spec = ctx.configs[config]
    batch = dict(spec.points)[n]
    model = IMPLS[impl].build(spec.shape, ctx.args).to(ctx.device)
    x, mask, _ = make_inputs(spec.shape, n, batch, spec.masked, ctx.device)
    title = f"{impl}, config {config}{' (masked)' if spec.masked else ''}, n={n}, batch={batch}"
    suffix = impl.removeprefix(report.OURS).strip("+") or "sdpa"
    path = Path(ctx.args.out_dir) / f"{stem}-profile-{config}-{n}-{suffix}.txt"
    path.write_text(profile_steps(lambda: train_step(model, x, mask), ctx.device, title,
                                  f"# shape: {spec.shape.as_dict()}\n"))
    del model, x, mask
    free_memory(ctx.device, IMPLS[impl].compile)
    return path


# ---------------------------------------------------------------------------------------------------- CLI
def _csv(choices: list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {choices}")
        return items

    return parse


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _points(text: str) -> list[tuple[str, int]]:
    if text.strip().lower() == "none":
        return []
    out = []
    for item in text.split(","):
        config, _, n = item.strip().partition(":")
        if config not in CONFIGS or not n.isdigit():
            raise argparse.ArgumentTypeError(f"expected CONFIG:N with CONFIG in {list(CONFIGS)}, got {item!r}")
        out.append((config, int(n)))
    return out


def _profile_request(text: str) -> tuple[str, int, str]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in CONFIGS or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"expected CONFIG:N[:IMPL], got {text!r}")
    impl = parts[2] if len(parts) == 3 else report.OURS
    if impl not in IMPLS:
        raise argparse.ArgumentTypeError(f"unknown impl {impl!r}; choose from {list(IMPLS)}")
    return parts[0], int(parts[1]), impl


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example (one GPU call): python benchmarks/run.py --time-budget-s 420 --profile seed:4096",
    )
    parser.add_argument("--configs", type=_csv(list(CONFIGS)), default=list(CONFIGS),
                        help=f"comma-separated configurations to run, of {list(CONFIGS)} (default: all)")
    parser.add_argument("--impls", type=_csv(list(IMPLS)), default=list(IMPLS),
                        help=f"comma-separated implementations, of {list(IMPLS)}; each runs on the configs it "
                             "applies to (default: all but the A/B variants of one package switch, "
                             f"{[name for name, spec in IMPLS.items() if spec.ab]}; optional kernels that are not "
                             "installed are noted and left out)")
    parser.add_argument("--ns", type=_ints, default=None, help="only these input lengths n (comma-separated)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed training steps per record, median reported (default 10; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="warm-up steps per record, compiled records get 2 more after the compiling step "
                             "(default 3; smoke 1)")
    parser.add_argument("--compile-points", type=_points, default=None,
                        help="CONFIG:N list where +compile runs (one compilation each), or 'none'; default "
                             "seed:4096,io:4096,large:16384 (smoke: seed's first point)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="stop starting records once this many seconds have passed since start (the rest are "
                             "recorded as skipped); compiled records need --compile-reserve-s left")
    parser.add_argument("--compile-reserve-s", type=float, default=120.0,
                        help="seconds of budget a compiled record needs left to start, compilation included (default 120)")
    parser.add_argument("--record-reserve-s", type=float, default=10.0,
                        help="seconds of budget any other record needs left to start (default 10)")
    parser.add_argument("--out-dir", default=None,
                        help="where the JSON (and profiles) are written (default: benchmarks/results for a full GPU "
                             "run; a fresh temporary folder for --smoke or a run off the GPU)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, eager variants only unless --impls/--compile-points name compiled ones (a "
                             "CPU runs it in seconds); the file name gets '-smoke'")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the bf16 matmul that measures the MFU ceiling on a GPU (default 8192; smoke "
                             "256)")
    parser.add_argument("--tf-qk-channels", type=int, default=None,
                        help="transformers' Perceiver qk_channels (shared by its cross- and self-attention); "
                             "default: its own sizing")
    parser.add_argument("--tf-v-channels", type=int, default=None,
                        help="transformers' Perceiver v_channels (self-attention needs it equal to d_latents)")
    parser.add_argument("--profile", type=_profile_request, action="append", default=[],
                        help="CONFIG:N[:IMPL]: after the records, write a kernel-time breakdown of that record and its "
                             "device activities by issuing op (default impl hf-flash-perceiver) to the out dir; "
                             "repeatable")
    argv_list = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.impls_given = any(a == "--impls" or a.startswith("--impls=") for a in argv_list)
    if args.iters is None:
        args.iters = 3 if args.smoke else 10
    if args.warmup is None:
        args.warmup = 1 if args.smoke else 3
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_json(path: Path, payload: dict) -> None:
    # Write-then-rename: a run killed mid-write still leaves the previous complete file.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def _fmt_record(r: dict) -> str:
    head = f"{r['config']:6s} n={r['n']:<6d} B={r['batch']:<3d} {'masked ' if r.get('masked') else ''}{r['impl']}"
    if r.get("skipped"):
        return f"{head}: skipped ({r['skipped']})"
    if r.get("oom"):
        return f"{head}: OOM"
    if r.get("error"):
        return f"{head}: ERROR {r['error'][:200]}"
    peak = "—" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
    extra = f", compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
    mfu = "" if r.get("mfu") is None else f", MFU {r['mfu']:.1%}"
    return f"{head}: {r['ms']:.2f} ms, {peak}, {r['tflops_per_s']:.3g} TFLOP/s{mfu}{extra}"


def notes_for(ctx: Context) -> list[str]:
    args = ctx.args
    timer = "CUDA events" if ctx.device.type == "cuda" else "time.perf_counter"
    return [
        f"ms: median of {args.iters} timed training steps after {args.warmup} warm-up steps ({timer}); a step is "
        "zero_grad(set_to_none=True) + forward under torch.autocast(bfloat16) with fp32 parameters + "
        "output.float().mean() + backward (no optimizer step). Compiled records: the first (compiling) step is "
        "timed as compile_s and 2 more warm-up steps follow.",
        "peak_gib: torch.cuda.max_memory_allocated over the warm-up and timed steps, after reset_peak_memory_stats "
        "taken once the model and the fp32 input batch (and mask) are on the device: it includes parameters, "
        "gradients, the input batch and activations. null on CPU.",
        "flops: torch.utils.flop_counter.FlopCounterMode over one training step at batch 1, times the batch (every "
        "op is per sample). All hf-flash-perceiver variants use one count, of the same model on the eager attention "
        "backend, because FlopCounterMode does not see custom kernels (flash-attn ops, the varlen op, CPU SDPA) and "
        "the math is the same; recomputation (cross-attention checkpointing) is not model work and is not counted. "
        "Peers are counted on their own models (their attention is plain matmul/einsum, fully counted), so their "
        "flops show any difference in work. Masked records use the padded shape's FLOPs.",
        f"mfu: tflops_per_s / matmul_tflops, the bf16 {args.matmul_size}^3 matmul TFLOP/s measured in this run "
        "(median of 10); null off the GPU, where no bf16 peak is measured."
        if ctx.device.type == "cuda" else "mfu and matmul_tflops: null off the GPU (no meaningful bf16 peak).",
        f"wall_ms / host_ms / kernels_per_step / device_ms: after the timed steps, {args.iters} steps each run alone "
        "(synchronised before and after): wall_ms is the median wall time of one, host_ms the median time the host "
        "takes to issue it (host-bound when above device_ms); kernels_per_step counts every device activity "
        "(kernels, memcpy, memset) and device_ms the time at least one of them runs, per step, over 3 steps under "
        "torch.profiler. The last two are null off the GPU.",
        "speedup (plot.py/report): peer ms / impl ms at the same config, n, batch and masking (= throughput ratio).",
        "perceiver-pytorch: Perceiver(input_axis=1, fourier_encode_data=False, final_classifier_head=False) so it "
        "returns the final latents like our PerceiverModel; same depth, widths, heads and GEGLU MLP (ratio 4).",
        "transformers-perceiver: transformers.PerceiverModel without preprocessor/decoder (inputs are embeddings), "
        "eager attention (its only one), attention dropout 0, widening factor 4 for cross and self MLPs (plain GELU "
        f"MLP); qk_channels={args.tf_qk_channels}, v_channels={args.tf_v_channels} (None = its own sizing: it shares "
        "them between cross- and self-attention and needs the self-attention value width = d_latents, so 64-wide "
        "heads throughout are impossible; per-head widths are in each record's model field).",
        "hf-flash-perceiver+xattn-ckpt: PerceiverConfig(cross_attention_checkpointing=True).",
        "hf-flash-perceiver+fused-branches: the forwards under hf_flash_perceiver.fused_block.fused_branches(True) "
        "(opt-in): every latent self-attention and MLP residual branch that fits runs as one fused autograd node "
        "(CUDA, half precision; the module path elsewhere, so off the GPU it equals hf-flash-perceiver).",
        "hf-flash-perceiver+autocast-casts: hf_flash_perceiver.weight_cast.enabled = False, the default path as it "
        "was before blocks converted their projection weights together: autocast converts each weight and each "
        "gradient on its own (off autocast, and under torch.compile, both are the same).",
        "hf-flash-perceiver+torch-activation / +compile+torch-activation: hf_flash_perceiver.fused_activation.enabled "
        "= False, the MLP activation in PyTorch ops (as before its Triton kernels; Inductor fuses those ops when "
        "compiled) instead of one Triton kernel forward and one backward (off CUDA both are the same).",
        "hf-flash-perceiver+torch-norm: hf_flash_perceiver.fused_norm.enabled = False, every LayerNorm in PyTorch's op "
        "(fp32 under autocast, cast by the next Linear) instead of the Triton kernels the default path runs for the "
        "input's norm and for block norms of at least fused_norm.BLOCK_NORM_MIN_ELEMENTS elements (off CUDA both are "
        "the same). The A/B variants (+autocast-casts, +torch-activation, +compile+torch-activation, +torch-norm) run "
        "only when named with --impls.",
        "masked: random lengths uniform in [n/4, n] per sample (bool mask), each impl also timed on the same padded "
        "batch without a mask (masked: false); valid_fraction is the share of real tokens.",
    ]


def selected_impls(args: argparse.Namespace) -> list[str]:
    """The implementations a run measures: those named with --impls, else every one but the A/B variants (and, in a
    smoke run without --compile-points, but the compiled ones)."""
    if args.impls_given:
        return list(args.impls)
    impls = [name for name in args.impls if not IMPLS[name].ab]
    if args.smoke and args.compile_points is None:
        impls = [name for name in impls if not IMPLS[name].compile]
    return impls


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.matmul_size is None:
        args.matmul_size = 256 if args.smoke else 8192
    configs = SMOKE_CONFIGS if args.smoke else CONFIGS
    args.impls = selected_impls(args)
    if args.out_dir is None:
        if args.smoke or device.type != "cuda":
            args.out_dir = tempfile.mkdtemp(prefix=f"perceiver-bench-{'smoke' if args.smoke else device.type}-")
        else:
            args.out_dir = str(RESULTS_DIR)
    ctx = Context(args, device, configs)
    if device.type == "cpu" and not args.smoke:
        print("warning: full-size shapes on a CPU take hours; use --smoke", file=sys.stderr, flush=True)
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.smoke:
        # A smoke run checks the plumbing, not CPU speed: one thread avoids OpenMP oversubscription stalls (steps of
        # a tiny model measured 1-1.5 s instead of 8 ms on a busy 2-core machine).
        torch.set_num_threads(1)
    try:
        return _run(ctx, start)
    finally:
        torch.set_num_threads(threads)


def _run(ctx: Context, start: float) -> dict:
    args, device, configs = ctx.args, ctx.device, ctx.configs

    card = card_name(device)
    date = datetime.date.today().isoformat()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{date}-{slugify(card)}{'-smoke' if args.smoke else ''}"
    path = out_dir / f"{stem}.json"

    if device.type == "cuda":
        ctx.matmul_tflops = matmul_ceiling(device, args.matmul_size)
        print(f"[{time.perf_counter() - start:6.1f}s] {card}: bf16 matmul {args.matmul_size}^3 "
              f"{ctx.matmul_tflops:.3g} TFLOP/s", flush=True)
    jobs, unavailable_notes = plan(ctx)
    for note in unavailable_notes:
        print(f"note: {note}", flush=True)
    results = {
        "card": card,
        "card_slug": slugify(card),
        "date": date,
        "smoke": args.smoke,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "hf_flash_perceiver": _version("hf-flash-perceiver"),
        "perceiver_pytorch": _version("perceiver-pytorch"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "flash_attn_4": _version("flash-attn-4"),
        "matmul_tflops": ctx.matmul_tflops,
        "protocol": {"iters": args.iters, "warmup": args.warmup, "dtype": "bf16 autocast, fp32 params",
                     "matmul_size": args.matmul_size, "device": str(device)},
        "argv": args.argv,
        "notes": notes_for(ctx) + unavailable_notes,
        "records": [],
        "profiles": [],
        "complete": False,
    }

    def budget_left() -> float:
        if args.time_budget_s is None:
            return math.inf
        return args.time_budget_s - (time.perf_counter() - start)

    print(f"{len(jobs)} records planned -> {path}", flush=True)
    for i, job in enumerate(jobs, 1):
        need = args.compile_reserve_s if IMPLS[job.impl].compile else args.record_reserve_s
        if budget_left() < need:
            record = empty_record(job)
            record["skipped"] = f"time budget ({args.time_budget_s:g} s) spent"
        else:
            record = run_job(ctx, job)
        results["records"].append(record)
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(path, results)
        print(f"[{time.perf_counter() - start:6.1f}s] {i}/{len(jobs)} {_fmt_record(record)}", flush=True)

    for config, n, impl in args.profile:
        if config not in configs or n not in dict(configs[config].points):
            print(f"profile {config}:{n}: no such record point; skipped", flush=True)
            continue
        if budget_left() < args.record_reserve_s:
            print(f"profile {config}:{n}: time budget spent; skipped", flush=True)
            continue
        try:
            written = profile(ctx, config, n, impl, stem)
        except Exception as exc:  # a profile is an extra: report and go on
            print(f"profile {config}:{n} failed: {type(exc).__name__}: {exc}", flush=True)
            free_memory(device, IMPLS[impl].compile)
            continue
        results["profiles"].append(written.name)
        print(f"[{time.perf_counter() - start:6.1f}s] profile written: {written}", flush=True)

    results["complete"] = not any(r.get("skipped", "").startswith("time budget") for r in results["records"])
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    write_json(path, results)

    print("\n" + report.markdown_table(results), flush=True)
    print("\nTargets:", flush=True)
    for line in report.summary_lines(results) or ["(no comparable records)"]:
        print("  " + line, flush=True)
    print(f"\nwrote {path} in {results['elapsed_s']:.0f} s", flush=True)
    return results


if __name__ == "__main__":
    main()

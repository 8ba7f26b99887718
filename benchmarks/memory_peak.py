"""Where a training step's peak device memory is: the allocator's history over the first steps of this package's model
at one of transformers' pretrained shapes (the step of `pretrained_shapes.py`: bf16 autocast, fp32 weights,
`zero_grad`, forward with labels, backward), replayed to find each step's peak and what is allocated at it.

    PYTHONPATH=. python benchmarks/memory_peak.py > memory-peak.txt      # the language shape, B = 16 (GPU)
    PYTHONPATH=. python benchmarks/memory_peak.py --shape vision-learned --no-encoder-graphs

With the encoder's CUDA graphs on (the default) the first steps run eagerly, the next one captures the encoder (its
side-stream warm-up and the capture itself allocate in that step) and later ones replay it, allocating nothing inside
the encoder: so the steps' peaks say which regime sets the step's peak memory, which `pretrained_shapes.py` reports as
one figure. The history starts once the model is on the GPU: what was allocated then (the weights) is the base of
every figure, and each block allocated since is traced to the innermost frame of this package (or of this script)
that allocated it. The blocks live at the peak of the chosen step (the highest, unless `--step`) are listed by that
frame, largest first.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pretrained_shapes as P  # noqa: E402

GIB = 2**30
MIB = 2**20
# Each step starts by allocating (and freeing) a block of a size nothing else in the step allocates, so that the
# replay of the history can tell the steps apart: MARK_BYTES + 512 × step.
MARK_BYTES = 512 * 1009
_OURS = ("hf_flash_perceiver", "memory_peak.py", "pretrained_shapes.py")


@dataclass
class StepPeak:
    """One step's highest allocated total (bytes, base included), the index of the history event that reached it and
    the blocks live then (address → alloc event)."""

    step: int
    total: int = 0
    event: int = -1
    live: dict = field(default_factory=dict)


def step_peaks(trace: Sequence[dict], base: int, steps: int) -> list[StepPeak]:
    """Replay an allocator history (`torch.cuda.memory._snapshot()["device_traces"][i]`): per step (as marked by
    `MARK_BYTES` allocations), the peak of the allocated total. A block freed that was allocated before the history
    began is taken off the total (events carry their size) but was never in the live set."""
    marks = {MARK_BYTES + 512 * i: i for i in range(steps)}
    live: dict = {}
    total = base
    step = None
    peaks: dict[int, StepPeak] = {}
    for index, event in enumerate(trace):
        action = event["action"]
        if action == "alloc" and event["size"] in marks and step != marks[event["size"]]:
            step = marks[event["size"]]
            peaks[step] = StepPeak(step, total, index, dict(live))
            live[event["addr"]] = None  # its own free must not count against the step
            continue
        if action == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if step is not None and total > peaks[step].total:
                peaks[step] = StepPeak(step, total, index, dict(live))
        elif action == "free_completed":
            if live.pop(event["addr"], True) is not None:
                total -= event["size"]
    for peak in peaks.values():
        peak.live = {addr: e for addr, e in peak.live.items() if e is not None}
    return [peaks[i] for i in sorted(peaks)]


def _frame(event: dict) -> str:
    for frame in event.get("frames", ()):
        if any(name in frame["filename"] for name in _OURS):
            return f"{Path(frame['filename']).name}:{frame['line']} {frame['name']}"
    return "(no frame of this package: the autograd engine, a kernel's workspace)"


def by_frame(live: Iterable[dict]) -> list[tuple[str, int, int]]:
    """Live blocks grouped by the innermost frame of this package that allocated them: (frame, bytes, blocks),
    largest first."""
    sizes: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for event in live:
        where = _frame(event)
        sizes[where] += event["size"]
        counts[where] += 1
    return [(where, size, counts[where]) for where, size in sizes.most_common()]


def main(argv: list[str] | None = None) -> list[StepPeak]:
    """Print each step's peak and the chosen step's live blocks by frame; returns the steps' peaks."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("language", "vision-learned"), default="language")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--step", type=int, default=None, help="the step whose live blocks are listed (default: "
                        "the one with the highest peak)")
    parser.add_argument("--no-encoder-graphs", action="store_true", help="every step eager (encoder_graphs off)")
    parser.add_argument("--top", type=int, default=25, help="frames listed")
    args = parser.parse_args(argv)
    if args.steps < 1 or (args.step is not None and not 0 <= args.step < args.steps):
        parser.error(f"--steps must be >= 1 and --step in [0, --steps); got --steps {args.steps}, --step {args.step}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: torch sees none here (the allocator's history is CUDA's)")
    from hf_flash_perceiver import encoder_graphs

    encoder_graphs.enabled = not args.no_encoder_graphs
    device = torch.device("cuda")
    config, size = P.shapes(False)[args.shape]
    _, model = P.build_pair(args.shape, config, Path(tempfile.mkdtemp(prefix="memory-peak-")))
    _, kwargs = P.batch_for(args.shape, size, args.batch, config, device)
    model.to(device).train()

    def train() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(**kwargs).loss
        loss.backward()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    try:
        for i in range(args.steps):
            torch.empty(MARK_BYTES + 512 * i, dtype=torch.uint8, device=device)  # allocated and freed: the mark
            train()
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][device.index or 0]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"# benchmarks/memory_peak.py --shape {args.shape} --batch {args.batch}"
          f"{' --no-encoder-graphs' if args.no_encoder_graphs else ''}: {torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}; weights {params / GIB:.3f} GiB, allocated before the first step {base / GIB:.3f} GiB, "
          f"max_memory_allocated over the steps {torch.cuda.max_memory_allocated() / GIB:.3f} GiB")
    peaks = step_peaks(trace, base, args.steps)
    for peak in peaks:
        print(f"step {peak.step}: peak {peak.total / GIB:.3f} GiB (history event {peak.event} of {len(trace)})")
    if not peaks:
        print("no step marks in the history (too many events for its buffer?)")
        return peaks
    chosen = peaks[args.step] if args.step is not None else max(peaks, key=lambda p: p.total)
    live = list(chosen.live.values())
    print(f"\nstep {chosen.step}, at its peak: {sum(e['size'] for e in live) / GIB:.3f} GiB allocated during the "
          f"recorded steps, by the innermost frame of this package that allocated it")
    for where, size, count in by_frame(live)[:args.top]:
        print(f"{size / MIB:9.1f} MiB {count:5d} blocks  {where}")
    frames = [f for f in trace[chosen.event].get("frames", ()) if f["filename"].endswith(".py")]
    print("\nthe allocation that reached the peak, Python frames innermost first:"
          + "".join(f"\n  {Path(f['filename']).name}:{f['line']} {f['name']}" for f in frames[:10]))
    return peaks


if __name__ == "__main__":
    main()

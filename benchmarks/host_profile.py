"""Where the host time of the default training step goes: the harness's step (`run.py`: bf16 autocast, forward +
backward, `zero_grad`) of this package's default path, per configuration, timed and then profiled by function.

    PYTHONPATH=. python benchmarks/host_profile.py TAG > host-profile.txt   # GPU
    python benchmarks/host_profile.py TAG --smoke                           # the same code at tiny sizes, on a CPU

For each point, after 8 warm-up steps (the encoder's CUDA graphs are captured by then): the median host time of 30
steps each run alone (synchronised before and after; the same measure as `host_ms` in run.py), then cProfile over 20
back-to-back steps, by time spent in each function itself. cProfile inflates Python's share several times over, and
in back-to-back steps a graph replay waits whenever the GPU is behind (it is there the step is device-bound): read
its table for which functions issue the step, its median for the host time. TAG names the tree measured in the
output; run it from another tree (with `PYTHONPATH=.` there) to compare two versions of the package on one host.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as R  # noqa: E402

POINTS = (("io", 131072, 8), ("io", 512, 256), ("seed", 4096, 128))
SMOKE_POINTS = (("io", 64, 2), ("seed", 64, 2))


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Print each point's median host time and profile; returns the medians (ms) by point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tag", help="names the tree measured, in the output")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script, not a host)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke): torch sees none here")
    device = torch.device("cpu" if args.smoke else "cuda")
    configs, points = (R.SMOKE_CONFIGS, SMOKE_POINTS) if args.smoke else (R.CONFIGS, POINTS)
    medians = {}
    for cfg, n, b in points:
        spec = configs[cfg]
        model = R.build_ours(spec.shape, "sdpa").to(device)
        x, mask, _ = R.make_inputs(spec.shape, n, b, False, device)

        def step() -> None:
            R.train_step(model, x, mask)

        for _ in range(8):
            step()
        R.synchronize(device)
        host = []
        for _ in range(30):
            R.synchronize(device)
            t0 = time.perf_counter()
            step()
            host.append((time.perf_counter() - t0) * 1e3)
        R.synchronize(device)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            step()
        profiler.disable()
        R.synchronize(device)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        point = f"{cfg} {n}x{b}"
        medians[point] = statistics.median(host)
        print(f"=== {args.tag} {point}: host median {medians[point]:.2f} ms")
        print("\n".join(line[:150] for line in text.getvalue().splitlines()[:45]))
        del model, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return medians


if __name__ == "__main__":
    main()

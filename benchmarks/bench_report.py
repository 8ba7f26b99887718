"""Reading a results file and turning it into comparisons: the stdout summary of `run.py` and the README table of
`plot.py --markdown`. No plotting and no torch here, so both scripts (and the tests) can use it anywhere."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


OURS = "hf-flash-perceiver"
PERCEIVER_PYTORCH = "perceiver-pytorch"
TRANSFORMERS = "transformers-perceiver"

# The peer each config is compared against (the large config has none: its target is MFU alone).
PEER_OF_CONFIG = {"seed": PERCEIVER_PYTORCH, "masked": PERCEIVER_PYTORCH, "io": TRANSFORMERS}

# The performance targets, quoted next to the measured numbers (they decide nothing here). The seed speedup asked of
# the default eager path (what Trainer runs) is lower than that of the opt-in fast variants.
TARGET_SEED_SPEEDUP = 5.0
TARGET_SEED_SPEEDUP_DEFAULT = 3.0
TARGET_KERNELS_PER_STEP = 700
TARGET_KERNELS_N = 4096
TARGET_SEED_MFU_N = 4096
TARGET_SEED_MFU = 0.35
TARGET_IO_SPEEDUP = 3.0
TARGET_MEMORY_GIB = 1.0
TARGET_MEMORY_POINT = (131072, 8)
TARGET_MASKED_RATIO = 1.1
TARGET_LARGE_MFU = 0.50

REQUIRED_RECORD_KEYS = ("impl", "config", "n", "batch", "ms", "peak_gib", "tflops_per_s", "mfu", "oom")


def is_ours(impl: str) -> bool:
    return impl == OURS or impl.startswith(OURS + "+")


def measured(record: dict) -> bool:
    return record.get("ms") is not None


def load(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


# Results of the other scripts (long_inputs.py, multi_gpu.py) share the folder but not the schema.
OTHER_RESULTS = ("-attention-backends", "-long-inputs", "-multi-gpu", "-pretrained-shapes", "-trainer")
# Complete runs of `run.py` that are not the code the package ships: made with a package switch set for the whole run
# while it was being developed, or superseded by a later complete run of the same date (in a fresh clone every file
# has the same modification time, so the date in the name cannot order them). Kept for their records, never the
# README table.
SWITCHED_RUNS = ("-encoder-graphs-on", "-superseded")


# Options that make a run measure a part of the harness on purpose (an A/B of some variants, one config).
SCOPING_OPTIONS = ("--configs", "--impls", "--ns")


def is_complete(results: dict) -> bool:
    """Whether a run measured the whole harness: not scoped to some configs, implementations or sizes (a scoped run
    is an A/B, not a table), no record left out by the time budget, and no peer missing (a run without its peers has
    no ratios to show). Files written before the flag existed count as complete."""
    if not results.get("complete", True):
        return False
    if any(a.split("=")[0] in SCOPING_OPTIONS for a in results.get("argv", [])):
        return False
    peers = set(PEER_OF_CONFIG.values())
    return not any(r.get("impl") in peers and r.get("skipped") for r in results.get("records", []))


def newest_results(results_dir: str | Path) -> Path:
    """The newest results file of `run.py`: complete runs before partial or scoped ones (see [`is_complete`]; such a
    run stays in the folder for its records but does not become the README table while a complete one exists), then the
    latest date in its name, then the latest modification; smoke runs only when there is nothing else."""
    files = [
        p for p in Path(results_dir).glob("*.json")
        if not p.name.startswith(".") and not p.stem.removesuffix("-smoke").endswith(OTHER_RESULTS + SWITCHED_RUNS)
    ]
    if not files:
        raise FileNotFoundError(f"No results JSON in {results_dir}; run benchmarks/run.py first.")
    return max(files, key=lambda p: (not p.stem.endswith("-smoke"), is_complete(load(p)), p.name[:10],
                                     p.stat().st_mtime))


def _key(record: dict) -> tuple:
    return (record["config"], record["n"], record["batch"], bool(record.get("masked", False)))


def peer_record(records: list[dict], record: dict) -> dict | None:
    """The measured peer record of the same config, n, batch and masking, if any."""
    peer = PEER_OF_CONFIG.get(record["config"])
    if peer is None or record["impl"] == peer:
        return None
    for other in records:
        if other["impl"] == peer and _key(other) == _key(record) and measured(other):
            return other
    return None


def speedup(records: list[dict], record: dict) -> float | None:
    """Throughput of `record` over its peer's at the same batch and n (= peer time / this time)."""
    peer = peer_record(records, record)
    if peer is None or not measured(record):
        return None
    return peer["ms"] / record["ms"]


def status(record: dict) -> str:
    if record.get("oom"):
        return "OOM"
    if record.get("skipped"):
        return "skipped"
    if record.get("error"):
        return "error"
    return ""


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def config_label(record: dict) -> str:
    if record["config"] == "masked":
        return "masked" if record.get("masked") else "masked (same batch, no mask)"
    return record["config"]


def markdown_table(results: dict) -> str:
    """The README table: one row per record (OOM/error/skipped rows say so), speedup vs the config's peer."""
    records = results["records"]
    lines = [
        f"Measured on **{results['card']}** ({results['date']}, torch {results['torch']}, transformers "
        f"{results['transformers']}); bf16 autocast, fp32 params, forward + backward; "
        + (f"MFU against a measured bf16 matmul ceiling of {results['matmul_tflops']:.3g} TFLOP/s."
           if results.get("matmul_tflops") else "no MFU off the GPU."),
        "",
        "| impl | config | n | batch | ms | peak GiB | TFLOP/s | MFU | speedup vs peer | kernels/step | device ms | host ms |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        state = status(r)
        ratio = speedup(records, r)
        peer = PEER_OF_CONFIG.get(r["config"])
        ratio_text = "—" if ratio is None else f"{ratio:.2f}x {peer}"
        ms = state if state and r.get("ms") is None else _fmt(r.get("ms"), ".1f")
        lines.append(
            f"| {r['impl']} | {config_label(r)} | {r['n']} | {r['batch']} | {ms} | {_fmt(r.get('peak_gib'), '.2f')} | "
            f"{_fmt(r.get('tflops_per_s'), '.1f')} | {_fmt(r.get('mfu'), '.1f', 100)}{'%' if r.get('mfu') else ''} | "
            f"{ratio_text} | {_fmt(r.get('kernels_per_step'), '.0f')} | {_fmt(r.get('device_ms'), '.1f')} | "
            f"{_fmt(r.get('host_ms'), '.1f')} |"
        )
    return "\n".join(lines)


def seed_speedup_target(impl: str) -> float:
    """The seed config's speedup target for `impl`: the default path's, or the fast variants'."""
    return TARGET_SEED_SPEEDUP_DEFAULT if impl == OURS else TARGET_SEED_SPEEDUP


def _find(records: Iterable[dict], **match) -> list[dict]:
    return [r for r in records if all(r.get(k) == v for k, v in match.items()) and measured(r)]


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def summary_lines(results: dict) -> list[str]:
    """One line per benchmark target that the records can speak to, with the measured value and the target."""
    records = results["records"]
    out: list[str] = []
    for r in records:
        if not is_ours(r["impl"]) or r["config"] not in ("seed", "io") or not measured(r):
            continue
        ratio = speedup(records, r)
        if ratio is None:
            continue
        target = seed_speedup_target(r["impl"]) if r["config"] == "seed" else TARGET_IO_SPEEDUP
        out.append(
            f"{r['config']:6s} n={r['n']:<6d} B={r['batch']:<3d} {r['impl']}: {ratio:5.2f}x "
            f"{PEER_OF_CONFIG[r['config']]} (target >= {target:g}x: {_verdict(ratio >= target)})"
        )
    for r in _find(records, config="seed", n=TARGET_SEED_MFU_N):
        if is_ours(r["impl"]) and r.get("mfu") is not None:
            out.append(
                f"seed   n={r['n']:<6d} {r['impl']}: MFU {r['mfu']:.1%} "
                f"(target >= {TARGET_SEED_MFU:.0%}: {_verdict(r['mfu'] >= TARGET_SEED_MFU)})"
            )
    for r in _find(records, config="seed", n=TARGET_KERNELS_N):
        if is_ours(r["impl"]) and r.get("kernels_per_step") is not None:
            ok = r["kernels_per_step"] <= TARGET_KERNELS_PER_STEP
            mine = f" (target <= {TARGET_KERNELS_PER_STEP}: {_verdict(ok)})" if r["impl"] == OURS else ""
            out.append(f"seed   n={r['n']:<6d} B={r['batch']:<3d} {r['impl']}: {r['kernels_per_step']:.0f} kernels/step{mine}")
    for r in records:
        if r["impl"] == OURS and measured(r) and r.get("host_ms") is not None and r.get("device_ms") is not None:
            out.append(
                f"{config_label(r):6s} n={r['n']:<6d} B={r['batch']:<3d} {r['impl']}: host {r['host_ms']:.1f} ms / "
                f"device {r['device_ms']:.1f} ms per step (target host <= device: "
                f"{_verdict(r['host_ms'] <= r['device_ms'])})"
            )
    n, batch = TARGET_MEMORY_POINT
    for r in _find(records, config="seed", n=n, batch=batch):
        if r.get("peak_gib") is not None:
            ok = r["peak_gib"] <= TARGET_MEMORY_GIB
            mine = f" (target <= {TARGET_MEMORY_GIB:g} GiB: {_verdict(ok)})" if is_ours(r["impl"]) else ""
            out.append(f"seed   n={n} B={batch} {r['impl']}: peak {r['peak_gib']:.2f} GiB{mine}")
    for r in _find(records, config="masked", masked=True):
        unmasked = [u for u in _find(records, config="masked", masked=False, impl=r["impl"])
                    if u["n"] == r["n"] and u["batch"] == r["batch"]]
        if unmasked:
            ratio = r["ms"] / unmasked[0]["ms"]
            mine = f" (target <= {TARGET_MASKED_RATIO:g}x: {_verdict(ratio <= TARGET_MASKED_RATIO)})" if is_ours(
                r["impl"]) else ""
            out.append(f"masked n={r['n']:<6d} B={r['batch']:<3d} {r['impl']}: masked/unmasked time {ratio:.2f}x{mine}")
    for r in _find(records, config="large"):
        if is_ours(r["impl"]) and r.get("mfu") is not None:
            out.append(
                f"large  n={r['n']:<6d} B={r['batch']:<3d} {r['impl']}: MFU {r['mfu']:.1%} "
                f"(target >= {TARGET_LARGE_MFU:.0%}: {_verdict(r['mfu'] >= TARGET_LARGE_MFU)})"
            )
    return out

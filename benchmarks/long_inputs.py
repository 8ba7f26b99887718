"""Long inputs on one device: inference and a training step of the seed configuration at batch 1 over very long
inputs, with `cross_attention_checkpointing` (and activation checkpointing for training).

    python benchmarks/long_inputs.py                       # GPU: 100M/200M-token inference, 100M-token training
    python benchmarks/long_inputs.py --smoke               # the same code at tiny sizes (a CPU runs it in seconds)

The input is `(1, n, 128)` in bf16 (the caller's data; the model keeps fp32 weights under bf16 autocast, and inputs
under autocast are not widened). Each record is the median of `--iters` runs after one warm-up run at the same size,
with the peak memory (`max_memory_allocated`, the input included) and the input's own size. Results go to
`<out-dir>/<YYYY-MM-DD>-<card>-long-inputs.json`; `--out-dir` defaults to `benchmarks/results/` for a full GPU run and
to a fresh temporary folder otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import RESULTS_DIR, SEED_SHAPE, card_name, slugify, write_json  # noqa: E402

from hf_flash_perceiver import PerceiverConfig, PerceiverModel  # noqa: E402


GIB = 2**30
SMOKE_SHAPE_KW = dict(input_dim=16, depth=2, num_latents=8, latent_dim=32, cross_heads=1, cross_head_dim=16,
                      latent_heads=2, latent_head_dim=16)


def build(shape: dict, training: bool, chunk_size: int, device: torch.device) -> PerceiverModel:
    config = PerceiverConfig(**shape, cross_attention_checkpointing=True, cross_attention_chunk_size=chunk_size)
    model = PerceiverModel(config).to(device)
    if training:
        # transformers >= 5.24 renamed the switch (the old name warns there); older 5.x only has the old one.
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    return model.train(training)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mode: str, n: int, shape: dict, args: argparse.Namespace, device: torch.device) -> dict:
    record = {"mode": mode, "n": n, "batch": 1, "input_gib": n * shape["input_dim"] * 2 / GIB}
    training = mode == "train"
    try:
        model = build(shape, training, args.chunk_size, device)
        x = torch.randn(1, n, shape["input_dim"], device=device, dtype=torch.bfloat16)

        def run() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if training:
                    model(x).last_hidden_state.float().mean().backward()
                    model.zero_grad(set_to_none=True)
                else:
                    with torch.no_grad():
                        model(x)

        run()  # warm-up
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            run()
            synchronize(device)
            times.append(time.perf_counter() - start)
        record["seconds"] = statistics.median(times)
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        record.update(seconds=None, peak_gib=None, oom=True)
    finally:
        model = x = None  # noqa: F841 - free before the next record
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infer", default=None, help="comma-separated token counts for inference")
    parser.add_argument("--train", default=None, help="comma-separated token counts for a training step")
    parser.add_argument("--iters", type=int, default=2, help="timed runs per record (median reported)")
    parser.add_argument("--chunk-size", type=int, default=131072, help="cross_attention_chunk_size (token rows)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape and lengths")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--out-dir", default=None, help="where the JSON goes")
    return parser.parse_args(argv)


def _ints(text: str | None, default: list[int]) -> list[int]:
    return default if text is None else [int(float(v)) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = SMOKE_SHAPE_KW if args.smoke else SEED_SHAPE.as_dict()
    infer = _ints(args.infer, [2048, 4096] if args.smoke else [100_000_000, 200_000_000])
    train = _ints(args.train, [2048] if args.smoke else [100_000_000])
    if args.out_dir is not None:
        out_dir = Path(args.out_dir)
    elif device.type == "cuda" and not args.smoke:
        out_dir = RESULTS_DIR
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="long-inputs-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    card = card_name(device)
    stem = f"{datetime.date.today().isoformat()}-{slugify(card)}-long-inputs{'-smoke' if args.smoke else ''}"
    payload = {"card": card, "torch": torch.__version__, "shape": shape, "chunk_size": args.chunk_size,
               "dtype": "bf16 input, fp32 weights, bf16 autocast", "records": []}
    path = out_dir / f"{stem}.json"
    for mode, ns in (("infer", infer), ("train", train)):
        for n in ns:
            record = measure(mode, n, shape, args, device)
            payload["records"].append(record)
            write_json(path, payload)
            peak = "-" if record.get("peak_gib") is None else f"{record['peak_gib']:.1f} GiB"
            secs = "OOM" if record.get("oom") else f"{record['seconds']:.2f} s"
            print(f"{mode:5s} n={n:>11,d}  {secs:>9s}  peak {peak}  (input {record['input_gib']:.1f} GiB)", flush=True)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

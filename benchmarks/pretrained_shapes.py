"""This package against transformers' own Perceiver classes at the shapes of the pretrained checkpoints, on the same
weights: transformers' model is built (random init) at the checkpoint's config, saved, and loaded into this package's
class through `from_pretrained` (the transformers-format conversion), so both run identical parameters.

    python benchmarks/pretrained_shapes.py                # both shapes on the GPU, batch 16
    python benchmarks/pretrained_shapes.py --smoke        # the same code on CPU at tiny shapes (no timing meaning)
    python benchmarks/pretrained_shapes.py --fused-branches   # also this package under the opt-in fused branches
    python benchmarks/pretrained_shapes.py --autocast-casts   # also with autocast converting each weight (A/B)
    python benchmarks/pretrained_shapes.py --compile      # also both compiled: torch.compile, and this package
                                                          # compiled with CUDA graphs (mode="reduce-overhead")
    python benchmarks/pretrained_shapes.py --profile language   # also a kernel profile of this package's step

Shapes (transformers' defaults / the Hub configs): `vision-learned` = deepmind/vision-perceiver-learned (224x224
pixels -> 50 176 inputs of width 512 through a 1x1 conv + learned positions, 512 latents x 1024, one cross-attention
with one 512-wide head, 8 x 6 self-attentions with shared weights, a 1024-wide single-head query decoder);
`language` = deepmind/language-perceiver (2 048 bytes, 256 latents x 1280, 26 self-attentions, the 2 048-query
masked-LM decoder). The checkpoints' own attention dropout (0.1) is kept: this is what fine-tuning runs.

Each record: a bf16-autocast training step (fp32 weights; zero_grad, forward with labels, the model's own loss,
backward; no optimizer step) and an inference forward (no_grad), medians of `--iters` after `--warmup`, CUDA events
around each step run alone (`train_ms`, synchronised before and after) and around steps run back to back as a training
loop runs them (`train_back_to_back_ms`, as `run.py` times: the host may issue a step while the last one runs),
with the peak memory of the training steps (warm-up included: for a compiled variant that is where the CUDA graphs
are recorded, the only step whose allocations the allocator sees), side by side in one process. `train_flops` is the
model FLOPs of one training step, counted by `torch.utils.flop_counter` on transformers' model at batch 1 (its
attention is plain matmuls, all of it counted; every op works per sample) times the batch: the same math for every
record, so each gains `train_tflops_per_s` and, on a GPU, `train_mfu` against the bf16 matmul ceiling measured in the
same run (`matmul_tflops`, as `run.py` does).
Results go to `<out-dir>/<YYYY-MM-DD>-<card>-pretrained-shapes.json` (`--out-dir` defaults to `benchmarks/results/`
on a GPU run, a temporary folder for `--smoke`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import (  # noqa: E402
    RESULTS_DIR,
    card_name,
    matmul_ceiling,
    profile_steps,
    slugify,
    step_stats,
    time_steps,
    write_json,
)


GIB = 2**30


def shapes(smoke: bool) -> dict:
    from transformers import PerceiverConfig

    if smoke:
        vision = PerceiverConfig(num_latents=8, d_latents=32, num_blocks=2, num_self_attends_per_block=2,
                                 num_self_attention_heads=4, num_cross_attention_heads=1, image_size=8, num_labels=10)
        language = PerceiverConfig(num_latents=8, d_latents=40, d_model=24, num_blocks=1, num_self_attends_per_block=2,
                                   num_self_attention_heads=4, num_cross_attention_heads=4, max_position_embeddings=32)
        return {"vision-learned": (vision, 8), "language": (language, 32)}
    # The Hub checkpoints' configs: vision-perceiver-learned sets these; language-perceiver is transformers' default.
    vision = PerceiverConfig(num_latents=512, d_latents=1024, num_blocks=8, num_self_attends_per_block=6,
                             num_self_attention_heads=8, num_cross_attention_heads=1, image_size=224, num_labels=1000)
    return {"vision-learned": (vision, 224), "language": (PerceiverConfig(), 2048)}


def build_pair(name: str, config, workdir: Path):
    import transformers

    import hf_flash_perceiver as hfp

    theirs_cls, ours_cls = {
        "vision-learned": (transformers.PerceiverForImageClassificationLearned, hfp.PerceiverForImageClassification),
        "language": (transformers.PerceiverForMaskedLM, hfp.PerceiverForMaskedLM),
    }[name]
    torch.manual_seed(0)
    theirs = theirs_cls(config)
    theirs.save_pretrained(workdir / name)
    ours = ours_cls.from_pretrained(workdir / name)
    return theirs, ours


def batch_for(name: str, size: int, batch: int, config, device) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(1)
    if name == "vision-learned":
        pixels = torch.randn(batch, 3, size, size, generator=g).to(device)
        labels = torch.randint(0, config.num_labels, (batch,), generator=g).to(device)
        return dict(inputs=pixels, labels=labels), dict(pixel_values=pixels, labels=labels)
    ids = torch.randint(0, config.vocab_size, (batch, size), generator=g).to(device)
    return dict(input_ids=ids, labels=ids), dict(input_ids=ids, labels=ids)


def train_step(model, kwargs: dict, device) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(device.type, torch.bfloat16):
        loss = model(**kwargs).loss
    loss.backward()


def measure(model, kwargs: dict, device, warmup: int, iters: int) -> dict:
    use_cuda = device.type == "cuda"
    no_labels = {k: v for k, v in kwargs.items() if k != "labels"}

    def train():
        train_step(model, kwargs, device)

    def infer():
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16):
            model(**no_labels)

    def timed(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if use_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    model.train()
    if use_cuda:
        # Before the warm-up: a CUDA-graph replay allocates nothing, so only the recording step (in the warm-up)
        # shows the allocator a compiled step's activations.
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    train_ms = timed(train)
    peak = torch.cuda.max_memory_allocated() / GIB if use_cuda else None
    # Steps back to back, as a training loop runs them (run.py's timing): no synchronisation between steps, so the
    # host issues a step while the device still runs the last one.
    back_to_back = statistics.median(time_steps(train, device, iters))
    train_stats = {f"train_{k}": v for k, v in step_stats(train, device, iters).items()}
    model.eval()
    return {"train_ms": train_ms, "train_back_to_back_ms": back_to_back, "train_peak_gib": peak, **train_stats,
            "infer_ms": timed(infer)}


def count_train_flops(model, kwargs: dict, device) -> int:
    """Model FLOPs of one training step of `model` on `kwargs` (`torch.utils.flop_counter`)."""
    from torch.utils.flop_counter import FlopCounterMode

    model.to(device).train()
    with FlopCounterMode(display=False) as counter:
        train_step(model, kwargs, device)
    model.zero_grad(set_to_none=True)
    model.to("cpu")
    return counter.get_total_flops()


def add_throughput(record: dict, matmul_tflops: float | None) -> None:
    """Each timed record's achieved TFLOP/s on the step's model FLOPs, and its MFU where a ceiling was measured."""
    for result in record.values():
        if isinstance(result, dict) and result.get("train_ms"):
            result["train_tflops_per_s"] = record["train_flops"] / (result["train_ms"] / 1e3) / 1e12
            result["train_mfu"] = None if matmul_tflops is None else result["train_tflops_per_s"] / matmul_tflops


def add_ratios(record: dict) -> None:
    """Each variant's training speedup over transformers' eager step (`<variant>_train_speedup`), and for this
    package's eager model the inference speedup and the peak-memory ratio as well."""
    ref = record.get("transformers", {})
    if "train_ms" not in ref:
        return
    for impl, result in list(record.items()):
        if not isinstance(result, dict) or impl == "transformers" or not result.get("train_ms"):
            continue
        if impl == "hf-flash-perceiver":
            record["train_speedup"] = ref["train_ms"] / result["train_ms"]
            if ref.get("train_back_to_back_ms") and result.get("train_back_to_back_ms"):
                record["train_back_to_back_speedup"] = ref["train_back_to_back_ms"] / result["train_back_to_back_ms"]
            record["infer_speedup"] = ref["infer_ms"] / result["infer_ms"]
            if result["train_peak_gib"]:
                record["train_memory_ratio"] = ref["train_peak_gib"] / result["train_peak_gib"]
        else:
            key = impl.removeprefix("hf-flash-perceiver+").replace("-", "_").replace("+", "_")
            record[f"{key}_train_speedup"] = ref["train_ms"] / result["train_ms"]
            if result.get("train_peak_gib"):
                record[f"{key}_train_memory_ratio"] = ref["train_peak_gib"] / result["train_peak_gib"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the harness)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (16; 2 with --smoke)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--shapes", default="vision-learned,language")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--fused-branches", action="store_true",
                        help="also time this package's model under fused_block.fused_branches(True) (the opt-in "
                             "fused residual branches), as the record's 'hf-flash-perceiver+fused-branches'")
    parser.add_argument("--autocast-casts", action="store_true",
                        help="also time this package's model with weight_cast.enabled = False (autocast converting "
                             "each weight and gradient on its own, the path before block-wise conversion), as the "
                             "record's 'hf-flash-perceiver+autocast-casts'")
    parser.add_argument("--no-encoder-graphs", action="store_true",
                        help="also time this package's model with encoder_graphs.enabled = False (the encoder run "
                             "eagerly every call, not replayed from CUDA graphs), as the record's "
                             "'hf-flash-perceiver+no-encoder-graphs'")
    parser.add_argument("--compile", action="store_true",
                        help="also time both models under torch.compile ('transformers+compile', "
                             "'hf-flash-perceiver+compile') and this package's with CUDA graphs "
                             "('hf-flash-perceiver+compile-cudagraphs', mode='reduce-overhead')")
    parser.add_argument("--profile", action="append", default=[], choices=("vision-learned", "language"),
                        help="also write a kernel profile of this package's training step at this shape (repeatable): "
                             "<out-dir>/<YYYY-MM-DD>-<card>-profile-pretrained-<shape>.txt")
    parser.add_argument("--skip", default="",
                        help="comma-separated records not to run (e.g. 'hf-flash-perceiver+compile' to save its "
                             "compilation time); ratios need the 'transformers' record")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    device = torch.device("cpu" if args.smoke else "cuda")
    batch = args.batch or (2 if args.smoke else 16)
    card = card_name(device)
    out_dir = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp(prefix="pretrained-")) if args.smoke
                                                       else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-{slugify(card)}"
    path = out_dir / f"{stem}-pretrained-shapes{'-smoke' if args.smoke else ''}.json"
    payload = {"card": card, "torch": torch.__version__, "batch": batch, "records": []}
    import transformers

    from hf_flash_perceiver import encoder_graphs, weight_cast
    from hf_flash_perceiver.fused_block import fused_branches

    payload["transformers"] = transformers.__version__
    # The MFU denominator, measured in this run; off the GPU there is no meaningful bf16 peak.
    payload["matmul_tflops"] = matmul_ceiling(device, 8192) if device.type == "cuda" else None
    workdir = Path(tempfile.mkdtemp(prefix="pretrained-weights-"))
    for name, (config, size) in shapes(args.smoke).items():
        if name not in args.shapes.split(","):
            continue
        theirs, ours = build_pair(name, config, workdir)
        kw_theirs, kw_ours = batch_for(name, size, batch, config, device)
        record = {"shape": name, "input_size": size,
                  "params_million": sum(p.numel() for p in ours.parameters()) / 1e6,
                  "train_flops": count_train_flops(theirs, batch_for(name, size, 1, config, device)[0], device) * batch}
        # (impl, model, inputs, fused branches, block-wise weight conversion, encoder CUDA graphs, torch.compile mode
        # or None)
        runs = [("transformers", theirs, kw_theirs, False, True, True, None),
                ("hf-flash-perceiver", ours, kw_ours, False, True, True, None)]
        if args.no_encoder_graphs:
            runs.append(("hf-flash-perceiver+no-encoder-graphs", ours, kw_ours, False, True, False, None))
        if args.fused_branches:
            runs.append(("hf-flash-perceiver+fused-branches", ours, kw_ours, True, True, True, None))
        if args.autocast_casts:
            runs.append(("hf-flash-perceiver+autocast-casts", ours, kw_ours, False, False, True, None))
        if args.compile:
            runs += [("transformers+compile", theirs, kw_theirs, False, True, True, "default"),
                     ("hf-flash-perceiver+compile", ours, kw_ours, False, True, True, "default"),
                     ("hf-flash-perceiver+compile-cudagraphs", ours, kw_ours, False, True, True, "reduce-overhead")]
        for impl, model, kwargs, fused, cast, graphs, mode in runs:
            if impl in args.skip.split(","):
                continue
            model.to(device)
            previous, weight_cast.enabled = weight_cast.enabled, cast
            previous_graphs, encoder_graphs.enabled = encoder_graphs.enabled, graphs
            try:
                with fused_branches(fused):
                    runner = model if mode is None else torch.compile(model, mode=mode)
                    record[impl] = measure(runner, kwargs, device, args.warmup, args.iters)
                    if impl == "hf-flash-perceiver" and name in args.profile:
                        runner.train()
                        written = out_dir / f"{stem}-profile-pretrained-{name}.txt"
                        written.write_text(profile_steps(lambda: train_step(runner, kwargs, device), device,
                                                         f"hf-flash-perceiver, pretrained shape {name}, batch {batch}"))
                        print(f"wrote {written}", flush=True)
            except Exception as exc:
                if mode is None:
                    raise
                # A compiler error in one compiled variant must not lose the eager records and the other variants.
                record[impl] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                print(f"{name} {impl} failed: {record[impl]['error']}", file=sys.stderr, flush=True)
            finally:
                weight_cast.enabled = previous
                encoder_graphs.enabled = previous_graphs
                # Each record's peak memory is its own: graphs captured for one record hold their memory until dropped.
                encoder_graphs.reset()
                runner = None
            # Under CUDA graphs the gradients live in the graphs' memory pool: drop them before moving the model.
            model.zero_grad(set_to_none=True)
            if mode is not None:
                torch._dynamo.reset()
            write_json(path, {**payload, "records": [*payload["records"], record]})  # a cut run keeps its records
            model.to("cpu")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        add_ratios(record)
        add_throughput(record, payload["matmul_tflops"])
        payload["records"].append(record)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in record.items()}, flush=True)
        write_json(path, payload)
        del theirs, ours
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

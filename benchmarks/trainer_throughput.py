"""Training throughput through `Trainer.train` itself: the default (eager) path and the `torch_compile=True` fast
path, side by side in one run.

    python benchmarks/trainer_throughput.py               # seed configuration, n = 4096, batch 128, on the GPU
    python benchmarks/trainer_throughput.py --smoke       # the same code on the CPU at tiny sizes (harness check)

A `PerceiverForSequenceClassification` of the seed configuration (depth 8 x (cross 1x64 + self 8x64), 256 latents x
256, input_dim 128, average pooling, 10 classes) trains on random features of `--n` tokens with random labels, as a
user's `Trainer` run does it: `bf16=True` autocast with fp32 weights, AdamW, gradient clipping at 1.0, the dataloader
(pinned memory, host-to-device copies of every batch) and the loss the model returns. The record is samples/s over
the steps after `--warmup` (the clock starts and stops with a device synchronisation), for each `--impls` entry --
`eager` (what `Trainer` runs by default: eager PyTorch, the encoder replayed from CUDA graphs once its calls repeat),
`eager_no_encoder_graphs` (the same with `hf_flash_perceiver.encoder_graphs.enabled = False`: every kernel launched
from Python), `torch_compile` (`TrainingArguments(torch_compile=True)`) and
`torch_compile_cudagraphs` (`torch_compile=True, torch_compile_mode="reduce-overhead"`: CUDA graphs too) -- and each
`--workers` count (`dataloader_num_workers`: 0 is Trainer's default, where the main process collates and pins every
batch between steps; 4 persistent workers prepare them alongside). Results go to
`<out-dir>/<YYYY-MM-DD>-<card>-trainer.json` (`benchmarks/results/` on a GPU run, a temporary folder for `--smoke`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run import RESULTS_DIR, SEED_SHAPE, card_name, slugify, write_json  # noqa: E402


SMOKE_SHAPE = dict(input_dim=16, depth=2, num_latents=8, latent_dim=32, cross_heads=1, cross_head_dim=16,
                   latent_heads=2, latent_head_dim=16)


class _Features(torch.utils.data.Dataset):
    """`size` random samples of `n` tokens (fixed seed), each with a class label."""

    def __init__(self, size: int, n: int, width: int, num_labels: int):
        g = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(size, n, width, generator=g)
        self.labels = torch.randint(0, num_labels, (size,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.inputs[i], "labels": self.labels[i]}


def _clock(use_cuda: bool, warmup: int):
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time from the end of step `warmup` to the end of the last step, synchronised at both ends."""

        start = end = None
        steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup or state.global_step == state.max_steps:
                if use_cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                if state.global_step == warmup:
                    self.start = now
                else:
                    self.end, self.steps = now, state.global_step - warmup

    return Clock()


# impl -> TrainingArguments.torch_compile_mode (None: torch.compile's default) for the compiled impls.
COMPILE_MODES = {"torch_compile": None, "torch_compile_cudagraphs": "reduce-overhead"}
EAGER = ("eager", "eager_no_encoder_graphs")


def run_one(impl: str, workers: int, args, device: torch.device, workdir: Path) -> dict:
    from transformers import Trainer, TrainingArguments

    from hf_flash_perceiver import PerceiverConfig, PerceiverForSequenceClassification, encoder_graphs

    shape = SMOKE_SHAPE if args.smoke else SEED_SHAPE.as_dict()
    torch.manual_seed(0)
    model = PerceiverForSequenceClassification(PerceiverConfig(**shape, num_labels=10))
    data = _Features(args.batch * 4, args.n, shape["input_dim"], 10)
    use_cuda = device.type == "cuda"
    training = TrainingArguments(
        output_dir=str(workdir / f"{impl}-{workers}"), per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        learning_rate=1e-4, max_grad_norm=1.0, bf16=use_cuda, torch_compile=impl in COMPILE_MODES,
        torch_compile_mode=COMPILE_MODES.get(impl),
        use_cpu=not use_cuda, dataloader_pin_memory=use_cuda, dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0, logging_steps=10**6, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=0,
    )
    clock = _clock(use_cuda, args.warmup)
    trainer = Trainer(model=model, args=training, train_dataset=data, callbacks=[clock])
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    previous, encoder_graphs.enabled = encoder_graphs.enabled, impl != "eager_no_encoder_graphs"
    try:
        trainer.train()
    finally:
        encoder_graphs.enabled = previous
        encoder_graphs.reset()
    seconds = clock.end - clock.start
    record = {
        "impl": impl, "workers": workers, "n": args.n, "batch": args.batch, "steps_timed": clock.steps,
        "samples_per_s": clock.steps * args.batch / seconds, "step_ms": seconds / clock.steps * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if use_cuda else None,
    }
    del trainer, model
    gc.collect()
    if use_cuda:
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the harness)")
    parser.add_argument("--impls", default=None,
                        help="comma-separated, of eager,eager_no_encoder_graphs,torch_compile,"
                             "torch_compile_cudagraphs (default: all; smoke: eager)")
    parser.add_argument("--workers", default=None, help="comma-separated dataloader workers (0,4; smoke: 0)")
    parser.add_argument("--n", type=int, default=None, help="tokens per sample (4096; 32 with --smoke)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (128; 4 with --smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (10; 1 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (40; 2 with --smoke)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    small = args.smoke
    args.n = args.n or (32 if small else 4096)
    args.batch = args.batch or (4 if small else 128)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 10)
    args.steps = args.steps or (2 if small else 40)
    default = "eager" if small else ",".join([*EAGER, *COMPILE_MODES])
    impls = (args.impls or default).split(",")
    unknown = [impl for impl in impls if impl not in EAGER and impl not in COMPILE_MODES]
    if unknown:
        parser.error(f"unknown --impls {unknown}; expected of {[*EAGER, *COMPILE_MODES]}")
    workers = [int(w) for w in (args.workers or ("0" if small else "0,4")).split(",")]
    device = torch.device("cpu" if small else "cuda")
    card = card_name(device)
    out_dir = Path(args.out_dir) if args.out_dir else (Path(tempfile.mkdtemp(prefix="trainer-")) if small
                                                       else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{datetime.date.today().isoformat()}-{slugify(card)}-trainer{'-smoke' if small else ''}.json"
    payload = {"card": card, "torch": torch.__version__, "config": "smoke" if small else "seed", "records": []}
    workdir = Path(tempfile.mkdtemp(prefix="trainer-runs-"))
    for count in workers:
        for impl in impls:
            record = run_one(impl, count, args, device, workdir)
            payload["records"].append(record)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in record.items()}, flush=True)
            write_json(path, payload)
    for record in payload["records"]:
        eager = next((r for r in payload["records"] if r["impl"] == "eager" and r["workers"] == record["workers"]),
                     None)
        if eager is not None:
            record["vs_eager"] = record["samples_per_s"] / eager["samples_per_s"]
    write_json(path, payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()

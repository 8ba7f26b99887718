"""Perceiver IO dense regression with `Trainer`: read a 1-D signal at scattered points, predict it at new ones.

    python examples/train_io_regression.py configs/io_signal.yaml [key=value ...]

Every sample is a random sum of two sinusoids on [0, 1]. The model reads it at 24-48 random points (inputs: Fourier
features of the position plus the value; padded with `attention_mask`) and is queried at 16-32 other points (queries:
Fourier features of the position; padded with `query_mask`) for the values there: [`PerceiverIOForRegression`], MSE
at the real queries only. The data is synthetic and generated from a seed: nothing is downloaded.

After training the script reports the test MSE and R^2 (1 - MSE / variance of the targets: 0 for predicting the
mean, 1 for exact), saves the model with `register_for_auto_class()` (so the folder carries its code and loads with
`AutoModel.from_pretrained(..., trust_remote_code=True)` where the package is not installed), reloads it and checks
that the weights are bit-equal and the predictions equal within fp32 rounding. It exits non-zero when R^2 ends below
`min_test_r2` or the reload check fails. Under `torchrun` (DDP, or FSDP2 with `fsdp="full_shard auto_wrap"`) only the
first process saves, checks the reload and reports; the others exit with its status.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from example_args import (
    RuntimeArguments,
    is_main_process,
    parse_config,
    reload_check,
    report,
    shared_status,
    trained_weights,
)

from hf_flash_perceiver import PerceiverConfig, PerceiverIOForRegression
from hf_flash_perceiver.input_adapters import fourier_features


@dataclass
class ModelArguments:
    """The Perceiver IO model: see `PerceiverConfig` for each field."""

    depth: int = 1
    self_per_cross_attn: int = 2
    num_latents: int = 32
    latent_dim: int = 64
    cross_heads: int = 4
    cross_head_dim: int = 16
    latent_heads: int = 4
    latent_head_dim: int = 16
    query_heads: int = 4
    query_head_dim: int = 16


@dataclass
class DataArguments:
    """The synthetic signals."""

    num_bands: int = field(default=16, metadata={"help": "Fourier bands of the position features."})
    num_components: int = field(default=2, metadata={"help": "Sinusoids per signal."})
    max_frequency: float = field(default=2.0, metadata={"help": "Highest sinusoid frequency (periods on [0, 1])."})
    min_input_points: int = 24
    max_input_points: int = 48
    min_query_points: int = 16
    max_query_points: int = 32
    train_samples: int = 4096
    test_samples: int = 512
    signal_seed: int = 0
    min_test_r2: float | None = field(default=None, metadata={"help": "Exit with status 1 below this test R^2."})


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, RuntimeArguments, TrainingArguments]:
    return parse_config((ModelArguments, DataArguments, RuntimeArguments, TrainingArguments), argv)


class SignalDataset(torch.utils.data.Dataset):
    """Random sums of sinusoids, read at scattered points and queried at others (generated once from `seed`)."""

    def __init__(self, args: DataArguments, num_samples: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        k = args.num_components
        self.amplitudes = torch.rand(num_samples, k, generator=g) * 0.5 + 0.5
        self.frequencies = torch.rand(num_samples, k, generator=g) * (args.max_frequency - 0.5) + 0.5
        self.phases = torch.rand(num_samples, k, generator=g) * 2 * math.pi
        self.num_inputs = torch.randint(args.min_input_points, args.max_input_points + 1, (num_samples,), generator=g)
        self.num_queries = torch.randint(args.min_query_points, args.max_query_points + 1, (num_samples,), generator=g)
        self.input_t = torch.rand(num_samples, args.max_input_points, generator=g)
        self.query_t = torch.rand(num_samples, args.max_query_points, generator=g)
        # Frequencies up to max_frequency periods on [0, 1]: sampling [-1, 1] at 8x that rate resolves them.
        self.resolution = (8 * args.max_frequency,)
        self.num_bands = args.num_bands

    def signal(self, i: int, t: torch.Tensor) -> torch.Tensor:
        waves = self.amplitudes[i] * torch.sin(2 * math.pi * self.frequencies[i] * t[:, None] + self.phases[i])
        return waves.sum(-1) / math.sqrt(self.amplitudes.shape[1])

    def position_features(self, t: torch.Tensor) -> torch.Tensor:
        return fourier_features((2 * t - 1)[:, None], self.num_bands, self.resolution)

    def __len__(self) -> int:
        return len(self.amplitudes)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t_in = self.input_t[i, : self.num_inputs[i]]
        t_q = self.query_t[i, : self.num_queries[i]]
        inputs = torch.cat([self.position_features(t_in), self.signal(i, t_in)[:, None]], dim=-1)
        return {"inputs": inputs, "queries": self.position_features(t_q), "labels": self.signal(i, t_q)[:, None]}


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the longest inputs/queries of the batch, with `attention_mask`/`query_mask` marking the real ones.

    Targets at padded queries are -100: the model ignores them anyway (query_mask), and `Trainer` counts label
    entries that are not -100 as the items its loss is averaged over under gradient accumulation.
    """

    def pad(key: str, value: float) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = [item[key] for item in items]
        longest = max(t.shape[0] for t in tensors)
        out = torch.full((len(tensors), longest, tensors[0].shape[-1]), value)
        mask = torch.zeros(len(tensors), longest, dtype=torch.long)
        for j, t in enumerate(tensors):
            out[j, : t.shape[0]] = t
            mask[j, : t.shape[0]] = 1
        return out, mask

    inputs, attention_mask = pad("inputs", 0.0)
    queries, query_mask = pad("queries", 0.0)
    labels, _ = pad("labels", -100.0)
    return {"inputs": inputs, "attention_mask": attention_mask, "queries": queries, "query_mask": query_mask,
            "labels": labels}


def compute_metrics(eval_pred) -> dict[str, float]:
    predictions, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    valid = labels != -100  # padded queries (and Trainer's own padding across batches)
    error = ((predictions - labels)[valid] ** 2).mean()
    return {"mse": float(error), "r2": float(1.0 - error / labels[valid].var())}


def main(argv: list[str]) -> int:
    model_args, data_args, runtime_args, training_args = parse_arguments(argv)
    runtime_args.apply(training_args)
    start = time.perf_counter()
    train_set = SignalDataset(data_args, data_args.train_samples, data_args.signal_seed)
    test_set = SignalDataset(data_args, data_args.test_samples, data_args.signal_seed + 1)
    example = train_set[0]

    config = PerceiverConfig(
        input_dim=example["inputs"].shape[-1],
        query_dim=example["queries"].shape[-1],
        output_dim=1,
        **vars(model_args),
    )
    torch.manual_seed(training_args.seed)
    model = PerceiverIOForRegression(config)
    main_process = is_main_process(training_args)
    if main_process:
        print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{len(train_set)} train / {len(test_set)} test signals")

    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=test_set, data_collator=collate,
        compute_metrics=compute_metrics,
    )
    # `resume_from_checkpoint=PATH` (a TrainingArguments field) continues from a checkpoint folder.
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    # Only the logits are predictions: the encoder's latents (also in the output) need not be gathered.
    metrics = trainer.evaluate(test_set, ignore_keys=["last_hidden_state"], metric_key_prefix="test")

    # Saved with its code and a complete auto_map, so that where hf_flash_perceiver is not installed,
    # AutoModel.from_pretrained(folder, trust_remote_code=True) gives this IO model. Here the package is imported,
    # and its registered AutoModel (the encoder) would take precedence: reload by class.
    # Under torchrun every process calls save_model (under FSDP it gathers the shards); the main one writes. The class
    # is named, not type(model): FSDP2 swaps the model's class for a wrapper subclass (FSDP<Name>).
    output_dir = Path(training_args.output_dir)
    PerceiverIOForRegression.register_for_auto_class()
    trainer.save_model(output_dir)
    # What the reload is checked against, on every process: under FSDP gathering the weights and the forward are
    # collective calls. The other processes then wait for the main one's checks and exit with its status.
    model = trainer.model.eval()
    weights = trained_weights(model)
    batch = collate([test_set[i] for i in range(8)])
    batch.pop("labels")
    with torch.no_grad():
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(**batch).logits
    if not main_process:
        return shared_status(trainer, None)
    reloaded = PerceiverIOForRegression.from_pretrained(output_dir).eval()
    # The card from the reloaded model: the same class and config, never FSDP's wrapper.
    (output_dir / "README.md").write_text(reloaded.model_card(output_dir.name), encoding="utf-8")
    reloaded.to(model.device)
    with torch.no_grad():
        reload = reload_check(weights, reloaded, logits, reloaded(**batch).logits)

    summary = {
        "test_mse": round(metrics["test_mse"], 5),
        "test_r2": round(metrics["test_r2"], 4),
        "reloaded_weights_identical": reload["weights_identical"],
        "reloaded_logits_max_abs_diff": reload["logits_max_abs_diff"],
        "train_loss": round(train_result.training_loss, 5),
        "train_seconds": round(train_result.metrics["train_runtime"], 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "saved_to": str(output_dir),
    }
    return shared_status(trainer, report(summary, "test_r2", data_args.min_test_r2, reload))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Shared by the Trainer, compile and CUDA test modules: heads with a few examples they can overfit, and Trainer
arguments for quick CPU runs."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from hf_flash_perceiver import (
    PerceiverConfig,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverIOForRegression,
)

import heads_common


def tiny(**kw) -> PerceiverConfig:
    return heads_common.tiny(**{"depth": 1, "patch_size": 4, "num_fourier_bands": 2, "max_position_embeddings": 12, **kw})


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_case(kind: str, n: int = 8, seed: int = 0):
    """A head and `n` examples it can overfit."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if kind == "sequence":
        model = PerceiverForSequenceClassification(tiny(input_dim=5, num_labels=3))
        items = [{"inputs": torch.randn(6, 5, generator=g), "labels": torch.tensor(i % 3)} for i in range(n)]
    elif kind == "image":
        model = PerceiverForImageClassification(tiny(num_labels=4))
        items = [{"pixel_values": torch.randn(3, 8, 8, generator=g), "labels": torch.tensor(i % 4)} for i in range(n)]
    elif kind == "masked_lm":
        model = PerceiverForMaskedLM(tiny())
        items = []
        for i in range(n):
            ids = torch.randint(6, 262, (12,), generator=g)
            labels = torch.full_like(ids, -100)
            picked = torch.arange(12) % (2 + i % 3) == 0  # 6, 4 or 3 labelled positions: uneven micro-batches
            labels[picked] = ids[picked]
            ids = ids.masked_fill(picked, 3)  # [MASK]
            mask = torch.ones(12, dtype=torch.long)
            items.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    elif kind == "io_regression":
        model = PerceiverIOForRegression(tiny(input_dim=3, query_dim=4, output_dim=2))
        items = []
        for i in range(n):
            query_mask = torch.ones(5, dtype=torch.long)
            query_mask[5 - i % 3:] = 0
            inputs, queries = torch.randn(7, 3, generator=g), torch.randn(5, 4, generator=g)
            # A target that needs both sides: the query's own features and a summary of the inputs.
            labels = queries[:, :2] + inputs.mean(0)[:2]
            items.append({"inputs": inputs, "queries": queries, "query_mask": query_mask,
                          "labels": labels.masked_fill(query_mask[:, None] == 0, -100.0)})
    else:
        raise ValueError(kind)
    return model, ListDataset(items)


def args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=3e-3, max_steps=30, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        warmup_steps=0, lr_scheduler_type="constant",
    )
    base.update(kw)
    return TrainingArguments(**base)


def logged_losses(trainer: Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

"""Fine-tune a Perceiver image classifier with `Trainer` on scikit-learn's bundled 8x8 digits (no download).

    python examples/train_classification.py configs/digits.yaml [key=value ...]

The YAML file holds the fields of `ModelArguments`, `DataArguments`, `RuntimeArguments` and `TrainingArguments`
(see example_args.py); `key=value` arguments after it override single fields (`num_train_epochs=1`). The script
trains, evaluates on the held-out test split with `compute_metrics`, saves the model with its code
(`register_for_auto_class()`), its image processor and a model card, reloads it with
`AutoModelForImageClassification`, checks the reloaded weights are bit-equal and its logits equal within fp32
rounding, and classifies held-out images with `pipeline("image-classification")`. It exits non-zero when the test
accuracy is below `min_test_accuracy` or the reload check fails.

`torchrun --nproc_per_node N examples/train_classification.py ...` trains data-parallel (DDP; FSDP2 with the
override `fsdp="full_shard auto_wrap"`): every process trains and evaluates, the first one alone saves, checks the
reload, runs the pipeline and prints the summary, and the others exit with its status.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import (
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
    ViTImageProcessorPil,
    pipeline,
)

from example_args import (
    RuntimeArguments,
    is_main_process,
    parse_config,
    reload_check,
    report,
    shared_status,
    trained_weights,
)

from hf_flash_perceiver import PerceiverConfig, PerceiverForImageClassification


@dataclass
class ModelArguments:
    """The Perceiver: see `PerceiverConfig` for each field."""

    depth: int = 2
    self_per_cross_attn: int = 2
    num_latents: int = 32
    latent_dim: int = 64
    cross_heads: int = 1
    cross_head_dim: int = 32
    latent_heads: int = 4
    latent_head_dim: int = 16
    patch_size: int = 1
    num_fourier_bands: int = 4
    pooling: str = "average"
    classifier_dropout: float = 0.0
    attn_implementation: str = "sdpa"


@dataclass
class DataArguments:
    """The embedded data set and the checks at the end."""

    test_size: float = field(default=0.2, metadata={"help": "Fraction of the 1 797 digits held out for the test."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the stratified train/test split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on this many (quick runs)."})
    min_test_accuracy: float | None = field(
        default=None, metadata={"help": "Exit with status 1 when the test accuracy ends below this."}
    )


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, RuntimeArguments, TrainingArguments]:
    return parse_config((ModelArguments, DataArguments, RuntimeArguments, TrainingArguments), argv)


def digits_images() -> tuple[list[Image.Image], np.ndarray]:
    """The 8x8 digits as RGB PIL images (what an image pipeline hands the processor) and their labels."""
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 intensities to 8-bit gray
    return [Image.fromarray(p, mode="L").convert("RGB") for p in pixels], digits.target


class ImageDataset(torch.utils.data.Dataset):
    """Images run through the image processor once; items are the dicts `Trainer` feeds the model."""

    def __init__(self, images: list[Image.Image], labels: np.ndarray, processor: ViTImageProcessorPil):
        self.pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv: list[str]) -> int:
    model_args, data_args, runtime_args, training_args = parse_arguments(argv)
    runtime_args.apply(training_args)
    start = time.perf_counter()

    images, labels = digits_images()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=data_args.test_size, stratify=labels, random_state=data_args.split_seed
    )
    if data_args.max_train_samples is not None:
        train_idx = train_idx[: data_args.max_train_samples]
    # The processor is saved with the model, so the pipeline later preprocesses exactly as training did:
    # 8x8 RGB, scaled to [0, 1] and normalised to [-1, 1].
    # The PIL backend, named explicitly: `ViTImageProcessor` wants torchvision (not a dependency) and warns when it
    # falls back to this one.
    processor = ViTImageProcessorPil(
        size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True
    )
    train_set = ImageDataset([images[i] for i in train_idx], labels[train_idx], processor)
    test_set = ImageDataset([images[i] for i in test_idx], labels[test_idx], processor)

    config = PerceiverConfig(
        num_channels=3,
        image_size=8,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
        **{k: v for k, v in vars(model_args).items() if k != "attn_implementation"},
    )
    torch.manual_seed(training_args.seed)
    model = PerceiverForImageClassification._from_config(config, attn_implementation=model_args.attn_implementation)
    main_process = is_main_process(training_args)
    if main_process:
        print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters; "
              f"{len(train_set)} train / {len(test_set)} test images")

    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=test_set,
        compute_metrics=compute_metrics,
    )
    # `resume_from_checkpoint=PATH` (a TrainingArguments field) continues from a checkpoint folder.
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate(test_set, metric_key_prefix="test")

    # Saved with its modeling code and a complete auto_map (register_for_auto_class), so that the folder also loads
    # where hf_flash_perceiver is not installed, with trust_remote_code=True -- as its model card says.
    # Under torchrun every process calls save_model (under FSDP it gathers the shards); the main one writes. The class
    # is named, not type(model): FSDP2 swaps the model's class for a wrapper subclass (FSDP<Name>).
    output_dir = Path(training_args.output_dir)
    PerceiverForImageClassification.register_for_auto_class()
    trainer.save_model(output_dir)
    # What the reload is checked against, on every process: under FSDP gathering the weights and the forward are
    # collective calls. The other processes then wait for the main one's checks and exit with its status.
    model = trainer.model.eval()
    weights = trained_weights(model)
    with torch.no_grad():
        sample = test_set.pixel_values[:64].to(model.device)
        logits = model(sample).logits
    if not main_process:
        return shared_status(trainer, None)
    processor.save_pretrained(output_dir)

    # Reload through the Auto class (registered by importing hf_flash_perceiver, which takes precedence over the
    # saved code) and classify held-out images with the pipeline, which reads the saved processor. The reloaded
    # weights must be bit-equal, its logits equal within fp32 rounding (see example_args.reload_check).
    reloaded = AutoModelForImageClassification.from_pretrained(output_dir).eval().to(model.device)
    # The card from the reloaded model: the same class and config, never FSDP's wrapper.
    (output_dir / "README.md").write_text(reloaded.model_card(output_dir.name), encoding="utf-8")
    with torch.no_grad():
        reload = reload_check(weights, reloaded, logits, reloaded(sample).logits)
    classifier = pipeline("image-classification", model=str(output_dir))
    test_images = [images[i] for i in test_idx]
    first = classifier(test_images[0], top_k=3)
    predictions = classifier(test_images, top_k=1, batch_size=64)
    pipeline_accuracy = float(np.mean([int(p[0]["label"]) == y for p, y in zip(predictions, labels[test_idx])]))

    summary = {
        "test_accuracy": round(metrics["test_accuracy"], 4),
        "test_loss": round(metrics["test_loss"], 4),
        "pipeline_test_accuracy": round(pipeline_accuracy, 4),
        "reloaded_weights_identical": reload["weights_identical"],
        "reloaded_logits_max_abs_diff": reload["logits_max_abs_diff"],
        "held_out_image": {"true_label": int(labels[test_idx[0]]), "pipeline_top3": first},
        "train_loss": round(train_result.training_loss, 4),
        "train_seconds": round(train_result.metrics["train_runtime"], 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "saved_to": str(output_dir),
    }
    return shared_status(trainer, report(summary, "test_accuracy", data_args.min_test_accuracy, reload))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

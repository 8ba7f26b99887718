"""Every head under `Trainer` on CPU: tiny overfit runs, compute_metrics, gradient checkpointing, gradient
accumulation, PEFT LoRA, and the examples end to end on a few steps."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_flash_perceiver import PerceiverIOForRegression

from heads_common import assert_close_outputs, assert_same_weights
from trainer_common import args, logged_losses, make_case


ROOT = Path(__file__).resolve().parents[1]


HEAD_KINDS = ["sequence", "image", "masked_lm", "io_regression"]


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_trainer_overfits_every_head(tmp_path, kind):
    model, data = make_case(kind)
    trainer = Trainer(model=model, args=args(tmp_path, learning_rate=1e-2), train_dataset=data)
    assert trainer.model_accepts_loss_kwargs  # num_items_in_batch reaches the loss
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_compute_metrics_path(tmp_path):
    model, data = make_case("image")

    def compute_metrics(eval_pred):
        return {"accuracy": float((eval_pred.predictions.argmax(-1) == eval_pred.label_ids).mean())}

    trainer = Trainer(model=model, args=args(tmp_path, max_steps=5, per_device_eval_batch_size=3),
                      train_dataset=data, eval_dataset=data, compute_metrics=compute_metrics)
    trainer.train()
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        logits = model(torch.stack([item["pixel_values"] for item in data.items])).logits
    labels = torch.stack([item["labels"] for item in data.items])
    assert metrics["eval_accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    assert math.isfinite(metrics["eval_loss"])


# transformers 5.24 renamed the switch (the old name still works, with a deprecation warning); 5.17 has the old one.
CHECKPOINTING_ARG = (
    "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


@pytest.mark.parametrize("kind", ["image", "masked_lm"])
def test_gradient_checkpointing_under_trainer(tmp_path, kind):
    runs = {}
    for checkpointing in (False, True):
        model, data = make_case(kind)
        trainer = Trainer(model=model, args=args(tmp_path, max_steps=6, **{CHECKPOINTING_ARG: checkpointing}),
                          train_dataset=data)
        trainer.train()
        blocks = [m for m in model.modules() if type(m).__name__ == "PerceiverBlock"]
        assert all(b.gradient_checkpointing == checkpointing for b in blocks) and blocks
        runs[checkpointing] = (logged_losses(trainer), [p.detach().clone() for p in model.parameters()])
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for a, b in zip(runs[True][1], runs[False][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["masked_lm", "io_regression", "sequence"])
def test_gradient_accumulation_matches_full_batch(tmp_path, kind):
    params = {}
    for run, (batch_size, accumulation) in {"full": (8, 1), "accumulated": (4, 2), "naive": (4, 2)}.items():
        model, data = make_case(kind)
        if run == "naive":
            # Control: a model that ignores num_items_in_batch (Trainer then averages the micro-batch means).
            model.accepts_loss_kwargs = False
        if kind == "sequence":
            for item, label in zip(data.items, [0, 1, -100, -100, 2, -100, 1, 0]):
                item["labels"] = torch.tensor(label)
        trainer = Trainer(
            model=model,
            args=args(tmp_path, max_steps=1, optim="sgd", learning_rate=0.5, per_device_train_batch_size=batch_size,
                      gradient_accumulation_steps=accumulation, max_grad_norm=0.0),
            train_dataset=data,
        )
        assert trainer.model_accepts_loss_kwargs == (run != "naive")
        trainer.train()
        params[run] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, full in params["full"].items():
        torch.testing.assert_close(params["accumulated"][name], full, atol=1e-6, rtol=1e-5, msg=name)
    assert any(not torch.allclose(params["naive"][n], full, atol=1e-6, rtol=1e-5) for n, full in params["full"].items())


INPUT_SIDE_ADAPTERS = {
    "lora-kv_proj": (True, "kv_proj", dict(target_modules=["kv_proj"])),
    "lora-kv_proj-no-input-norm": (False, "kv_proj", dict(target_modules=["kv_proj"])),
    "saved-context_norm": (True, "context_norm", dict(target_modules=["q_proj"], modules_to_save=["context_norm"])),
}


@pytest.mark.parametrize("case", INPUT_SIDE_ADAPTERS)
def test_peft_adapters_on_the_input_side_are_used(case):
    """A LoRA adapter on `kv_proj`, or a trained copy of `context_norm` (`modules_to_save`), changes the output and
    gets gradients. Both are applied as the modules they are, not through the plain modules' weights (the input
    norm's affine folded into `kv_proj`'s, which they would bypass); the chunked cross-attention, which computes from
    those weights, refuses them instead of ignoring them."""
    peft = pytest.importorskip("peft")  # in the `test` extra
    from hf_flash_perceiver import PerceiverConfig, PerceiverModel

    input_norm, wrapped_name, adapter = INPUT_SIDE_ADAPTERS[case]
    torch.manual_seed(0)
    config = PerceiverConfig(input_dim=6, depth=2, num_latents=4, latent_dim=16, cross_heads=1, cross_head_dim=8,
                             latent_heads=2, latent_head_dim=8, cross_input_norm=input_norm)
    model = PerceiverModel(config)
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        before = model(x).last_hidden_state
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, init_lora_weights=False, **adapter))
    with torch.no_grad():  # a saved copy starts equal to the frozen original: move it away
        for name, p in wrapped.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.5)
    out = wrapped(x).last_hidden_state
    assert not torch.allclose(out, before, atol=1e-4)
    out.square().mean().backward()
    trained = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad and wrapped_name in n]
    assert len(trained) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trained), trained
    chunked = PerceiverModel(PerceiverConfig(**{**config.to_diff_dict(), "cross_attention_checkpointing": True}))
    chunked = peft.get_peft_model(chunked, peft.LoraConfig(r=2, **adapter))
    with pytest.raises(ValueError, match=wrapped_name):
        chunked(x)


def test_peft_lora_trains_saves_and_loads(tmp_path):
    peft = pytest.importorskip("peft")  # in the `test` extra
    model, data = make_case("image")
    base_state = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "kv_proj", "qkv_proj", "o_proj", "fc1", "fc2"],
        modules_to_save=["head"],
    )
    peft_model = peft.get_peft_model(model, lora)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("qkv_proj.lora_A" in n for n in trainable) and any("fc2.lora_B" in n for n in trainable)
    trainer = Trainer(model=peft_model, args=args(tmp_path / "run", learning_rate=1e-2), train_dataset=data)
    trainer.train()
    losses = logged_losses(trainer)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    # The frozen base weights did not move.
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" not in name and "modules_to_save" not in name and "original_module" not in name:
            clean = name.replace(".base_layer", "")
            assert torch.equal(p, base_state[clean]), name

    peft_model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    peft_model.eval()
    x = torch.stack([item["pixel_values"] for item in data.items])
    with torch.no_grad():
        expected = peft_model(pixel_values=x).logits
    fresh, _ = make_case("image")  # same seed: the same base weights
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    # Bit-equal weights (base and adapter), outputs within fp32 rounding (see heads_common).
    assert_same_weights(loaded, peft_model)
    with torch.no_grad():
        assert_close_outputs(loaded(pixel_values=x).logits, expected)


def _load_example(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))  # as `python examples/<name>.py` has it: example_args
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def example_side_effects():
    """The examples set torch's thread count and register a class for its Auto class: undo both afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    PerceiverIOForRegression._auto_class = None


def _summary(printed: str) -> dict:
    return json.loads(printed[printed.index("{\n"): printed.rindex("}") + 1])


def test_classification_example_end_to_end(tmp_path, capsys, monkeypatch, example_side_effects):
    example = _load_example("train_classification", monkeypatch)
    # Two steps cannot reach the accuracy asked for: the run must say so and exit 1, after saving and reloading.
    status = example.main([
        str(ROOT / "configs" / "digits.yaml"), "max_steps=2", f"output_dir={tmp_path}", "min_test_accuracy=1.01",
        "disable_tqdm=true",
    ])
    printed = capsys.readouterr().out
    summary = _summary(printed)
    assert status == 1 and "FAILED: test_accuracy" in printed
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (tmp_path / name).exists(), name
    # The reload check passed (bit-equal weights, logits within fp32 rounding): only the accuracy failed.
    assert summary["reloaded_weights_identical"] is True and "FAILED: reloaded" not in printed
    assert isinstance(summary["reloaded_logits_max_abs_diff"], float)
    # The pipeline (saved processor + reloaded model) classifies the test images as Trainer's evaluation did.
    assert summary["pipeline_test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-3)
    assert summary["held_out_image"]["pipeline_top3"][0]["label"] in [str(i) for i in range(10)]


def test_io_example_end_to_end(tmp_path, capsys, monkeypatch, example_side_effects):
    example = _load_example("train_io_regression", monkeypatch)
    status = example.main([
        str(ROOT / "configs" / "io_signal.yaml"), "max_steps=5", "train_samples=64", "test_samples=16",
        f"output_dir={tmp_path}", "min_test_r2=null", "disable_tqdm=true",
    ])
    summary = _summary(capsys.readouterr().out)
    # status 0: the reload check passed (bit-equal weights, logits within fp32 rounding); no R^2 gate here
    assert status == 0 and summary["reloaded_weights_identical"] is True
    assert isinstance(summary["reloaded_logits_max_abs_diff"], float)
    assert math.isfinite(summary["test_mse"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModel"] == "modeling_perceiver.PerceiverIOForRegression"

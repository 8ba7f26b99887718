"""Data-parallel training on CPU: 2 processes (`torchrun`, gloo, 127.0.0.1) under DDP and FSDP2 take the same step
as one process on the whole batch; an FSDP2 save loads on one process; the classification example under `torchrun`
trains, saves and reports once. The CUDA counterparts (nccl, Trainer under FSDP2, resuming) are in
tests/test_multi_gpu.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_flash_perceiver import (
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverIOForRegression,
    PerceiverIOModel,
    PerceiverModel,
)

import distributed_common
from distributed_common import CASES, ROOT, single_process_step, torchrun
from heads_common import tiny


# Two processes and one differ only in how the batch mean is summed (two half-batch means averaged by the gradient
# all-reduce, against one mean): a few fp32 ulps on the gradients, times the learning rate. Measured here: at most
# 6e-8 on the weights; a real difference (the control below: half the batch) moves them by 0.2 or more.
STEP_ATOL = 1e-6
STEP_RTOL = 1e-5


@pytest.fixture(scope="module")
def distributed_steps(tmp_path_factory) -> Path:
    """Every case under DDP and under FSDP2, in one 2-process launch (start-up dominates the time)."""
    out = tmp_path_factory.mktemp("steps")
    runs = [f"{mode}:{case}" for mode in ("ddp", "fsdp2") for case in CASES]
    done = torchrun([str(ROOT / "tests" / "distributed_common.py"), str(out), *runs], cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def assert_matches_one_process(result: dict, case: str) -> None:
    expected = single_process_step(case)
    assert len(result["per_rank"]) == 2
    for rank, state in enumerate(result["per_rank"]):
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, atol=STEP_ATOL, rtol=STEP_RTOL,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
    # Control: the step on rank 0's half alone lands elsewhere, so the comparison above can fail.
    half = single_process_step(case, first_rank_only=True)
    assert max((half[n] - expected[n]).abs().max().item() for n in expected) > 100 * STEP_ATOL


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_step_equals_one_process(distributed_steps, case):
    assert_matches_one_process(torch.load(distributed_steps / f"ddp_{case}.pt", weights_only=False), case)


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_step_equals_one_process(distributed_steps, case):
    result = torch.load(distributed_steps / f"fsdp2_{case}.pt", weights_only=False)
    assert_matches_one_process(result, case)
    # accelerate's preparation made every PerceiverBlock a unit (from `_no_split_modules`, no class named), the
    # image adapter too (get_input_embeddings), and the root.
    model = distributed_common.build_model(case)
    blocks = [name for name, m in model.named_modules() if type(m).__name__ == "PerceiverBlock"]
    assert blocks and set(blocks) <= set(result["fsdp_units"]) and "" in result["fsdp_units"]
    assert ("input_adapter" in result["fsdp_units"]) == (CASES[case][0] == "image")


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_save_loads_on_one_process(distributed_steps, case):
    distributed_common.check_fsdp2_save(distributed_steps, case, "cpu", STEP_ATOL, STEP_RTOL)

def test_get_input_embeddings_never_raises():
    """accelerate's FSDP2 preparation (and enable_input_require_grads, PEFT) call it on every model."""
    raw = tiny(input_dim=5)
    models = {
        "encoder": PerceiverModel(raw),
        "io": PerceiverIOModel(tiny(input_dim=5, query_dim=4, output_dim=2)),
        "io_regression": PerceiverIOForRegression(tiny(input_dim=5, query_dim=4, output_dim=2)),
        "sequence": PerceiverForSequenceClassification(tiny(input_dim=5, num_labels=3)),
        "image": PerceiverForImageClassification(tiny(num_labels=3)),
        "masked_lm": PerceiverForMaskedLM(tiny()),
    }
    for name in ("encoder", "io", "io_regression", "sequence"):
        assert models[name].get_input_embeddings() is None, name  # raw features: no embedding
    assert models["image"].get_input_embeddings() is models["image"].input_adapter
    lm = models["masked_lm"]
    assert lm.get_input_embeddings() is lm.input_adapter.token_embeddings
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight  # tied: FSDP2 groups them together
    # The heads' encoders are PreTrainedModels too (enable_input_require_grads visits every one).
    assert models["image"].perceiver.get_input_embeddings() is None
    models["image"].enable_input_require_grads()
    out = models["image"].input_adapter(torch.randn(2, 3, 8, 8))
    assert out.requires_grad


def test_classification_example_under_torchrun(tmp_path):
    """The example as users scale it: trains on both processes, saves, checks the reload and reports once."""
    out = tmp_path / "digits"
    done = torchrun([
        str(ROOT / "examples" / "train_classification.py"), str(ROOT / "configs" / "digits.yaml"), "max_steps=2",
        "max_train_samples=128", "save_strategy=steps", "save_steps=2", f"output_dir={out}", "use_cpu=true",
        "ddp_backend=gloo", "disable_tqdm=true", "min_test_accuracy=null",
    ], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]  # 0 only when both processes exit 0
    printed = done.stdout
    assert printed.count('"test_accuracy":') == 1 and printed.count(" parameters; ") == 1, printed
    summary = json.loads(printed[printed.index("{\n"): printed.rindex("}") + 1])
    assert summary["reloaded_weights_identical"] is True and "FAILED" not in printed
    assert summary["pipeline_test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-3)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
        assert (out / name).exists(), name


def test_resume_from_checkpoint_under_torchrun(tmp_path):
    """Stopping after 2 of 4 steps and resuming from that checkpoint (2 processes, DDP on gloo) ends where 4
    uninterrupted steps end. Plain SGD: no optimizer state whose restoration could hide a difference."""

    def run(out, *extra):
        done = torchrun([
            str(ROOT / "examples" / "train_classification.py"), str(ROOT / "configs" / "digits.yaml"), "max_steps=4",
            "max_train_samples=256", "save_strategy=steps", "save_steps=2", "optim=sgd", "learning_rate=0.1",
            f"output_dir={out}", "use_cpu=true", "ddp_backend=gloo", "disable_tqdm=true", "min_test_accuracy=null",
            *extra,
        ], cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    run(resumed, f"resume_from_checkpoint={straight / 'checkpoint-2'}")
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4"]  # it started at step 2
    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    initial = load_file(straight / "checkpoint-2" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-6, rtol=1e-5, msg=name)  # fp32 rounding
    # Control: steps 3 and 4 moved the weights, so resuming into a no-op would fail the comparison.
    assert max((expected[n] - initial[n]).abs().max().item() for n in expected) > 1e-3

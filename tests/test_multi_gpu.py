"""Data-parallel training on 2 CUDA GPUs (nccl), launched with `torchrun` from the tests: DDP and FSDP2 steps against
one GPU (key-padding masks, two inputs, weight tying, activation checkpointing, `cross_attention_checkpointing`), an
FSDP2 save that loads on one process, the classification example under DDP and FSDP2, and resuming from a checkpoint.

Run on a machine with 2 GPUs: `python -m pytest -m multi_gpu tests/test_multi_gpu.py`. Without 2 CUDA devices every
test here is skipped (tests/conftest.py); the CPU counterparts (gloo) are in tests/test_distributed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distributed_common
from context_parallel_common import CASES as CONTEXT_PARALLEL_CASES, run_on_two_ranks
from distributed_common import CASES, ROOT, single_process_step, torchrun


pytestmark = pytest.mark.multi_gpu

# One GPU against two: the same fp32 math (TF32 is off for matmuls by default), but the attention and matmul kernels
# may be chosen per batch size and sum in another order, and the gradient all-reduce adds its own rounding. Wider
# than on CPU (tests/test_distributed.py, 1e-6), still far below the 0.2 a real difference makes (control below).
GPU_STEP_ATOL = 1e-5
GPU_STEP_RTOL = 1e-4


@pytest.fixture(scope="module")
def gpu_steps(tmp_path_factory) -> Path:
    """Every case under DDP and under FSDP2 on 2 GPUs, in one launch (the worker picks nccl when CUDA is there)."""
    out = tmp_path_factory.mktemp("gpu_steps")
    runs = [f"{mode}:{case}" for mode in ("ddp", "fsdp2") for case in CASES]
    done = torchrun([str(ROOT / "tests" / "distributed_common.py"), str(out), *runs], cwd=out, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def assert_matches_one_gpu(result: dict, case: str) -> None:
    expected = single_process_step(case, device="cuda")
    assert len(result["per_rank"]) == 2
    for rank, state in enumerate(result["per_rank"]):
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(state[name], value, atol=GPU_STEP_ATOL, rtol=GPU_STEP_RTOL,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
    half = single_process_step(case, device="cuda", first_rank_only=True)
    assert max((half[n] - expected[n]).abs().max().item() for n in expected) > 100 * GPU_STEP_ATOL


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("case", list(CASES))
def test_step_on_two_gpus_equals_one_gpu(gpu_steps, mode, case):
    result = torch.load(gpu_steps / f"{mode}_{case}.pt", weights_only=False)
    assert_matches_one_gpu(result, case)
    if mode == "fsdp2":
        model = distributed_common.build_model(case)
        blocks = [name for name, m in model.named_modules() if type(m).__name__ == "PerceiverBlock"]
        assert blocks and set(blocks) <= set(result["fsdp_units"])


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_save_loads_on_one_process(gpu_steps, case):
    distributed_common.check_fsdp2_save(gpu_steps, case, "cuda", GPU_STEP_ATOL, GPU_STEP_RTOL)

def run_classification(out: Path, *overrides: str) -> dict:
    """The classification example under `torchrun --nproc_per_node 2` on the GPUs; its one printed summary."""
    done = torchrun([
        str(ROOT / "examples" / "train_classification.py"), str(ROOT / "configs" / "digits.yaml"),
        f"output_dir={out}", "disable_tqdm=true", "min_test_accuracy=null", *overrides,
    ], cwd=out.parent, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]  # 0 only when both processes exit 0
    printed = done.stdout
    assert printed.count('"test_accuracy":') == 1 and printed.count(" parameters; ") == 1, printed
    return json.loads(printed[printed.index("{\n"): printed.rindex("}") + 1])


# FSDP2 through the argument users write; no layer class named: the model's `_no_split_modules` supplies it.
PARALLELISM = {"ddp": (), "fsdp2": ("fsdp=full_shard auto_wrap",)}


@pytest.mark.parametrize("parallelism", list(PARALLELISM))
def test_classification_example_on_two_gpus(tmp_path, parallelism):
    out = tmp_path / "digits"
    summary = run_classification(out, "max_steps=20", "save_strategy=steps", "save_steps=10",
                                 *PARALLELISM[parallelism])
    assert summary["reloaded_weights_identical"] is True
    assert summary["pipeline_test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-3)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["PerceiverForImageClassification"]
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_perceiver.PerceiverForImageClassification"
    assert not list(out.glob("_fsdp*.py")) and "FSDP" not in (out / "README.md").read_text()


@pytest.mark.parametrize("parallelism", list(PARALLELISM))
def test_resume_from_checkpoint_on_two_gpus(tmp_path, parallelism):
    """Stopping after 2 of 4 steps and resuming from that checkpoint ends where 4 uninterrupted steps end. Plain SGD:
    no optimizer state whose restoration could hide, and no Adam normalisation to blow a rounding difference up."""
    common = ("max_steps=4", "save_strategy=steps", "save_steps=2", "optim=sgd", "learning_rate=0.1",
              *PARALLELISM[parallelism])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_classification(straight, *common)
    run_classification(resumed, *common, f"resume_from_checkpoint={straight / 'checkpoint-2'}")
    # The resumed run started at step 2: it saved step 4 only.
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-4"]
    state = json.loads((resumed / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    from safetensors.torch import load_file

    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    initial = load_file(straight / "checkpoint-2" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=GPU_STEP_ATOL, rtol=GPU_STEP_RTOL, msg=name)
    # Control: steps 3 and 4 moved the weights, so stopping at step 2 would fail the comparison.
    assert max((expected[n] - initial[n]).abs().max().item() for n in expected) > 100 * GPU_STEP_ATOL


@pytest.mark.parametrize("case_name", sorted(CONTEXT_PARALLEL_CASES))
def test_context_parallel_on_two_gpus_equals_one_gpu(case_name):
    # Each GPU holds a slice of the sequence (nccl); outputs and every gradient are checked against one GPU's.
    run_on_two_ranks(case_name, "cuda")

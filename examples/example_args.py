"""Argument handling shared by the examples: a YAML config, then `key=value` overrides, into dataclasses.

    python examples/<script>.py CONFIG.yaml [key=value ...]

The YAML file holds the fields of the script's dataclasses and transformers' `TrainingArguments`, parsed with
`HfArgumentParser.parse_dict`; each override replaces one field, its value read as YAML (`num_train_epochs=1`,
`min_test_accuracy=null`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser


# A reloaded model must have bit-equal weights; its outputs need only agree within fp32 rounding: loaded tensors can
# sit at other memory alignments than fresh ones, and some CPUs' vectorised kernels then sum in another order.
RELOAD_RTOL = 1e-5
RELOAD_ATOL = 1e-5


@dataclass
class RuntimeArguments:
    torch_num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads of torch (default: torch's choice, one per core)."}
    )

    def apply(self, training_args=None) -> None:
        """Set torch's thread count; without an accelerator, also turn off `Trainer`'s pinned-memory data loading,
        which then does nothing but warn on every run."""
        if self.torch_num_threads:
            torch.set_num_threads(self.torch_num_threads)
        if training_args is not None and not accelerator_available():
            training_args.dataloader_pin_memory = False


def accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the trained model by name, whole and on the CPU. Under FSDP the parameters are
    shards (DTensors), gathered here: then every process must call this, in the same order."""
    weights = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if hasattr(tensor, "full_tensor"):  # a DTensor shard (FSDP2): all-gathered, a collective call
            tensor = tensor.full_tensor()
        weights[name] = tensor.detach().cpu()
    return weights


def reload_check(weights: dict[str, torch.Tensor], reloaded: torch.nn.Module, logits, reloaded_logits) -> dict:
    """Compare a reloaded model with the weights it was saved from (`trained_weights`): every parameter and buffer
    bit-equal (the names too), and the largest absolute difference of their logits on the same inputs; `ok` when the
    weights are identical and the logits agree within fp32 rounding (RELOAD_RTOL, RELOAD_ATOL)."""
    got = {**dict(reloaded.named_parameters()), **dict(reloaded.named_buffers())}
    weights_identical = got.keys() == weights.keys() and all(
        torch.equal(got[name].cpu(), t.cpu()) for name, t in weights.items()
    )
    logits, reloaded_logits = logits.detach().float().cpu(), reloaded_logits.detach().float().cpu()
    close = logits.shape == reloaded_logits.shape and torch.allclose(
        reloaded_logits, logits, rtol=RELOAD_RTOL, atol=RELOAD_ATOL
    )
    diff = (reloaded_logits - logits).abs().max().item() if logits.shape == reloaded_logits.shape else float("inf")
    return {"weights_identical": weights_identical, "logits_max_abs_diff": diff, "ok": weights_identical and close}


def is_main_process(training_args) -> bool:
    """Whether this process saves, checks the reload and reports: the first of a `torchrun` launch, or the only one."""
    return training_args.process_index == 0


# The status broadcast and its tensor, kept for the life of the process on gloo (see shared_status).
_FINAL_COLLECTIVE: tuple | None = None


def shared_status(trainer, status: int | None) -> int:
    """The main process's exit status (None on the others), returned on every process. Under `torchrun` the other
    processes wait here until the main one has saved, reloaded and reported, then exit with its status.

    This is the script's last collective, so it also ends the process group (`Accelerator.end_training`). Its work
    handle is kept until the process ends: gloo's worker thread drops its own reference to a finished collective
    after waking the caller, holding the group's queue lock, and if that reference is the last one, freeing the
    tensors takes the GIL. Should that happen while the interpreter exits, the thread dies inside a destructor and the
    process aborts ("terminate called without an active exception"); while the DDP model is freed (its reducer
    destroys the group, waiting for that lock with the GIL held), both threads wait for ever. Holding a reference
    here makes the worker's never the last."""
    global _FINAL_COLLECTIVE
    if trainer.accelerator.num_processes == 1:
        return status
    import torch.distributed as dist

    value = torch.tensor([0 if status is None else status], dtype=torch.int64, device=trainer.accelerator.device)
    work = dist.broadcast(value, src=0, async_op=True)
    work.wait()
    status = int(value.item())  # before the group ends: on NCCL, wait() only orders the streams
    if dist.get_backend() == "gloo":  # the worker-thread pattern above is gloo's
        _FINAL_COLLECTIVE = (work, value)
    trainer.accelerator.end_training()
    return status


def yaml_value(text: str):
    """A command-line value read as YAML; YAML 1.1 reads `1e-3` (no dot) as a string, so such strings become floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_config(dataclass_types: tuple[type, ...], argv: list[str]) -> tuple:
    """`argv` = `[CONFIG.yaml, key=value, ...]` -> one instance per dataclass type."""
    if not argv or not argv[0].endswith((".yaml", ".yml")):
        raise SystemExit(f"usage: python {sys.argv[0]} CONFIG.yaml [key=value ...]")
    values = yaml.safe_load(Path(argv[0]).read_text()) or {}
    for override in argv[1:]:
        key, sep, value = override.partition("=")
        if not sep:
            raise SystemExit(f"Overrides are key=value, got {override!r}.")
        values[key.lstrip("-")] = yaml_value(value)
    return HfArgumentParser(dataclass_types).parse_dict(values)


def report(summary: dict, metric: str, minimum: float | None, reload: dict | None = None) -> int:
    """Print the run's summary as JSON; the exit status is 1 when `summary[metric]` ended below `minimum`, or when
    the reload check (see `reload_check`) failed."""
    print(json.dumps(summary, indent=2))
    status = 0
    if reload is not None and not reload["ok"]:
        print(f"FAILED: reloaded model differs (weights identical: {reload['weights_identical']}, "
              f"logits max abs diff {reload['logits_max_abs_diff']:.3g}, allowed rtol={RELOAD_RTOL}, "
              f"atol={RELOAD_ATOL})")
        status = 1
    if minimum is not None and summary[metric] < minimum:
        print(f"FAILED: {metric} {summary[metric]:.4f} < {minimum}")
        status = 1
    return status

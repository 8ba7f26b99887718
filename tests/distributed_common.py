"""Data-parallel training steps, shared by tests/test_distributed.py (CPU, gloo) and tests/test_multi_gpu.py (CUDA,
nccl): tiny heads with their global batches, one optimizer step on one process, and the same step on every rank of a
`torchrun` launch under DDP or FSDP2.

Run by `torchrun --nproc_per_node N tests/distributed_common.py OUT_DIR MODE:CASE [MODE:CASE ...]` (MODE `ddp` or
`fsdp2`): each rank takes its slice of the global batch and one SGD step per case; rank 0 writes
`OUT_DIR/<mode>_<case>.pt` (every rank's parameters after the step, whole) and, under FSDP2, a `save_pretrained` folder
`OUT_DIR/fsdp2_<case>/` of the weights gathered as accelerate gathers them for saving. The tests take the
one-process step themselves and compare.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from hf_flash_perceiver import (
    PerceiverConfig,
    PerceiverForImageClassification,
    PerceiverForMaskedLM,
    PerceiverForSequenceClassification,
    PerceiverIOForRegression,
)


ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
LEARNING_RATE = 0.5  # large, so that one step moves every weight far beyond fp32 rounding

# name -> (head kind, config fields, activation checkpointing). Every case keeps padding in both halves of the batch.
CASES: dict[str, tuple[str, dict, bool]] = {
    # Two inputs of different widths and lengths (one per cross-attention block), key-padding masks on both, zero
    # tokens prepended to each.
    "two_inputs_masked": ("sequence", dict(input_dim=[5, 3], depth=2, num_zero_tokens=2), False),
    # Blocks 2 and 3 share one set of weights (that module runs twice per forward), with activation checkpointing.
    "weight_tied_checkpointing": ("sequence", dict(input_dim=5, depth=3, weight_tie_layers=True), True),
    # Images: the input adapter is what get_input_embeddings returns, so FSDP2 shards it as a unit of its own.
    "image_checkpointing": ("image", dict(num_channels=3, image_size=8, patch_size=2, depth=2), True),
    # The chunked, recomputed cross-attention, masked, with activation checkpointing on top.
    "cross_attention_checkpointing": (
        "sequence", dict(input_dim=5, depth=2, cross_attention_checkpointing=True, cross_attention_chunk_size=8), True,
    ),
    # Token ids with padding, one decoder query per position, the output layer tied to the input embedding.
    "masked_lm_tied": ("masked_lm", dict(depth=2, max_position_embeddings=12), False),
    # Perceiver IO: padded inputs, padded queries, dense targets (-100 at the padded queries).
    "io_regression": ("io_regression", dict(input_dim=5, depth=2, query_dim=4, output_dim=2), True),
}

HEAD_CLASSES = {
    "sequence": PerceiverForSequenceClassification,
    "image": PerceiverForImageClassification,
    "masked_lm": PerceiverForMaskedLM,
    "io_regression": PerceiverIOForRegression,
}


def head_class(case: str) -> type:
    """The case's head class."""
    return HEAD_CLASSES[CASES[case][0]]


def build_model(case: str) -> torch.nn.Module:
    """The case's head, with the same initial weights in every process (seeded)."""
    _, fields, checkpointing = CASES[case]
    config = PerceiverConfig(
        num_latents=4, latent_dim=16, cross_heads=2, cross_head_dim=8, latent_heads=2, latent_head_dim=8,
        self_per_cross_attn=1, num_labels=3, num_fourier_bands=2, **fields,
    )
    torch.manual_seed(0)
    model = head_class(case)(config)
    if checkpointing:
        # transformers 5.24 renamed the switch (the old name warns there); 5.17 has only the old one.
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    return model.train()


def global_batch(case: str) -> dict:
    """The case's whole batch (GLOBAL_BATCH samples); `shard` cuts a rank's part out of it."""
    kind, fields, _ = CASES[case]
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    if kind == "image":
        return {"pixel_values": torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g), "labels": labels}
    # Lengths cycle with period 4, so both halves of the batch hold the same number of labelled items: the mean of
    # the two halves' mean losses is then the whole batch's mean loss, which is what DDP/FSDP averaging computes.
    if kind == "masked_lm":
        ids = torch.randint(6, 262, (GLOBAL_BATCH, 12), generator=g)
        mask = torch.arange(12)[None, :] < (torch.arange(GLOBAL_BATCH) % 4 + 9)[:, None]
        picked = (torch.arange(12)[None, :] % 3 == 0) & mask
        return {"input_ids": ids.masked_fill(picked, 3), "attention_mask": mask.long(),
                "labels": ids.masked_fill(~picked, -100)}
    if kind == "io_regression":
        inputs = torch.randn(GLOBAL_BATCH, 11, 5, generator=g)
        mask = torch.arange(11)[None, :] < (torch.arange(GLOBAL_BATCH) % 4 + 8)[:, None]
        queries = torch.randn(GLOBAL_BATCH, 6, 4, generator=g)
        query_mask = torch.arange(6)[None, :] < (torch.arange(GLOBAL_BATCH) % 4 + 3)[:, None]
        targets = torch.randn(GLOBAL_BATCH, 6, 2, generator=g).masked_fill(~query_mask[..., None], -100.0)
        return {"inputs": inputs, "attention_mask": mask, "queries": queries, "query_mask": query_mask,
                "labels": targets}
    widths = fields["input_dim"] if isinstance(fields["input_dim"], list) else [fields["input_dim"]]
    inputs, masks = [], []
    for width, length in zip(widths, (11, 7)):
        inputs.append(torch.randn(GLOBAL_BATCH, length, width, generator=g))
        lengths = torch.arange(GLOBAL_BATCH) % 4 + length - 3  # every rank's half holds padded samples
        masks.append(torch.arange(length)[None, :] < lengths[:, None])
    if len(widths) == 1:
        return {"inputs": inputs[0], "attention_mask": masks[0], "labels": labels}
    return {"inputs": inputs, "attention_mask": masks, "labels": labels}


def shard(batch: dict, rank: int, world_size: int, device: torch.device | str = "cpu") -> dict:
    """Rank `rank`'s contiguous slice of the batch (lists of per-input tensors sliced alike), on `device`."""
    per_rank = GLOBAL_BATCH // world_size
    part = slice(rank * per_rank, (rank + 1) * per_rank)

    def cut(value):
        return [cut(v) for v in value] if isinstance(value, list) else value[part].to(device)

    return {key: cut(value) for key, value in batch.items()}


def train_step(model: torch.nn.Module, batch: dict) -> float:
    """One SGD step on the head's own (batch-mean) loss; DDP and FSDP average the gradients over ranks, so equal
    halves give the whole batch's gradient."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2` on 127.0.0.1 at a free port, this checkout first on the import path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def single_process_step(case: str, device: torch.device | str = "cpu", first_rank_only: bool = False) -> dict:
    """Parameters after one step on the whole global batch in this process (or, as a control that the comparison
    can fail, on rank 0's half only)."""
    model = build_model(case).to(device)
    batch = global_batch(case)
    batch = shard(batch, 0, 2, device) if first_rank_only else shard(batch, 0, 1, device)
    train_step(model, batch)
    return {name: p.detach().cpu() for name, p in model.named_parameters()}


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters on the CPU (DTensor shards all-gathered: a collective call under FSDP)."""
    state = {}
    for name, p in model.named_parameters():
        state[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
    return state


def fsdp2_prepare(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard the model as `Trainer(fsdp="full_shard auto_wrap")` does: accelerate's own `fsdp2_prepare_model`, with the
    transformer-layer policy and no class named, so the layers come from the model's `_no_split_modules`. accelerate
    turns FSDP on for accelerators only; calling its preparation directly runs the same code on CPU too."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no", device=device,
        is_main_process=int(os.environ["RANK"]) == 0, torch_device_mesh=None, parallelism_config=None,
    )
    return fsdp2_prepare_model(accelerator, model)


def check_fsdp2_save(out_dir: Path, case: str, device: str, atol: float, rtol: float) -> None:
    """The case's FSDP2 save (written by `run_case`) loads on one process: it names the model's own class and ships
    the package's code (not torch's FSDP wrapper), its weights are the gathered ones exactly (a file round trip), and
    they equal one process's step on the whole batch within `atol`/`rtol`."""
    import json

    result = torch.load(out_dir / f"fsdp2_{case}.pt", weights_only=False)
    folder = out_dir / f"fsdp2_{case}"
    cls = head_class(case)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [cls.__name__]
    assert config["auto_map"][cls._hub_auto_class] == f"modeling_perceiver.{cls.__name__}"
    code = {p.name for p in folder.glob("*.py")}
    assert "modeling_perceiver.py" in code and not any(name.startswith("_fsdp") for name in code), code
    loaded = cls.from_pretrained(folder)
    saved = result["saved_state_dict"]
    # Tied weights (the masked LM's output layer) appear under both names in a state dict, once in the parameters.
    params = dict(loaded.named_parameters(remove_duplicate=False))
    assert params.keys() == saved.keys() and set(result["per_rank"][0]) <= set(saved)
    for name, tensor in saved.items():
        assert params[name].dtype == tensor.dtype and torch.equal(params[name], tensor.cpu()), name
    for name, tensor in result["per_rank"][0].items():
        torch.testing.assert_close(saved[name].cpu(), tensor, atol=0, rtol=0)
    for name, value in single_process_step(case, device=device).items():
        torch.testing.assert_close(params[name], value, atol=atol, rtol=rtol)


def fsdp2_units(model: torch.nn.Module) -> list[str]:
    """Names of the modules FSDP2 made units of their own ("" for the root)."""
    from torch.distributed.fsdp import FSDPModule

    return [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]


def end_process_group() -> None:
    """Destroy the default process group so that its gloo worker threads are joined before the interpreter exits.

    Objects still holding the group (a DDP reducer in a reference cycle, an FSDP mesh) are collected first: while one
    does, destroying the group leaves it alive, its worker threads run into interpreter shutdown, and one that must
    take the GIL to free a finished collective's tensors then aborts the process ("terminate called without an active
    exception"), or, if the group is freed by the reducer with the GIL held, waits on it for ever."""
    import gc

    import torch.distributed as dist

    gc.collect()
    dist.destroy_process_group()


def run_case(case: str, mode: str, out_dir: Path, rank: int, world_size: int, device: torch.device) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.nn.parallel import DistributedDataParallel

    model = build_model(case).to(device)
    checkpointing = CASES[case][2]
    units: list[str] = []
    if mode == "ddp":
        # As Trainer wraps it: unused-parameter search off exactly when checkpointing is on.
        wrapped = DistributedDataParallel(model, find_unused_parameters=not checkpointing)
    else:
        wrapped = model = fsdp2_prepare(model, device)
        units = fsdp2_units(model)
    loss = train_step(wrapped, shard(global_batch(case), rank, world_size, device))
    state = full_state(model)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, state)
    result = {"per_rank": gathered, "loss": loss, "fsdp_units": units, "class_name": type(model).__name__}
    if mode == "fsdp2":
        # What accelerate's `get_state_dict` does for FSDP2 before Trainer saves: whole tensors, on rank 0's CPU.
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
        state_dict = get_model_state_dict(model, options=options)
        if rank == 0:
            result["saved_state_dict"] = dict(state_dict)  # save_pretrained empties the dict it is given
            # Saved with its code, as the examples save: the code and auto_map must be the package's, not torch's
            # FSDP wrapper class.
            head_class(case).register_for_auto_class()
            model.save_pretrained(out_dir / f"{mode}_{case}", state_dict=state_dict)
    if rank == 0:
        torch.save(result, out_dir / f"{mode}_{case}.pt")
    dist.barrier()


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    out_dir, runs = Path(argv[0]), [run.partition(":")[::2] for run in argv[1:]]
    for mode, case in runs:
        if mode not in ("ddp", "fsdp2") or case not in CASES:
            raise ValueError(f"runs are MODE:CASE with MODE 'ddp' or 'fsdp2' and CASE one of {sorted(CASES)}, got "
                             f"{mode}:{case}")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    try:
        for mode, case in runs:
            run_case(case, mode, out_dir, rank, world_size, device)
    finally:
        end_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

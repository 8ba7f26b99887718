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


@dataclass
class RuntimeArguments:
    torch_num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads of torch (default: torch's choice, one per core)."}
    )

    def apply(self) -> None:
        if self.torch_num_threads:
            torch.set_num_threads(self.torch_num_threads)


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


def report(summary: dict, metric: str, minimum: float | None) -> int:
    """Print the run's summary as JSON; the exit status is 1 when `summary[metric]` ended below `minimum`."""
    print(json.dumps(summary, indent=2))
    if minimum is not None and summary[metric] < minimum:
        print(f"FAILED: {metric} {summary[metric]:.4f} < {minimum}")
        return 1
    return 0

"""The package's Triton kernels and fused residual branches on the CPU, in Triton's interpreter
(tests/interpreted_kernels.py, run in a subprocess because the interpreter is chosen when the kernels are defined):
CI has no GPU, and without this the kernels' code would be exercised only by the GPU tests. The checks and their
tolerances are documented in that file. Needs Triton, which the `test` extra installs on Linux x86-64; elsewhere
these tests are skipped."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version


def _triton_version() -> Version | None:
    try:
        return Version(importlib.metadata.version("triton"))
    except importlib.metadata.PackageNotFoundError:
        return None


# 3.8 and 3.9 run every check; 3.6's interpreter stops at loops bounded by a kernel argument (3.7 not tried). A CUDA
# build of torch pins its own Triton, which may be older: there the GPU tests check these kernels on the device.
pytestmark = pytest.mark.skipif(
    _triton_version() is None or _triton_version() < Version("3.8"),
    reason=f"needs Triton 3.8 or later for its interpreter (found {_triton_version()}; `pip install -e '.[test]'` "
    "installs the newest on Linux x86-64 beside a CPU build of torch)",
)

CHECKS = ["layer_norm", "column_sum", "stack_heads_column_sum", "activation", "softmax_dropout",
          "shared_key_value_attention", "fold_affine", "residual_add", "concat_positions", "mlp_branch",
          "self_attention_branch", "cross_attention_branch", "backward_copies", "fused_model"]


@pytest.fixture(scope="module")
def results() -> dict:
    script = Path(__file__).with_name("interpreted_kernels.py")
    proc = subprocess.run([sys.executable, str(script)], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_check_ran(results):
    assert sorted(results) == sorted(CHECKS)


@pytest.mark.parametrize("check", CHECKS)
def test_interpreted_kernels(results, check):
    assert results[check]["ok"], results[check]["detail"]

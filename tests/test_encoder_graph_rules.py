"""The rules that keep a call of the encoder off the CUDA-graph path (encoder_graphs.py), on any device: the switch
and its environment variable, and hooks, foreign modules and interposed machinery are recognised. The captures
themselves are checked on a GPU by test_encoder_graphs.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hf_flash_perceiver import encoder_graphs

from core_common import FP32_TOL, build, small_config


def test_switch_is_on_by_default_and_cpu_calls_run_eagerly(monkeypatch):
    if "HF_FLASH_PERCEIVER_ENCODER_GRAPHS" in os.environ:
        pytest.skip("HF_FLASH_PERCEIVER_ENCODER_GRAPHS is set in this environment: the default is not in effect")
    assert encoder_graphs.enabled is True
    model = build(small_config(), "sdpa", 0).train()
    x = torch.randn(2, 9, 12)
    want = model(x).last_hidden_state
    monkeypatch.setattr(encoder_graphs, "enabled", True)
    for _ in range(encoder_graphs.WARMUP_CALLS + 2):
        got = model(x).last_hidden_state
    # No graph off CUDA: nothing captured, and the same eager code on the same values (to fp32 rounding: two calls may
    # get differently aligned buffers, which some CPU kernels round differently).
    assert model.encoder not in encoder_graphs._state
    torch.testing.assert_close(got, want, rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), ("1", True)])
def test_environment_variable_sets_the_switch(value, enabled):
    code = "import hf_flash_perceiver.encoder_graphs as g; print(g.enabled)"
    env = {**os.environ, "HF_FLASH_PERCEIVER_ENCODER_GRAPHS": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(enabled)


def test_known_modules_and_hooks():
    model = build(small_config(), "sdpa", 0)
    assert all(encoder_graphs._type_info(type(m))[0] and encoder_graphs._hooks_allow_capture(m)
               for m in model.encoder.modules())
    assert encoder_graphs._layout(model.encoder, on_cuda=False) is not None

    class Wrapped(nn.Linear):  # defined here, not in the package: its ops are not known to capture
        pass

    assert not encoder_graphs._type_info(Wrapped)[0]
    mlp = model.encoder.self_layers[0][0].mlp
    mlp.fc1 = Wrapped(mlp.fc1.in_features, mlp.fc1.out_features)
    assert encoder_graphs._layout(model.encoder, on_cuda=False) is None  # one unknown module: no capture
    # transformers' output recorders stay installed after a call that recorded hidden states; inactive, they allow it.
    model(torch.randn(2, 9, 12), output_hidden_states=True)
    block = model.encoder.self_layers[0][0]
    assert block._forward_hooks and encoder_graphs._hooks_allow_capture(block)
    handle = block.register_forward_hook(lambda *args: None)
    assert not encoder_graphs._hooks_allow_capture(block)
    handle.remove()
    handle = block.register_forward_pre_hook(lambda *args: None)
    assert not encoder_graphs._hooks_allow_capture(block)
    handle.remove()


def test_layout_walks_every_module_once_and_refuses_what_cannot_be_captured():
    model = build(small_config(), "sdpa", 0).train()
    encoder = model.encoder
    encoder.self_layers[1][0] = encoder.self_layers[0][0]  # one module reached twice: walked once, as `modules()` does
    encoder.self_layers[0][0].eval()
    want = []
    for module in encoder.modules():
        want.append(module.training)
        want += [(p.data_ptr(), tuple(p.shape), p.dtype, p.requires_grad)
                 for p in module._parameters.values() if p is not None]
    assert encoder_graphs._layout(encoder, on_cuda=False) == tuple(want)
    assert encoder_graphs._layout(encoder) is None  # parameters off the GPU
    encoder.self_layers[0][0].gradient_checkpointing = True
    assert encoder_graphs._layout(encoder, on_cuda=False) == tuple(want)  # checkpointing takes effect in training only
    encoder.self_layers[0][0].train()
    assert encoder_graphs._layout(encoder, on_cuda=False) is None
    encoder.self_layers[0][0].gradient_checkpointing = False
    handle = encoder.self_layers[-1][-1].register_forward_hook(lambda *args: None)
    assert encoder_graphs._layout(encoder, on_cuda=False) is None
    handle.remove()
    encoder.self_layers[0][0].requires_grad_(False)
    assert encoder_graphs._layout(encoder, on_cuda=False) != tuple(want)  # the parameters' flags are part of it


def test_interposed_machinery_is_seen():
    assert not encoder_graphs._interposed()
    with FlopCounterMode(display=False):
        assert encoder_graphs._interposed()
    with torch.autograd.graph.save_on_cpu():
        assert encoder_graphs._interposed()
    with torch.autograd.detect_anomaly(check_nan=False):
        assert encoder_graphs._interposed()
    assert not encoder_graphs._interposed()


def test_calls_before_a_capture_fuse_where_auto_would(monkeypatch):
    """The eager calls that lead up to a capture run what the capture runs where it pays: the fused branches under
    `fused_branches("auto")` (the setting is read inside the call); never where captures do not fuse, nor over the
    user's own setting. What they compute on a GPU is checked by test_encoder_graphs.py."""
    from hf_flash_perceiver import fused_block

    seen = []

    def run(*inputs):
        seen.append((fused_block.enabled, len(inputs)))
        return inputs[0]

    x = torch.zeros(2, 3)
    monkeypatch.setattr(encoder_graphs, "fuse_branches", True)
    assert encoder_graphs._warm_up(run, [x, x]) is x
    assert seen == [("auto", 2)] and fused_block.enabled is False  # restored after the call
    monkeypatch.setattr(encoder_graphs, "fuse_branches", False)
    assert encoder_graphs._warm_up(run, [x]) is None
    monkeypatch.setattr(encoder_graphs, "fuse_branches", True)
    with fused_block.fused_branches(True):
        assert encoder_graphs._warm_up(run, [x]) is None
    assert len(seen) == 1

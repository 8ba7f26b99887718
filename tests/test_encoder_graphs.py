"""GPU checks of the encoder's CUDA graphs (encoder_graphs.py): what a replay computes is what the eager encoder
computes, and every case that must not replay (pending backward, recorded outputs, hooks, new parameters) runs
eagerly. Run with `pytest -m cuda`."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from hf_flash_perceiver import encoder_graphs
from hf_flash_perceiver.encoder import PerceiverEncoder

from core_common import build, rel_err, small_config

pytestmark = pytest.mark.cuda

# A replay runs the eager encoder's kernels in the same order on the same values; only reductions that are not
# deterministic from run to run (cuDNN attention backward, split-K GEMMs) may differ: relative Frobenius error of the
# whole tensor, bf16 compute. Outputs within 2e-3; gradients within 1e-2, because one such sum early in the backward
# changes bf16 roundings in every layer below it (2.1e-3 measured on a context norm's bias). A replay reading stale
# weights or activations is off by O(1).
REPLAY_REL_TOL = 2e-3
REPLAY_GRAD_REL_TOL = 1e-2
# What six optimizer steps changed in a parameter: each step's gradient within REPLAY_GRAD_REL_TOL, compounding over
# the steps (up to 1.03e-2 measured on a cross-attention norm's weight, depending on the inputs drawn).
REPLAY_TRAINING_REL_TOL = 2e-2


def graph_config(**kw):
    base = dict(latent_dim=128, num_latents=32, cross_head_dim=64, latent_head_dim=64, latent_heads=2, input_dim=24,
                depth=2, self_per_cross_attn=2)
    return small_config(**{**base, **kw})


@pytest.fixture(autouse=True)
def graphs_on(monkeypatch):
    """The switch is on by default; these tests do not depend on the environment's HF_FLASH_PERCEIVER_ENCODER_GRAPHS
    (and restore the switch after)."""
    monkeypatch.setattr(encoder_graphs, "enabled", True)


@pytest.fixture
def model(monkeypatch):
    """The mechanism's tests replay the module path, so that replay and eager run the same kernels
    (`test_replay_runs_the_fused_branches` covers what a replay runs by default)."""
    monkeypatch.setattr(encoder_graphs, "fuse_branches", False)
    encoder_graphs.reset()
    m = build(graph_config(), "sdpa", 0).cuda().train()
    yield m
    encoder_graphs.reset()


@pytest.fixture
def eager():
    """Run the enclosed calls without graphs: `with eager(): ...`."""

    class Eager:
        def __enter__(self):
            self.previous, encoder_graphs.enabled = encoder_graphs.enabled, False

        def __exit__(self, *exc):
            encoder_graphs.enabled = self.previous

    return Eager


def forward(model, x, **kwargs):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(x, **kwargs)


def train_step(model, x):
    model.zero_grad(set_to_none=True)
    out = forward(model, x).last_hidden_state
    out.float().square().mean().backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def captured(model) -> int:
    state = encoder_graphs._state.get(model.encoder)
    return 0 if state is None else len(state.graphs)


def count_eager_runs(monkeypatch) -> list[int]:
    calls = [0]
    original = PerceiverEncoder.run_blocks

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PerceiverEncoder, "run_blocks", counted)
    return calls


def assert_grads_close(got, want):
    assert got.keys() == want.keys()
    for name in want:
        err = rel_err(got[name], want[name])
        assert err <= REPLAY_GRAD_REL_TOL, (name, err)


def test_replay_matches_eager(model, eager, monkeypatch):
    x = torch.randn(4, 100, 24, device="cuda")
    with eager():
        want_out, want_grads = train_step(model, x)
    assert captured(model) == 0
    for _ in range(encoder_graphs.WARMUP_CALLS):
        train_step(model, x)
    assert captured(model) == 0  # not before the signature has repeated
    train_step(model, x)  # captures
    assert captured(model) == 1
    calls = count_eager_runs(monkeypatch)
    out, grads = train_step(model, torch.randn(4, 100, 24, device="cuda"))  # new values, same signature
    out, grads = train_step(model, x)
    assert calls[0] == 0  # both replayed
    assert rel_err(out, want_out) <= REPLAY_REL_TOL
    assert_grads_close(grads, want_grads)


def test_training_follows_the_optimizer_and_accumulates(model, eager):
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(4, 100, 24, device="cuda", generator=gen) for _ in range(3)]
    for m, graphs in ((model, True), (twin, False)):
        encoder_graphs.enabled = graphs
        # Small steps: the loss (the output's mean square, no final norm) diverges within six steps at lr 0.05.
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        for step in range(6):
            opt.zero_grad(set_to_none=True)
            # Two micro-batches per step without zeroing in between: accumulated gradients. `loss` stays alive
            # into the next forward, as in most training loops: the capture must not depend on the last step's
            # autograd graph being gone.
            for x in xs[:2] if step % 2 else xs[1:]:
                loss = forward(m, x).last_hidden_state.float().square().mean()
                loss.backward()
            opt.step()
    encoder_graphs.enabled = True
    assert torch.isfinite(loss)
    assert (captured(model), captured(twin)) == (1, 0)
    assert not encoder_graphs._capture_failed
    for (name, p), q, p0 in zip(model.named_parameters(), twin.parameters(), start):
        # What training changed, graphs against eager (biases start at zero: their own norm is all change).
        err = rel_err(p.detach() - p0, q.detach() - p0)
        assert err <= REPLAY_TRAINING_REL_TOL, (name, err)


def test_second_forward_before_backward_runs_eagerly(model, eager, monkeypatch):
    x1, x2 = torch.randn(2, 4, 100, 24, device="cuda")
    for _ in range(encoder_graphs.WARMUP_CALLS + 1):
        train_step(model, x1)
    assert captured(model) == 1

    def two_forwards():
        model.zero_grad(set_to_none=True)
        a = forward(model, x1).last_hidden_state
        b = forward(model, x2).last_hidden_state
        (a.float().square().mean() + 2 * b.float().square().mean()).backward()
        return a.detach().float(), b.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}

    calls = count_eager_runs(monkeypatch)
    a, b, grads = two_forwards()
    assert calls[0] == 1  # the first replayed, the second ran eagerly: its replay would overwrite the first's state
    with eager():
        want_a, want_b, want_grads = two_forwards()
    assert rel_err(a, want_a) <= REPLAY_REL_TOL and rel_err(b, want_b) <= REPLAY_REL_TOL
    assert_grads_close(grads, want_grads)
    calls[0] = 0
    train_step(model, x1)
    assert calls[0] == 0  # replays again once the backward has run


def test_kept_outputs_are_not_overwritten(model):
    x1, x2 = torch.randn(2, 4, 100, 24, device="cuda")
    for _ in range(encoder_graphs.WARMUP_CALLS + 1):
        train_step(model, x1)
    kept = forward(model, x1).last_hidden_state
    kept.float().mean().backward()
    snapshot = kept.detach().clone()
    forward(model, x2).last_hidden_state.float().mean().backward()
    assert torch.equal(kept.detach(), snapshot)


def test_recorded_outputs_and_hooks_run_eagerly(model, eager, monkeypatch):
    x = torch.randn(4, 100, 24, device="cuda")
    for _ in range(encoder_graphs.WARMUP_CALLS + 1):
        train_step(model, x)
    assert captured(model) == 1
    out = forward(model, x, output_hidden_states=True)
    with eager():
        want = forward(model, x, output_hidden_states=True)
    assert len(out.hidden_states) == len(want.hidden_states) == 1 + 2 * (1 + 2)
    assert len(forward(model, x, output_attentions=True).attentions) == 2 * (1 + 2)
    for got, ref in zip(out.hidden_states, want.hidden_states):
        assert rel_err(got.detach(), ref.detach()) <= REPLAY_REL_TOL
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as flops:
        train_step(model, x)
    with eager(), FlopCounterMode(display=False) as eager_flops:
        train_step(model, x)
    assert flops.get_total_flops() == eager_flops.get_total_flops() > 0  # a dispatch mode sees every op
    seen = []
    handle = model.encoder.self_layers[0][0].register_forward_hook(lambda *args: seen.append(1))
    try:
        for _ in range(encoder_graphs.WARMUP_CALLS + 2):
            train_step(model, x)
    finally:
        handle.remove()
    assert len(seen) == encoder_graphs.WARMUP_CALLS + 2  # the hook ran every call: nothing replayed past it

    class Wrapped(torch.nn.Linear):  # a module the package does not know (as a PEFT wrapper would be)
        pass

    fc1 = model.encoder.self_layers[0][0].mlp.fc1
    wrapped = Wrapped(fc1.in_features, fc1.out_features, device="cuda")
    wrapped.load_state_dict(fc1.state_dict())
    model.encoder.self_layers[0][0].mlp.fc1 = wrapped
    calls = count_eager_runs(monkeypatch)
    for _ in range(encoder_graphs.WARMUP_CALLS + 2):
        train_step(model, x)
    assert calls[0] == encoder_graphs.WARMUP_CALLS + 2
    assert not encoder_graphs._capture_failed


def test_new_parameters_and_inference(model, eager):
    x = torch.randn(4, 100, 24, device="cuda")
    for _ in range(encoder_graphs.WARMUP_CALLS + 1):
        train_step(model, x)
    for p in model.parameters():  # parameters moved to new memory (a load, `.to()`): the graph would read the old
        p.data = p.data.clone() * 1.5
    out, grads = train_step(model, x)
    with eager():
        want_out, want_grads = train_step(model, x)
    assert rel_err(out, want_out) <= REPLAY_REL_TOL
    assert_grads_close(grads, want_grads)

    model.eval()
    with torch.no_grad():
        with eager():
            want = forward(model, x).last_hidden_state.float()
        for _ in range(encoder_graphs.WARMUP_CALLS + 2):
            got = forward(model, x).last_hidden_state.float()
    assert rel_err(got, want) <= REPLAY_REL_TOL
    assert captured(model) == 2  # the first training signature's and the inference one's


def test_masked_calls_replay_with_each_calls_mask(eager, monkeypatch):
    """A padding mask is an input of the graph: each replay attends with the mask it is given (a sample without any
    valid key included), as the eager encoder does."""
    monkeypatch.setattr(encoder_graphs, "fuse_branches", False)
    encoder_graphs.reset()
    model = build(graph_config(), "sdpa", 0).cuda().train()
    x = torch.randn(4, 100, 24, device="cuda")

    def masked_step(mask):
        model.zero_grad(set_to_none=True)
        out = forward(model, x, attention_mask=mask).last_hidden_state
        out.float().square().mean().backward()
        return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for _ in range(encoder_graphs.WARMUP_CALLS + 1):
        masked_step(torch.rand(4, 100, device="cuda") < 0.8)
    assert captured(model) == 1
    mask = torch.rand(4, 100, device="cuda") < 0.5
    mask[2] = False  # no valid key: the cross-attention output of that sample is zero
    calls = count_eager_runs(monkeypatch)
    out, grads = masked_step(mask)
    assert calls[0] == 0
    with eager():
        want_out, want_grads = masked_step(mask)
    assert rel_err(out, want_out) <= REPLAY_REL_TOL
    assert_grads_close(grads, want_grads)
    assert captured(model) == 1
    encoder_graphs.reset()


def test_zero_tokens_never_capture():
    encoder_graphs.reset()
    model = build(graph_config(num_zero_tokens=2), "sdpa", 0).cuda().train()
    x = torch.randn(4, 100, 24, device="cuda")
    for _ in range(encoder_graphs.WARMUP_CALLS + 2):
        model.zero_grad(set_to_none=True)
        forward(model, x).last_hidden_state.float().mean().backward()
    assert captured(model) == 0
    encoder_graphs.reset()


def test_changing_shapes_and_no_room_stay_eager(model, eager, monkeypatch, caplog):
    """Shapes that keep changing stop being captured after MAX_CAPTURES; a capture without the free memory its
    warm-up showed it needs is not attempted (the signature runs eagerly, nothing else is affected)."""
    monkeypatch.setattr(encoder_graphs, "MAX_CAPTURES", 2)
    for n in (100, 101):
        for _ in range(encoder_graphs.WARMUP_CALLS + 1):
            train_step(model, torch.randn(4, n, 24, device="cuda"))
    assert encoder_graphs._state[model.encoder].captures == 2
    calls = count_eager_runs(monkeypatch)
    for _ in range(encoder_graphs.WARMUP_CALLS + 2):
        train_step(model, torch.randn(4, 102, 24, device="cuda"))
    assert calls[0] == encoder_graphs.WARMUP_CALLS + 2  # a third signature after two captures: every call eager
    assert captured(model) == 2 and encoder_graphs._state[model.encoder].captures == 2

    encoder_graphs.reset()
    monkeypatch.setattr(encoder_graphs, "_ROOM_FACTOR", 1e9)  # no device has that much free
    x = torch.randn(4, 100, 24, device="cuda")
    with caplog.at_level("WARNING", logger=encoder_graphs.__name__):
        for _ in range(encoder_graphs.WARMUP_CALLS + 3):
            out, grads = train_step(model, x)
    assert captured(model) == 0 and not encoder_graphs._capture_failed
    assert "free device memory" in caplog.text
    assert caplog.text.count("Not capturing") == 1  # refused once, not retried every call
    with eager():
        want_out, want_grads = train_step(model, x)
    assert rel_err(out, want_out) <= REPLAY_REL_TOL
    torch.nn.functional.dropout(torch.ones(8, device="cuda"), 0.5)  # CUDA's generator is untouched
    encoder_graphs.reset()


@pytest.mark.parametrize("repeats", [1, 3])
def test_replay_runs_the_fused_branches(monkeypatch, repeats):
    """By default a replay runs the fused residual branches (fused_block.py): the same values as those branches run
    eagerly, which test_cuda.py checks against the module path and the fp32 reference. With a repeated latent stack
    the capture sums the shared parameters' gradients as they are made (shared_gradients.py), once per backward,
    where the eager step leaves the sums to autograd: the same gradients."""
    from hf_flash_perceiver import shared_gradients
    from hf_flash_perceiver.fused_block import fused_branches

    takes = []
    original = shared_gradients.GradientSums.take
    monkeypatch.setattr(shared_gradients.GradientSums, "take", lambda self: takes.append(1) or original(self))
    encoder_graphs.reset()
    model = build(graph_config(latent_stack_repeats=repeats), "sdpa", 0).cuda().train()
    x = torch.randn(4, 100, 24, device="cuda")
    encoder_graphs.enabled = False
    try:
        with fused_branches(True):
            want_out, want_grads = train_step(model, x)
    finally:
        encoder_graphs.enabled = True
    assert not takes  # eagerly, autograd sums
    for _ in range(encoder_graphs.WARMUP_CALLS + 1):
        train_step(model, x)  # eager (module path) twice, then captured with the fused branches
    assert captured(model) == 1
    # The capture's side-stream warm-up backwards and the captured one each sum once; a model without repeats has
    # nothing to sum.
    assert (len(takes) > 0) == (repeats > 1), takes
    out, grads = train_step(model, x)
    assert rel_err(out, want_out) <= REPLAY_REL_TOL
    assert_grads_close(grads, want_grads)
    encoder_graphs.reset()


def test_replays_draw_the_wide_heads_dropout_from_the_generator():
    """A wide cross-attention head (no fused kernel takes it: two GEMMs around the Triton softmax, fused_softmax.py)
    with attention dropout, replayed: each replay draws a new dropout mask, from CUDA's generator, so that the same
    generator state gives the same step and the next step another mask (a seed frozen into the graph would repeat
    one mask every step)."""
    encoder_graphs.reset()
    cfg = graph_config(cross_heads=1, cross_head_dim=512, cross_attn_dropout=0.2, cross_qkv_bias=True)
    model = build(cfg, "sdpa", 0).cuda().train()
    x = torch.randn(4, 300, 24, device="cuda")
    for _ in range(encoder_graphs.WARMUP_CALLS + 1):
        train_step(model, x)
    assert captured(model) == 1
    torch.cuda.manual_seed(7)
    first, first_grads = train_step(model, x)
    second, _ = train_step(model, x)
    torch.cuda.manual_seed(7)
    again, again_grads = train_step(model, x)
    assert captured(model) == 1
    assert rel_err(second, first) > 1e-2  # another mask
    assert rel_err(again, first) <= REPLAY_REL_TOL  # the same generator state, the same mask
    assert_grads_close(again_grads, first_grads)
    encoder_graphs.reset()


def test_calls_before_a_capture_run_the_fused_branches_where_they_pay(monkeypatch):
    """The eager calls leading up to a capture run the fused branches where `fused_branches("auto")` takes them: not
    at this small model's size (the module path, as before), every branch with the work threshold at zero, and then
    with the values of those branches run eagerly; the capture after them replays as usual."""
    from hf_flash_perceiver import fused_block
    from hf_flash_perceiver.fused_block import fused_branches

    fused_calls = [0]
    original = fused_block._MLPBranch.forward

    def counted(ctx, *args):
        fused_calls[0] += 1
        return original(ctx, *args)

    monkeypatch.setattr(fused_block._MLPBranch, "forward", staticmethod(counted))
    x = torch.randn(4, 100, 24, device="cuda")
    for min_work, fused in [(fused_block.MIN_WORK, False), (0, True)]:
        monkeypatch.setattr(fused_block, "MIN_WORK", min_work)
        encoder_graphs.reset()
        model = build(graph_config(), "sdpa", 0).cuda().train()
        encoder_graphs.enabled = False
        try:
            with fused_branches(True) if fused else contextlib.nullcontext():
                want_out, want_grads = train_step(model, x)
        finally:
            encoder_graphs.enabled = True
        fused_calls[0] = 0
        for _ in range(encoder_graphs.WARMUP_CALLS):
            out, grads = train_step(model, x)
        assert captured(model) == 0
        assert (fused_calls[0] > 0) == fused, (min_work, fused_calls[0])
        assert rel_err(out, want_out) <= REPLAY_REL_TOL
        assert_grads_close(grads, want_grads)
        train_step(model, x)  # captures
        assert captured(model) == 1
    encoder_graphs.reset()


@pytest.mark.parametrize("kind", ["image", "io_regression"])
def test_trainer_with_graphs_trains_like_eager(tmp_path, kind, monkeypatch):
    """`Trainer` (bf16 autocast through accelerate, AdamW, clipping) with the switch on: the encoder is captured once
    and the logged losses follow the eager run's."""
    from transformers import Trainer

    from trainer_common import args, logged_losses, make_case

    monkeypatch.setattr(encoder_graphs, "fuse_branches", False)  # the same kernels as the eager run
    losses = {}
    for graphs in (False, True):
        encoder_graphs.reset()
        monkeypatch.setattr(encoder_graphs, "enabled", graphs)
        model, data = make_case(kind, n=16)
        trainer = Trainer(model=model, args=args(tmp_path, use_cpu=False, bf16=True, max_steps=12), train_dataset=data)
        trainer.train()
        losses[graphs] = logged_losses(trainer)
        state = encoder_graphs._state.get(model.perceiver.encoder)
        assert (0 if state is None else len(state.graphs)) == (1 if graphs else 0)
    assert not encoder_graphs._capture_failed
    assert len(losses[True]) == len(losses[False]) == 12
    # The same steps on the same kernels; bf16 rounding that differs run to run (see REPLAY_GRAD_REL_TOL) compounds
    # over the optimizer's steps.
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=2e-2, atol=1e-3)
    encoder_graphs.reset()


def test_reset_frees_the_graphs_memory():
    """Captures leave nothing allocated once their encoder's graphs are dropped: not the pools, not the workspaces of
    the capture stream (a stream per capture once kept a cuBLAS workspace each for the rest of the process)."""
    import gc

    encoder_graphs.reset()
    gc.collect()
    base = torch.cuda.memory_allocated()
    for _ in range(2):
        model = build(graph_config(), "sdpa", 0).cuda().train()
        for _ in range(encoder_graphs.WARMUP_CALLS + 2):
            train_step(model, torch.randn(4, 100, 24, device="cuda"))
        assert captured(model) == 1
        del model
        encoder_graphs.reset()
        gc.collect()
        assert torch.cuda.memory_allocated() - base <= 2**20

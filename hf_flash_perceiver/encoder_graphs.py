"""The encoder's forward (and, in training, its backward) replayed as CUDA graphs on the eager path.

An eager step of these models is bound by the host: the latent arrays are small, so the GPU finishes each of the
encoder's ~1 000 kernels faster than Python, autograd and the dispatcher issue the next one. A CUDA graph issues all
of them with one call. `torch.compile(mode="reduce-overhead")` does this for compiled models; here the eager encoder
is captured once its calls repeat with one signature, and replayed after that: under `Trainer` or a plain loop, with
no compilation.

On by default. `enabled = False` (or `HF_FLASH_PERCEIVER_ENCODER_GRAPHS=0` in the environment before import) turns
it off; `reset()` frees the graphs' memory. A capture that fails inside CUDA leaves CUDA's random-number generator
unusable for the rest of the process (the next dropout on the GPU raises), so everything that can be checked is
checked before capturing, and nothing is captured after one failure.

The capture follows `torch.cuda.make_graphed_callables` (warm-up, forward and backward graphs in one memory pool, one
autograd node replaying them), with what an automatic use needs on top:

- inputs and parameters enter the capture as leaves made on the capturing stream (sharing their memory): autograd
  ends a backward by waiting on the stream each leaf last ran on, and a parameter's own leaf node outlives a step
  whenever anything of the last step's graph does (a loss kept until the next iteration);
- parameter gradients leave as fresh tensors, never views of the graph's memory: autograd may keep such a view as
  `.grad`, and the next replay would overwrite it (accumulated gradients would come out doubled);
- the output is copied out of the graph, so that a `last_hidden_state` the caller keeps stays what it was;
- a graph's saved activations exist once: while the backward of one replay is still possible, another call of the
  encoder runs eagerly instead of replaying;
- a signature is captured after `WARMUP_CALLS` consecutive eager calls with it (one-off shapes never are), at most
  `MAX_GRAPHS` are kept per encoder and at most `MAX_CAPTURES` made (inputs whose shapes keep changing stay eager);
  a capture is not attempted without the free device memory its warm-up showed it needs;
- capture errors are thread-local: a data loader's pinning thread may call CUDA meanwhile.

What is captured is the eager encoder: same modules, same kernels, the same values up to the nondeterminism the
kernels already have, except that replays run the fused residual branches (`fuse_branches`), as do the eager calls
leading up to a capture where those branches have the work to pay for their launches (`_warm_up`). Padding masks are
inputs of the graph like the tokens (their values change from call to call, their shapes do not). Calls that record
outputs (attention maps, hidden states), carry zero tokens, context parallel shards, chunked cross-attention or
activation checkpointing, run under `torch.compile`, off CUDA, with a backend other than `sdpa`, or on modules with
hooks (FSDP, offloading, user hooks; transformers' inactive output recorders excepted), modules of other packages (a
PEFT wrapper), or under a dispatch mode, saved-tensor hooks or anomaly detection, are never captured and run eagerly.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:  # transformers' output recording (hidden states, attention maps): a replay would skip its hooks
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # a transformers without it: never capture rather than risk losing recorded outputs
    _active_collector = None

from .fused_activation import gated_activation
from .fused_block import fused_branches
from .fused_norm import FusedLayerNorm
from .shared_gradients import summed
from .weight_cast import project

logger = logging.getLogger(__name__)

# The switch, read at every call of the encoder: `hf_flash_perceiver.encoder_graphs.enabled = False` turns the graphs
# off, as does HF_FLASH_PERCEIVER_ENCODER_GRAPHS=0 in the environment (for launchers that start the training script).
enabled = os.environ.get("HF_FLASH_PERCEIVER_ENCODER_GRAPHS", "1").strip().lower() not in ("0", "false", "off", "no")
# The captured encoder runs the fused residual branches (fused_block.py) where they fit. Eagerly
# they are opt-in because each Triton launch costs more host time than the PyTorch ops it replaces; a replay costs no
# host time per kernel, so there they only save device time. Read when a signature is captured.
fuse_branches = True
# Consecutive eager calls with one signature before it is captured: a signature seen once (the last, smaller batch of
# an epoch; an evaluation batch) is not worth a capture.
WARMUP_CALLS = 2
# Graphs kept per encoder (each holds its activations' memory): training and evaluation, say.
MAX_GRAPHS = 2
# Captures per encoder, evicted ones included: inputs whose shapes cycle through more signatures than MAX_GRAPHS would
# otherwise be captured again and again (each capture costs a few eager steps).
MAX_CAPTURES = 8
# Free device memory a capture wants, as a multiple of what its warm-up forward kept alive (activations and output):
# the forward graph's pool holds that much, the backward's gradients and workspaces come on top. A capture that runs
# out of memory inside CUDA would leave the random-number generator unusable, so it is not attempted without room.
_ROOM_FACTOR = 2.5
# Iterations run on a side stream before capture, so that lazy initialisation (cuBLAS workspaces, cuDNN plans,
# Triton compilation) happens outside the graph.
_SIDE_STREAM_WARMUP = 2

_OUTPUT_RECORDER_MODULE = "transformers.utils.output_capturing"
# Set by a failed capture: CUDA's generator may be left mid-capture, and a second attempt would fail the same way.
_capture_failed = False


class _Pending:
    """Lives as long as the autograd node of one replay: while it does, that replay's backward may still run."""


class _Graphs:
    """Per encoder: the signature of the last call, how many calls in a row had it, the captured graphs and the
    replay whose backward is still possible."""

    def __init__(self) -> None:
        self.last_key: tuple | None = None
        self.streak = 0
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.pending: weakref.ref | None = None
        self.captures = 0
        self.refused: set[tuple] = set()  # signatures without the memory to capture them (or whose warm-up failed)

    def backward_pending(self) -> bool:
        return self.pending is not None and self.pending() is not None


_state: weakref.WeakKeyDictionary[nn.Module, _Graphs] = weakref.WeakKeyDictionary()


def _hooks_allow_capture(module: nn.Module) -> bool:
    """No hook would be skipped by a replay: none on the module or globally, except transformers' output recorders,
    which do nothing unless outputs are being recorded (and such calls are not captured)."""
    for hooks in (module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks):
        if hooks:
            return False
    return all(getattr(h, "__module__", None) == _OUTPUT_RECORDER_MODULE for h in module._forward_hooks.values())


_PACKAGE = __name__.rpartition(".")[0]


# Per module class, what `_type_info` found (the walk of `_layout` asks it for every module of every call).
_TYPES: dict[type, tuple[bool, bool]] = {}


def _type_info(kind: type) -> tuple[bool, bool]:
    """`(known, gradient_checkpointing)` for a module class: whether it is of this package or of `torch.nn`, code
    whose ops are known to capture (anything else, a PEFT wrapper or a user's replacement, runs eagerly: a capture
    that fails leaves CUDA's random-number state unusable for the rest of the process, so it is not attempted on
    unknown code), and its class-level `gradient_checkpointing` default."""
    info = _TYPES.get(kind)
    if info is None:
        owner = kind.__module__
        known = owner.startswith("torch.nn.") or owner.rpartition(".")[0] == _PACKAGE
        info = _TYPES[kind] = (known, bool(getattr(kind, "gradient_checkpointing", False)))
    return info


def _global_hooks() -> bool:
    return bool(
        _module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


def _switches() -> tuple:
    """The package's kernel switches (the `enabled` of fused_block, fused_activation, fused_norm, weight_cast), read
    from the module of a name each defines: Hub code sharing follows `from .x import y` imports, not `from . import x`."""
    return tuple(sys.modules[f.__module__].enabled for f in (fused_branches, gated_activation, FusedLayerNorm, project))


def _interposed() -> bool:
    """Something that must see every op or every saved tensor is active, and a replay would bypass it: a dispatch
    mode (FLOP counters, op counters), saved-tensor hooks (activation offloading), anomaly detection."""
    if _get_current_dispatch_mode() is not None or torch.is_anomaly_enabled():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _tensor_key(t: Tensor) -> tuple:
    return (tuple(t.shape), t.stride(), t.dtype, t.requires_grad)


def _layout(encoder: nn.Module, on_cuda: bool = True) -> tuple | None:
    """Each module's training flag (dropout follows it) and where each parameter lives, in `modules()` order; None
    if a module cannot be captured (hooks, unknown code, checkpointing) or a parameter is off the GPU (on it, with
    `on_cuda=False`)."""
    layout = []
    append = layout.append
    # Every call of the encoder pays for this walk: each test is made cheap where it passes (no call for hooks that
    # are not there, no nn.Module `__getattr__` miss for a flag that is not set), and the tree is walked with a stack
    # in `modules()` order (depth first, each module once) without the nested generators and the names of
    # `named_modules`, which cost more than the tests.
    stack = [encoder]
    seen = set()
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        known, checkpointing = _type_info(type(module))
        checkpointing = module.__dict__.get("gradient_checkpointing", checkpointing)
        hooked = (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                  or module._backward_pre_hooks)
        if not known or (checkpointing and module.training) or (hooked and not _hooks_allow_capture(module)):
            return None
        append(module.training)
        for p in module._parameters.values():
            if p is not None:
                if p.is_cuda != on_cuda:
                    return None
                append((p.data_ptr(), p.shape, p.dtype, p.requires_grad))
        children = module._modules
        if children:
            stack.extend(reversed([m for m in children.values() if m is not None]))
    return tuple(layout)


def signature(
    encoder: nn.Module, latents: Tensor, tensors: Sequence[Tensor], structure: tuple, attn_implementation: str
) -> tuple | None:
    """Everything a replay depends on besides tensor values: shapes, dtypes, grad mode and autocast, the package's
    kernel switches, the structure of the inputs, each module's training flag and where every parameter lives. None
    when the call cannot be captured."""
    if attn_implementation != "sdpa" or not latents.is_cuda or _global_hooks() or _interposed():
        return None
    layout = _layout(encoder)
    if layout is None:
        return None
    autocast = torch.is_autocast_enabled("cuda")
    return (
        latents.device, encoder.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast,
        torch.get_autocast_dtype("cuda") if autocast else None,
        _switches(), fuse_branches,
        _tensor_key(latents), tuple(_tensor_key(t) for t in tensors), structure, layout,
    )


_streams: dict[int, torch.cuda.Stream] = {}


def _capture_stream() -> torch.cuda.Stream:
    """The current device's side stream for warm-ups and captures: one per device and process, because cuBLAS keeps a
    workspace for every stream it has run on until the process ends."""
    device = torch.cuda.current_device()
    if device not in _streams:
        _streams[device] = torch.cuda.Stream()
    return _streams[device]


class _Refused(Exception):
    """A signature not captured, with nothing left behind: it runs eagerly from then on."""


def _make_room(need: int) -> None:
    """Raise `_Refused` unless `need` bytes of device memory are free (after returning the allocator's cached blocks
    if it takes that): a capture's pool cannot borrow the cached blocks of the eager pool."""
    if torch.cuda.mem_get_info()[0] >= need:
        return
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    if free < need:
        raise _Refused(f"it needs about {need / 2**20:.0f} MiB of free device memory, {free / 2**20:.0f} MiB are free")


class _Captured:
    """One captured signature: static inputs, the forward graph and (with grad) the backward graph."""

    def __init__(self, encoder: nn.Module, run: Callable[..., Tensor], inputs: Sequence[Tensor], fuse: bool):
        self.inputs = [torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t) for t in inputs]
        named = dict(encoder.named_parameters())
        self.params = list(named.values())
        grad = torch.is_grad_enabled()
        input_grads = [grad and t.requires_grad for t in inputs]
        self.needs_grad = input_grads + [grad and p.requires_grad for p in self.params]
        self.leaf_inputs = [t.is_leaf for t in inputs]
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")

        def call() -> tuple[list[Tensor], Tensor]:
            # What takes gradients enters as leaves made here, on the capturing stream, sharing memory with the
            # inputs and parameters: autograd waits at the end of a backward on the stream each leaf last ran on, and
            # a parameter's own leaf node outlives a step (held by any tensor of the last step's graph, such as a
            # loss kept until the next one) with the eager stream cached, which a capture must not wait on.
            leaves = [t.detach().requires_grad_() if needs else t for t, needs in zip(self.inputs, input_grads)]
            proxies = {name: p.detach().requires_grad_(grad and p.requires_grad) for name, p in named.items()}
            # Autocast's weight cache would hand the graph casts made outside it, which a replay would read stale.
            # The backward below takes the gradients of all the leaves at once, through every call: the gradients of
            # parameters that several calls share may be summed as they are made (shared_gradients.py).
            with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False), summed():
                with fused_branches(True) if fuse else nullcontext(), _reparametrize_module(encoder, proxies):
                    return [*leaves, *proxies.values()], run(*leaves)

        def wrt(leaves: list[Tensor]) -> list[Tensor]:
            return [t for t, needs in zip(leaves, self.needs_grad) if needs]

        # Warm-up and capture on one stream, so that nothing captured waits on a stream outside the capture.
        stream = _capture_stream()
        torch.cuda.synchronize()
        try:
            kept = 0
            with torch.cuda.stream(stream):
                for _ in range(_SIDE_STREAM_WARMUP):
                    before = torch.cuda.memory_allocated()
                    leaves, out = call()
                    kept = max(kept, torch.cuda.memory_allocated() - before)
                    if out.requires_grad and wrt(leaves):
                        torch.autograd.grad(out, wrt(leaves), torch.zeros_like(out), allow_unused=True)
                    del leaves, out
            torch.cuda.synchronize()
        except Exception as error:  # out of memory: nothing was captured yet, so nothing is left behind
            raise _Refused(f"its warm-up failed: {error}") from error
        grads = zip(self.params, self.needs_grad[len(inputs):])
        _make_room(int(_ROOM_FACTOR * kept) + sum(p.numel() * p.element_size() for p, needs in grads if needs))

        self.forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.forward_graph, stream=stream, capture_error_mode="thread_local"):
            leaves, output = call()
        self.grads: list[Tensor | None] = []
        self.backward_graph = None
        if output.requires_grad and wrt(leaves):
            with torch.cuda.stream(stream):
                self.grad_output = torch.empty_like(output)
            self.backward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                self.backward_graph, pool=self.forward_graph.pool(), stream=stream, capture_error_mode="thread_local"
            ):
                grads = iter(torch.autograd.grad(output, wrt(leaves), self.grad_output, allow_unused=True))
            self.grads = [next(grads) if needs else None for needs in self.needs_grad]
        torch.cuda.current_stream().wait_stream(stream)
        self.output = output.detach()
        self._plan_hand_out(len(inputs))

    def _plan_hand_out(self, n_inputs: int) -> None:
        """What the backward of each replay returns, worked out once: the gradients as leaves (detached), and which
        of them are copied first. Autograd may keep parameter (and leaf input) gradients as `.grad`: copies, not
        views of memory that the next replay overwrites; one multi-tensor kernel makes them."""
        self.hand_out = [None if g is None else g.detach() for g in self.grads]
        self.copied = [i for i, g in enumerate(self.hand_out)
                       if g is not None and (i >= n_inputs or self.leaf_inputs[i])]
        self.to_copy = [self.hand_out[i] for i in self.copied]

    def replay(self, inputs: Sequence[Tensor], state: _Graphs) -> Tensor:
        if self.backward_graph is None:
            for static, t in zip(self.inputs, inputs):
                static.copy_(t)
            self.forward_graph.replay()
            return self.output.clone()
        return _Replay.apply(self, state, *inputs, *self.params).clone()


class _Replay(torch.autograd.Function):
    """One autograd node for the captured encoder: forward replays the forward graph, backward the backward graph."""

    @staticmethod
    def forward(ctx, captured: _Captured, state: _Graphs, *surface: Tensor) -> Tensor:
        for static, t in zip(captured.inputs, surface):
            if static.data_ptr() != t.data_ptr():
                static.copy_(t)
        captured.forward_graph.replay()
        ctx.captured, ctx.state = captured, state
        ctx.pending = _Pending()
        state.pending = weakref.ref(ctx.pending)
        return captured.output.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        captured = ctx.captured
        captured.grad_output.copy_(grad)
        captured.backward_graph.replay()
        ctx.state.pending = None
        out = list(captured.hand_out)
        if captured.to_copy:
            for i, copy in zip(captured.copied, torch._foreach_mul(captured.to_copy, 1.0)):
                out[i] = copy
        return (None, None, *out)


def active() -> bool:
    """Whether calls may replay (the switch is on and no capture has failed): the encoder asks before preparing one."""
    return enabled and not _capture_failed


def run_encoder(
    encoder: nn.Module,
    run: Callable[..., Tensor],
    latents: Tensor,
    tensors: Sequence[Tensor],
    structure: tuple,
    attn_implementation: str,
) -> Tensor | None:
    """`run(latents, *tensors)` through a captured graph when this call's signature has one (capturing it when the
    signature has repeated), or eagerly here when the call may lead up to a capture (see `_warm_up`), else None: the
    caller then runs the encoder eagerly. `tensors` are the other inputs (tokens, mask tensors), `structure` how `run`
    assembles them: part of the signature."""
    global _capture_failed
    if not active() or torch.compiler.is_compiling() or not latents.is_cuda:
        return None
    if torch.cuda.is_current_stream_capturing() or _active_collector is None or _active_collector.get():
        return None
    inputs = [latents, *tensors]
    key = signature(encoder, latents, tensors, structure, attn_implementation)
    if key is None:
        return None
    state = _state.get(encoder)
    if state is None:
        state = _state[encoder] = _Graphs()
    if state.backward_pending():
        return None
    captured = state.graphs.get(key)
    if captured is None:
        if key in state.refused or state.captures >= MAX_CAPTURES:
            return None
        state.streak = state.streak + 1 if key == state.last_key else 1
        state.last_key = key
        if state.streak <= WARMUP_CALLS:
            return _warm_up(run, inputs)
        state.captures += 1
        try:
            with torch.cuda.device(latents.device):  # its side stream, memory checks and pool on the inputs' device
                captured = _Captured(encoder, run, inputs, fuse_branches and not _switches()[0])
        except _Refused as why:
            state.refused.add(key)
            logger.warning("Not capturing this call signature of the Perceiver encoder as a CUDA graph: %s. It runs "
                           "eagerly.", why)
            return None
        except Exception as error:  # an op that cannot be captured
            _capture_failed = True
            logger.warning(
                "Could not capture the Perceiver encoder as a CUDA graph (%s): it runs eagerly from now on. A failure "
                "inside the capture can leave CUDA's random-number generator unusable in this process (the next "
                "dropout on the GPU raises); if it does, restart with hf_flash_perceiver.encoder_graphs.enabled = "
                "False or HF_FLASH_PERCEIVER_ENCODER_GRAPHS=0.", error,
            )
            return None
        if state.captures == MAX_CAPTURES:
            logger.warning("The Perceiver encoder has been captured as a CUDA graph for %d call signatures (its input "
                           "shapes keep changing): calls of new signatures run eagerly from now on.", MAX_CAPTURES)
        state.graphs[key] = captured
        while len(state.graphs) > MAX_GRAPHS:
            state.graphs.popitem(last=False)
    state.graphs.move_to_end(key)
    return captured.replay(inputs, state)


def _warm_up(run: Callable[..., Tensor], inputs: Sequence[Tensor]) -> Tensor | None:
    """An eager call of a signature that may be captured, run with the fused branches where they have the work to pay
    for their host time (`fused_branches("auto")`); None (the caller runs the module path) where the capture would
    not fuse them either, or the user's own setting of `fused_block.enabled` applies.

    These calls, not the capture, would otherwise set a training run's peak memory: the module path keeps the fp32
    residual stream and the norms' outputs from forward to backward, where the fused branches that the capture and
    its replays run keep fp16 normalised rows. "auto", not every branch: a call of a signature that never repeats
    runs here too, and on small latent arrays the fused branches' Python launches cost more host time than the
    module path."""
    if not fuse_branches or _switches()[0]:
        return None
    with fused_branches("auto"):
        return run(*inputs)


def reset(encoder: nn.Module | None = None) -> None:
    """Drop the captured graphs (of `encoder`, or of every encoder), freeing their memory; with every encoder's, also
    the cuBLAS workspaces kept for the capture stream (cuBLAS makes new ones when it next runs)."""
    if encoder is not None:
        _state.pop(encoder, None)
        return
    _state.clear()
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if _streams and clear_workspaces is not None:
        torch.cuda.synchronize()
        clear_workspaces()


__all__ = [
    "MAX_CAPTURES", "MAX_GRAPHS", "WARMUP_CALLS", "active", "enabled", "fuse_branches", "reset", "run_encoder", "signature",
]

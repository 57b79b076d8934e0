"""A recorded call, and running it again exactly.

**The call.** Inputs are a tensor or a ``PackedSequence`` (one positional argument), a
tuple / list of tensors (positional arguments), a dict (keyword arguments, e.g.
``input_ids``, ``attention_mask``) -- Python scalars, strings and None pass through --
or a :class:`Call`, any call replayed exactly (one dict or tuple argument, nested
containers, lists of lengths, any objects).

**Its rows.** ``batch_rows``, ``select_rows``, ``cat_rows`` and ``detached_copy`` act on
any of those alike (the controller's subset and bottleneck buffer select and join rows
with them). Chunked evaluation slices every tensor whose leading size is the batch size
along dim 0, nested ones included, which is refused while a BatchNorm normalizes with
batch statistics (the result would depend on the chunking) and for a ``PackedSequence``
(its rows are interleaved by time step).

**Without side effects.** Every evaluation of ghoststep runs a model between training
steps, so it must leave the training run as if it had not happened: the CPU and CUDA RNG
streams restored (or replayed from a captured state, to draw the training forward's
dropout masks; with Python's ``random`` and NumPy's global generator when the state
carries them) and every buffer (BatchNorm running statistics, counters) bitwise
unchanged. It must also not inherit what surrounds it: an autocast block around
``opt.step()`` would otherwise run the measuring forwards in bfloat16
(:func:`autocast_as`).
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils import _pytree as pytree

__all__ = [
    "Call", "split_inputs", "batch_size", "chunks", "batch_coupled", "check_chunking",
    "check_row_slicing", "plain_value", "is_packed", "tensor_leaves",
    "batch_rows", "cat_rows", "detached_copy", "labels_of", "select_rows",
    "HALF", "AutocastState", "RNGState", "autocast_as", "autocast_state",
    "original_forward", "cuda_devices", "capture_rng", "replay_rng", "preserved_buffers",
]  # fmt: skip

_PASSTHROUGH = (bool, int, float, str, type(None))


class Call:
    """One forward call, replayed exactly: ``model(*args, **kwargs)``.

    The ``inputs`` of a call that is not a tensor, a tuple of positional tensors or a
    dict of keyword tensors: one dict / tuple / list argument
    (``Call({"x": x, "mask": m})`` for ``model({"x": x, "mask": m})``), a
    ``PackedSequence``, a list of lengths (``Call(x, [3, 5, 2])``), nested containers,
    any other objects. Nothing is re-split: the model receives these very objects.
    ``RadiusController`` hands a captured call of that kind to ``mask_fn``,
    ``targets_fn`` and ``extra_radii`` as a ``Call``; ``step(inputs=Call(...))`` passes
    one explicitly.

    Row operations (``subset``, ``buffer_size``, ``chunk_size``) select the rows of every
    tensor in it, at any depth, whose leading size is the batch size; other values
    (Python lists of lengths included) are passed unchanged, so per-row values meant to
    follow a row selection must be tensors. A ``PackedSequence`` cannot be row-sliced:
    those options are refused for it.

    Attributes:
        args, kwargs: the positional and keyword arguments, as given.
        targets: what the loss compares the logits with when the model does not receive
            it (e.g. the labels a Hugging Face Trainer pops before the forward under
            label smoothing); never passed to the model, its rows follow the inputs'
            rows; read by ``ignore_index`` (``targets_fn`` takes precedence). None: none.
    """

    __slots__ = ("args", "kwargs", "targets")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.targets = args, kwargs, None

    def with_targets(self, targets: Any) -> Call:
        """The same call carrying ``targets`` (see the class docstring)."""
        out = Call(*self.args, **self.kwargs)
        out.targets = targets
        return out

    def __reduce__(self):
        return (_rebuild_call, (self.args, self.kwargs, self.targets))

    def __repr__(self) -> str:
        parts = [_describe(a) for a in self.args]
        parts += [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        extra = "" if self.targets is None else f", targets={_describe(self.targets)}"
        return f"Call({', '.join(parts)}){extra}"


def _rebuild_call(args: tuple, kwargs: dict, targets: Any) -> Call:
    return Call(*args, **kwargs).with_targets(targets)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return type(value).__name__ if isinstance(value, (Mapping, tuple, list)) else repr(value)


pytree.register_pytree_node(
    Call,
    lambda call: ([call.args, call.kwargs, call.targets], None),
    lambda children, _: _rebuild_call(*children),
    serialized_type_name="ghoststep.Call",
)


def is_packed(value: Any) -> bool:
    """A ``PackedSequence`` (a leaf for the row operations: it cannot be row-sliced)."""
    return isinstance(value, PackedSequence)


def tensor_leaves(obj: Any) -> list:
    """The tensors and ``PackedSequence`` objects of a nested structure, in order."""
    leaves = pytree.tree_leaves(obj, is_leaf=is_packed)
    return [v for v in leaves if isinstance(v, torch.Tensor) or is_packed(v)]


def plain_value(value: Any) -> bool:
    """A tensor or a Python scalar / string / None (what a tuple or dict of inputs holds)."""
    return isinstance(value, torch.Tensor) or isinstance(value, _PASSTHROUGH)


def check_row_slicing(obj: Any, option: str) -> None:
    """Refuse ``option`` (a row operation: subset, buffer, chunks) on inputs holding a
    ``PackedSequence``, whose rows are interleaved by time step."""
    if any(is_packed(v) for v in tensor_leaves(obj)):
        raise ValueError(
            f"{option} selects rows of the inputs, but a PackedSequence cannot be "
            f"row-sliced (its rows are interleaved by time step); leave {option} unset, or "
            "pass padded tensors and their lengths and pack inside the model"
        )


def split_inputs(inputs) -> tuple[tuple, dict]:
    """Positional args and kwargs for the model from a tensor / ``PackedSequence`` (one
    argument), a tuple / list (positional), a dict (keyword) or a :class:`Call` (as is)."""

    def check(where: str, value):
        if plain_value(value):
            return value
        raise TypeError(
            f"{where} is a {type(value).__name__}; inputs must be tensors (Python scalars, "
            "strings and None are passed through). Convert arrays/lists with torch.as_tensor, "
            "or pass the exact call as ghoststep.Call(*args, **kwargs)"
        )

    if isinstance(inputs, Call):
        return tuple(inputs.args), dict(inputs.kwargs)
    if isinstance(inputs, torch.Tensor) or is_packed(inputs):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), {str(k): check(f"inputs[{k!r}]", v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(check(f"inputs[{i}]", v) for i, v in enumerate(inputs)), {}
    raise TypeError(
        f"inputs must be a tensor, a tuple/list of tensors (positional arguments), a "
        f"dict of tensors (keyword arguments) or a ghoststep.Call, got {type(inputs).__name__}"
    )


def batch_size(args: tuple, kwargs: dict) -> int:
    """The batch size: the leading size of the first tensor with a dimension in ``args``
    / ``kwargs`` (at any depth); :func:`chunks` slices the tensors of that leading size."""
    check_row_slicing((args, kwargs), "chunk_size")
    for v in tensor_leaves((args, kwargs)):
        if v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("chunk_size needs at least one tensor input with a batch dimension")


def chunks(args: tuple, kwargs: dict, chunk_size: int | None):
    """Yield ``(start, stop, args, kwargs)`` slices of the inputs along dim 0: every
    tensor, at any depth, whose leading size is the batch size (:func:`batch_size`) is
    sliced; everything else is passed as is to every chunk."""
    if chunk_size is None:
        yield 0, None, args, kwargs
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = batch_size(args, kwargs)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        a, k = pytree.tree_map_only(
            torch.Tensor,
            lambda v, s=s, e=e: v[s:e] if v.dim() > 0 and v.shape[0] == n else v,
            (args, kwargs),
        )
        yield s, e, tuple(a), k


def batch_coupled(model: nn.Module) -> list[str]:
    """Names of BatchNorm modules that normalize with batch statistics right now."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or not m.track_running_stats
        ):
            out.append(name or type(m).__name__)
    return out


def check_chunking(model: nn.Module, args, kwargs, chunk_size) -> None:
    """Refuse a chunking that would split a batch a BatchNorm normalizes over."""
    if chunk_size is None:
        return
    coupled = batch_coupled(model)
    if coupled and chunk_size < batch_size(args, kwargs):
        raise ValueError(
            f"chunk_size={chunk_size} would split the batch, but BatchNorm module "
            f"{coupled[0]!r} uses batch statistics (train mode), so the slopes would depend "
            "on the chunking. Use chunk_size=None, or model.eval() if running statistics "
            "are what you want to measure"
        )


# ---------------------------------------------------------------------- rows


def labels_of(inputs):
    """The labels of ``inputs`` (dict: ``"labels"``; ``Call``: its ``labels`` keyword
    argument, else its ``targets``), or None."""
    if isinstance(inputs, Call):
        labels = inputs.kwargs.get("labels")
        return inputs.targets if labels is None else labels
    if isinstance(inputs, Mapping):
        return inputs.get("labels")
    return None


def detached_copy(obj):
    """The structure with every tensor detached and cloned (checkpoints, the buffer)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), obj)


def batch_rows(obj) -> int | None:
    """Batch size: the leading size of the first tensor with at least one dimension (a
    ``PackedSequence``: its number of sequences)."""
    for t in tensor_leaves(obj):
        if is_packed(t):
            return int(t.batch_sizes[0]) if t.batch_sizes.numel() else 0
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def select_rows(obj, idx: torch.Tensor, rows: int):
    """Rows ``idx`` of every tensor whose leading size is ``rows``; others unchanged."""

    def pick(t: torch.Tensor) -> torch.Tensor:
        if t.dim() >= 1 and t.shape[0] == rows:
            return t.index_select(0, idx.to(t.device))
        return t

    return pytree.tree_map_only(torch.Tensor, pick, obj)


def cat_rows(a, b, rows_a: int, rows_b: int | None):
    """``a`` and ``b`` concatenated along rows (tensors with ``rows_a`` / ``rows_b``
    leading rows; other leaves taken from ``a``); None if the structures, per-row
    shapes or dtypes do not match."""
    if rows_b is None:
        return None
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return None
    out = []
    for u, w in zip(leaves_a, leaves_b, strict=True):
        if not (isinstance(u, torch.Tensor) and isinstance(w, torch.Tensor)):
            out.append(u)
        elif u.dim() >= 1 and w.dim() >= 1 and u.shape[0] == rows_a and w.shape[0] == rows_b:
            if u.shape[1:] != w.shape[1:] or u.dtype != w.dtype:
                return None
            out.append(torch.cat([u, w.to(u.device)], 0))
        else:
            out.append(u)
    return pytree.tree_unflatten(out, spec_a)


# ---------------------------------------------------------------------- without side effects


# (CPU generator state, {CUDA device index: generator state}[, host state]); the host
# state (:func:`capture_host_rng`) is there when the evaluation replays Python's
# ``random`` and NumPy's global generator too
RNGState = tuple[torch.Tensor, dict[int, torch.Tensor]] | tuple[Any, ...]
# ((device type, autocast dtype), ...) of the device types with autocast enabled
AutocastState = tuple[tuple[str, torch.dtype], ...]
_AUTOCAST_DEVICES = ("cpu", "cuda")
# The 16-bit floating dtypes: parameters, buffers or autocast in them need the JVP and
# wider margins (a secant in them is off by 1e-2 or more).
HALF = (torch.bfloat16, torch.float16)


def _autocast_of(device: str) -> torch.dtype | None:
    try:
        enabled = torch.is_autocast_enabled(device)
        return torch.get_autocast_dtype(device) if enabled else None
    except TypeError:  # pragma: no cover - torch < 2.4: no device argument
        if device == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def autocast_state() -> AutocastState:
    """The autocast in effect now, e.g. ``(("cpu", torch.bfloat16),)``; ``()`` if none."""
    state = []
    for device in _AUTOCAST_DEVICES:
        dtype = _autocast_of(device)
        if dtype is not None:
            state.append((device, dtype))
    return tuple(state)


@contextlib.contextmanager
def autocast_as(state: AutocastState):
    """Run the block under exactly the autocast ``state`` (from :func:`autocast_state`;
    ``()``: none), whatever autocast surrounds it."""
    with contextlib.ExitStack() as stack:
        for device, _ in autocast_state():
            stack.enter_context(torch.autocast(device, enabled=False))
        for device, dtype in state:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        yield


@contextlib.contextmanager
def original_forward(model: nn.Module):
    """Run the block with the model's own forward where Accelerate's mixed precision
    replaced ``model.forward`` by one that enters autocast itself (it keeps the
    original as ``model._original_forward``); a forward that must run without autocast
    (a float32 secant) could not turn that one off from outside."""
    wrapped = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield
        return
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


def cuda_devices(model: nn.Module) -> list[int]:
    """Indices of the CUDA devices holding the model's parameters (for the RNG)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def capture_rng(devices: Sequence[int] = (), *, host: bool = False) -> RNGState:
    """The CPU RNG state and those of the given CUDA devices (no device sync); with
    ``host``, also Python's ``random`` and NumPy's global generator (a forward that
    draws from them, e.g. a LayerDrop, then replays its choices)."""
    cpu, cuda = torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices}
    return (cpu, cuda, capture_host_rng()) if host else (cpu, cuda)


def capture_host_rng() -> tuple[Any, Any]:
    """``(random.getstate(), numpy.random.get_state() or None)``: NumPy's only when it
    is imported already (a few microseconds; 2.5 KB each)."""
    numpy = sys.modules.get("numpy")
    return random.getstate(), None if numpy is None else numpy.random.get_state()


@contextlib.contextmanager
def replay_rng(devices: Sequence[int], state: RNGState | None = None):
    """Run from ``state`` (default: the current state); restore the RNG afterwards
    (Python's and NumPy's too when ``state`` carries them)."""
    host = state[2] if state is not None and len(state) > 2 else None
    with torch.random.fork_rng(devices=list(devices)), _replay_host(host):
        if state is not None:
            torch.set_rng_state(state[0])
            for device, s in state[1].items():
                torch.cuda.set_rng_state(s, device)
        yield


@contextlib.contextmanager
def _replay_host(state):
    """Run from a :func:`capture_host_rng` state and restore the current one after."""
    if state is None:
        yield
        return
    saved = capture_host_rng()
    random.setstate(state[0])
    numpy = sys.modules.get("numpy")
    if numpy is not None and state[1] is not None:
        numpy.random.set_state(state[1])
    try:
        yield
    finally:
        random.setstate(saved[0])
        if numpy is not None and saved[1] is not None:
            numpy.random.set_state(saved[1])


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Leave every buffer bitwise as it was on exit (BatchNorm running statistics,
    counters), at the cost of two fused copies of the buffers no BatchNorm owns.

    Train-mode BatchNorm layers run the block with ``track_running_stats=False``: they
    normalize with the batch statistics as before and write no buffer (one kernel
    launch per buffer saved and restored matters on a GPU: ResNet-18 has 60).
    """
    quiet = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    untouched = {id(b) for m in quiet for b in m.buffers(recurse=False)}
    buffers = [b.detach() for b in model.buffers() if id(b) not in untouched]
    saved = [torch.empty_like(b) for b in buffers]
    if buffers:
        with torch.no_grad():
            torch._foreach_copy_(saved, buffers)
    for m in quiet:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in quiet:
            m.track_running_stats = True
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)

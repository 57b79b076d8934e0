"""Directional logit slopes of any PyTorch model, and the radius measurement built on them.

Along a parameter step ``theta + t v`` the logits of every sample move, to first order,
as ``z + a t`` with slopes ``a = J_z(x) v``: one forward-mode Jacobian-vector product
per batch. ``logit_slopes`` computes ``(z, a)``; ``measure`` turns them into the
per-sample spread ``Delta a = max_k a_k - min_k a_k``, the radius ``rho_a = pi T /
Delta a``, the batch radius, its bottleneck sample and the normalized step
``r = ||p|| / rho_a`` (see ``ghoststep.radius`` for the math).

Semantics (what exactly is differentiated)
-------------------------------------------
* The model is evaluated **in its current mode** (``model.training`` is never
  changed). That is the function a training step changes: in train mode BatchNorm
  uses batch statistics and dropout draws a mask. Under ``jvp`` primal and tangent
  share that mask.
* **No side effects.** Parameters are never written (``torch.func.functional_call``
  substitutes them); buffers are cloned *inside* the differentiated function, so
  BatchNorm running statistics and ``num_batches_tracked`` are bitwise unchanged;
  the CPU (and the model's CUDA devices') RNG state is restored with
  ``torch.random.fork_rng``, so the training RNG stream is the same as if the
  measurement had not happened; everything runs under ``torch.no_grad`` (no
  autograd graph).
* ``method="jvp"``: ``torch.func.jvp`` of ``functional_call``, one pass, exact.
  ``method="fd"``: central difference ``(f(theta + h v) - f(theta - h v)) / 2h`` in
  float64 where the device has it (parameters, floating buffers and floating inputs
  are cast; the module is not copied or modified), each evaluation from the same RNG
  state (same dropout mask; the returned logits come from the float64 evaluation at
  theta, rounded to the parameters' dtype). Default step: ``h = eps^(1/3) / ||v||``
  with ``eps`` the float64 machine epsilon, i.e. a parameter displacement of about
  6e-6, which balances the O(h^2) truncation error against the O(eps / h) round-off
  error.
  Costs three forwards and a float64 copy of the parameters and buffers.

Directions
----------
Only parameters with ``requires_grad=True`` take part, in the order (and with the
names) of ``model.named_parameters()`` (tied weights are listed once, under their
first name). A direction is one of

* a dict ``{name: tensor}`` (or keyed by the parameter objects themselves); every
  trainable parameter needs an entry (``None`` means zero), entries for frozen
  parameters are ignored, unknown names are an error; an alias name of a tied weight
  is accepted;
* a sequence aligned with ``[p for p in model.parameters() if p.requires_grad]``
  (``None`` entries mean zero);
* one flat 1-D tensor of length ``sum(p.numel())`` over that same list, in that order.

Reference: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026), section 3.

>>> import torch
>>> from ghoststep.slopes import logit_slopes, measure, random_direction
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> x = torch.randn(5, 4)
>>> v = random_direction(model, seed=1)
>>> logits, slopes = logit_slopes(model, x, v)
>>> slopes.shape
torch.Size([5, 3])
>>> m = measure(model, x, v, step_norm=0.1)
>>> m.n_samples
5
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp

from ghoststep.radius import aggregate as _aggregate
from ghoststep.radius import exact_radius, logit_spread, normalized_step, top2_radius

__all__ = [
    "Measurement",
    "logit_slopes",
    "per_sample_spread",
    "measure",
    "flatten_samples",
    "gradient_direction",
    "random_direction",
    "optimizer_update_direction",
    "direction_norm",
    "trainable_parameters",
]

_METHODS = ("jvp", "fd")
_PASSTHROUGH = (bool, int, float, str, type(None))


# ---------------------------------------------------------------- parameters / directions


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad``, in model order.

    Raises:
        ValueError: the model has no trainable parameter.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "model has no trainable parameters (none with requires_grad=True); "
            "there is no direction to move along"
        )
    return named


def _alias_map(model: nn.Module) -> dict[str, str]:
    """Every parameter name (tied aliases included) -> its canonical name."""
    canonical: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = canonical.setdefault(id(p), name)
    return out


def _resolve_direction(model: nn.Module, direction) -> list[torch.Tensor]:
    """Validate ``direction`` and return one tangent per trainable parameter."""
    named = trainable_parameters(model)
    names = [n for n, _ in named]
    entries: list[Any]
    if isinstance(direction, torch.Tensor):
        total = sum(p.numel() for _, p in named)
        if direction.dim() != 1 or direction.numel() != total:
            raise ValueError(
                f"a tensor direction must be one flat 1-D vector of length {total} "
                f"(all trainable parameters), got shape {tuple(direction.shape)}"
            )
        entries, offset = [], 0
        for _, p in named:
            entries.append(direction[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
    elif isinstance(direction, Mapping):
        aliases = _alias_map(model)
        by_id = {id(p): n for n, p in model.named_parameters()}
        trainable = set(names)
        given: dict[str, Any] = {}
        for key, value in direction.items():
            if isinstance(key, torch.Tensor):
                if id(key) not in by_id:
                    raise ValueError("direction is keyed by a tensor that is not a model parameter")
                name = by_id[id(key)]
            elif isinstance(key, str):
                if key not in aliases:
                    raise ValueError(f"direction names unknown parameter {key!r}")
                name = aliases[key]
            else:
                raise ValueError(f"direction keys must be parameter names, got {key!r}")
            if name not in trainable:
                continue  # frozen parameter: takes no part
            if name in given:
                raise ValueError(f"direction gives parameter {name!r} twice (tied alias?)")
            given[name] = value
        missing = [n for n in names if n not in given]
        if missing:
            raise ValueError(
                f"direction has no entry for trainable parameter {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; use None for a zero component"
            )
        entries = [given[n] for n in names]
    elif isinstance(direction, Sequence) and not isinstance(direction, str):
        if len(direction) != len(named):
            raise ValueError(
                f"direction has {len(direction)} entries but the model has {len(named)} "
                "trainable parameters (aligned with [p for p in model.parameters() "
                "if p.requires_grad])"
            )
        entries = list(direction)
    else:
        raise ValueError(
            "direction must be a dict {name: tensor}, a sequence of tensors aligned with "
            f"the trainable parameters, or a flat tensor; got {type(direction).__name__}"
        )

    tangents = []
    for (name, p), value in zip(named, entries, strict=True):
        if value is None:
            tangents.append(torch.zeros_like(p, memory_format=torch.contiguous_format))
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"direction for parameter {name!r} must be a tensor, got {type(value).__name__}"
            )
        if value.shape != p.shape:
            raise ValueError(
                f"direction for parameter {name!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(p.shape)}"
            )
        if not (value.is_floating_point() or value.is_complex()):
            raise ValueError(
                f"direction for parameter {name!r} must be floating, got {value.dtype}"
            )
        value = value.detach().to(device=p.device, dtype=p.dtype)
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"direction for parameter {name!r} has non-finite values")
        tangents.append(value)
    return tangents


def direction_norm(direction, model: nn.Module | None = None) -> torch.Tensor:
    """Global L2 norm of a direction (dict, sequence or flat tensor), as a 0-d tensor.

    With ``model`` the direction is first resolved against its trainable parameters
    (frozen entries dropped); without, all tensor entries count.
    """
    if model is not None:
        parts = _resolve_direction(model, direction)
    elif isinstance(direction, torch.Tensor):
        parts = [direction]
    elif isinstance(direction, Mapping):
        parts = [t for t in direction.values() if t is not None]
    else:
        parts = [t for t in direction if t is not None]
    if not parts:
        return torch.zeros(())
    return torch.sqrt(sum(t.detach().double().pow(2).sum().cpu() for t in parts))


# ------------------------------------------------------------------------- inputs


def _split_inputs(inputs) -> tuple[tuple, dict]:
    """Positional args and kwargs for the model from a tensor, sequence or dict."""

    def check(where: str, value):
        if isinstance(value, torch.Tensor) or isinstance(value, _PASSTHROUGH):
            return value
        raise TypeError(
            f"{where} is a {type(value).__name__}; inputs must be tensors (Python scalars, "
            "strings and None are passed through). Convert arrays/lists with torch.as_tensor"
        )

    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), {str(k): check(f"inputs[{k!r}]", v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(check(f"inputs[{i}]", v) for i, v in enumerate(inputs)), {}
    raise TypeError(
        f"inputs must be a tensor, a tuple/list of tensors (positional arguments) or a "
        f"dict of tensors (keyword arguments), got {type(inputs).__name__}"
    )


def _batch_size(args: tuple, kwargs: dict) -> int:
    sizes = {
        v.shape[0] for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0
    }
    if not sizes:
        raise ValueError("chunk_size needs at least one tensor input with a batch dimension")
    if len(sizes) > 1:
        raise ValueError(
            f"chunk_size splits every tensor input along dim 0, but their leading sizes "
            f"differ: {sorted(sizes)}"
        )
    return sizes.pop()


def _chunks(args: tuple, kwargs: dict, chunk_size: int | None):
    """Yield ``(start, stop, args, kwargs)`` slices of the inputs along dim 0."""
    if chunk_size is None:
        yield 0, None, args, kwargs
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    n = _batch_size(args, kwargs)

    def cut(v, s, e):
        return v[s:e] if isinstance(v, torch.Tensor) and v.dim() > 0 else v

    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        yield s, e, tuple(cut(v, s, e) for v in args), {k: cut(v, s, e) for k, v in kwargs.items()}


def _batch_coupled(model: nn.Module) -> list[str]:
    """Names of BatchNorm modules that normalize with batch statistics right now."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
            m.training or not m.track_running_stats
        ):
            out.append(name or type(m).__name__)
    return out


def default_logits_fn(output) -> torch.Tensor:
    """Pick the logits: a tensor itself, ``.logits``, ``["logits"]``, or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        values = []
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; "
        "pass logits_fn=... to pick them"
    )


# ---------------------------------------------------------------------- evaluation


def _rng_fork(model: nn.Module):
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    return torch.random.fork_rng(devices=devices)


_FWD_AD = re.compile(r"forward AD with ([\w.:]+)")


def _forward_ad_error(err: BaseException) -> NotImplementedError | None:
    match = _FWD_AD.search(str(err))
    if match is None:
        return None
    op = match.group(1)
    hint = ""
    if "scaled_dot_product" in op or "attention" in op:
        hint = (
            " For F.scaled_dot_product_attention (nn.TransformerEncoderLayer, Hugging Face "
            "models) select the math kernel: `with torch.nn.attention.sdpa_kernel("
            "torch.nn.attention.SDPBackend.MATH):`, or load Hugging Face models with "
            'attn_implementation="eager".'
        )
    elif "rnn" in op or "lstm" in op.lower():
        hint = " For CPU LSTMs wrap the call in `torch.backends.mkldnn.flags(enabled=False)`."
    return NotImplementedError(
        f"forward-mode AD is not implemented for the op {op!r} used by this model, so "
        f'method="jvp" cannot run. Use method="fd" (central finite differences).{hint}'
    )


class _Evaluator:
    """Computes ``(logits, slopes)`` for slices of the inputs, side-effect free."""

    def __init__(self, model, direction, method, logits_fn, fd_step):
        if method not in _METHODS:
            raise ValueError(f'method must be "jvp" or "fd", got {method!r}')
        named = trainable_parameters(model)
        self.model = model
        self.method = method
        self.logits_fn = logits_fn or default_logits_fn
        self.names = [n for n, _ in named]
        self.params = tuple(p.detach() for _, p in named)
        self.tangents = tuple(_resolve_direction(model, direction))
        trainable = set(self.names)
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if n not in trainable}
        self.buffers = {n: b for n, b in model.named_buffers()}
        self.fd_step = fd_step
        if method == "fd":
            self._prepare_fd()

    def _call(self, params, frozen, buffers, args, kwargs):
        # Buffers are cloned inside the evaluated function: BatchNorm's in-place running
        # stat updates hit the clones, never the module's tensors.
        state = {n: b.clone() for n, b in buffers.items()}
        state.update(frozen)
        state.update(zip(self.names, params, strict=True))
        out = functional_call(self.model, state, args, kwargs, tie_weights=True, strict=False)
        logits = self.logits_fn(out)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits_fn must return a tensor, got {type(logits).__name__}")
        return logits

    # -- finite differences
    def _prepare_fd(self):
        device = self.params[0].device
        wide = torch.float32 if device.type == "mps" else torch.float64

        def up(t):
            return t.to(wide) if t.is_floating_point() else t

        self.wide = up
        self.params64 = tuple(up(p) for p in self.params)
        self.tangents64 = tuple(up(t) for t in self.tangents)
        self.frozen64 = {n: up(p) for n, p in self.frozen.items()}
        self.buffers64 = {n: up(b) for n, b in self.buffers.items()}
        vnorm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in self.tangents64))
        self.vnorm = vnorm
        if self.fd_step is None:
            eps = torch.finfo(wide).eps
            self.h = eps ** (1.0 / 3.0) / vnorm if vnorm > 0 else 0.0
        else:
            if not (isinstance(self.fd_step, (int, float)) and self.fd_step > 0):
                raise ValueError(f"fd_step must be a positive number, got {self.fd_step!r}")
            self.h = float(self.fd_step)

    def __call__(self, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.method == "jvp":

            def f(params):
                return self._call(params, self.frozen, self.buffers, args, kwargs)

            with _rng_fork(self.model):
                try:
                    return jvp(f, (self.params,), (self.tangents,))
                except (NotImplementedError, RuntimeError) as err:
                    better = _forward_ad_error(err)
                    if better is None:
                        raise
                    raise better from err
        # All three evaluations run in the wide dtype from the same RNG state, so the
        # returned logits and the slopes share one dropout mask (on CUDA the float32
        # and float64 masks differ); the logits are rounded to the parameters' dtype.
        args64 = tuple(self.wide(a) if isinstance(a, torch.Tensor) else a for a in args)
        kwargs64 = {
            k: self.wide(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
        }
        outs = []
        steps = (0.0,) if self.h == 0.0 else (0.0, 1.0, -1.0)
        for sign in steps:
            shifted = tuple(
                p + (sign * self.h) * t for p, t in zip(self.params64, self.tangents64, strict=True)
            )
            with _rng_fork(self.model):
                outs.append(self._call(shifted, self.frozen64, self.buffers64, args64, kwargs64))
        dtype = self.params[0].dtype
        logits = outs[0].to(dtype)
        if self.h == 0.0:
            return logits, torch.zeros_like(logits)
        slopes = (outs[1] - outs[2]) / (2.0 * self.h)
        return logits, slopes.to(dtype)


@contextlib.contextmanager
def _guarded(model: nn.Module):
    """no_grad, and a check that the mode is what it was (functional calls never change it)."""
    training = model.training
    try:
        with torch.no_grad():
            yield
    finally:
        if model.training != training:  # pragma: no cover - defensive
            model.train(training)


def _check_chunking(model: nn.Module, args, kwargs, chunk_size) -> None:
    if chunk_size is None:
        return
    coupled = _batch_coupled(model)
    if coupled and chunk_size < _batch_size(args, kwargs):
        raise ValueError(
            f"chunk_size={chunk_size} would split the batch, but BatchNorm module "
            f"{coupled[0]!r} uses batch statistics (train mode), so the slopes would depend "
            "on the chunking. Use chunk_size=None, or model.eval() if running statistics "
            "are what you want to measure"
        )


def logit_slopes(
    model: nn.Module,
    inputs,
    direction,
    *,
    method: str = "jvp",
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    chunk_size: int | None = None,
    fd_step: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``z`` and directional logit slopes ``a = J_z(x) v`` of every sample.

    Args:
        model: any ``nn.Module``; evaluated in its current mode, without side effects
            (see the module docstring).
        inputs: a tensor, a tuple/list of tensors (positional arguments) or a dict
            (keyword arguments, e.g. ``input_ids``, ``attention_mask``).
        direction: parameter-space direction v (dict, aligned sequence or flat
            tensor; see the module docstring). It need not be unit norm: the slopes
            are linear in v.
        method: ``"jvp"`` (forward-mode AD, exact) or ``"fd"`` (float64 central
            difference).
        logits_fn: maps the model output to the logits tensor; default
            ``default_logits_fn`` (tensor, ``.logits``, ``["logits"]``, first tensor).
        chunk_size: evaluate the input batch in slices of this many rows (dim 0) and
            concatenate. Not allowed when a BatchNorm uses batch statistics (the
            slopes would depend on the chunking).
        fd_step: step h for ``method="fd"`` (theta +- h v); default eps^(1/3)/||v||.
    Returns:
        ``(logits, slopes)``, both shaped like the model's logits (e.g. (B, K) or
        (B, T, V)); slopes in logit units per unit of t along v.
    Raises:
        ValueError: bad direction (names the parameter), bad method or chunk_size, no
            trainable parameters.
        TypeError: non-tensor inputs.
        NotImplementedError: an op without forward-mode AD (names it, suggests fixes).
    """
    args, kwargs = _split_inputs(inputs)
    evaluator = _Evaluator(model, direction, method, logits_fn, fd_step)
    _check_chunking(model, args, kwargs, chunk_size)
    with _guarded(model):
        parts = [evaluator(a, k) for _, _, a, k in _chunks(args, kwargs, chunk_size)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ------------------------------------------------------------------- sample handling


def _valid_mask(sample_shape, mask, targets, ignore_index, device) -> torch.Tensor | None:
    keep = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(sample_shape):
            raise ValueError(
                f"mask must have the sample shape {tuple(sample_shape)} (logits without the "
                f"class axis), got {tuple(mask.shape)}"
            )
        keep = mask.to(device=device, dtype=torch.bool)
    if ignore_index is not None:
        if targets is None:
            raise ValueError("ignore_index needs targets")
        not_ignored = targets.to(device) != ignore_index
        keep = not_ignored if keep is None else keep & not_ignored
    return keep


def _check_targets(targets, sample_shape):
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be an integer tensor, got {type(targets).__name__}")
    if tuple(targets.shape) != tuple(sample_shape):
        raise ValueError(
            f"targets must have the sample shape {tuple(sample_shape)}, got {tuple(targets.shape)}"
        )


def flatten_samples(
    logits: torch.Tensor, slopes: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of samples: (..., V) -> (N, V), keeping positions where ``mask`` is True.

    Every leading position is one sample (a sequence model's (B, T, V) logits are
    B*T samples), in row-major order.

    Args:
        logits: (..., V).
        slopes: optional, same shape as logits.
        mask: optional bool tensor of shape ``logits.shape[:-1]``; False drops a
            position (padding).
    Returns:
        ``(logits_rows, slopes_rows)`` of shape (N, V); ``slopes_rows`` is None when
        ``slopes`` is None.
    """
    if slopes is not None and slopes.shape != logits.shape:
        raise ValueError(
            f"slopes shape {tuple(slopes.shape)} differs from logits {tuple(logits.shape)}"
        )
    keep = _valid_mask(logits.shape[:-1], mask, None, None, logits.device)
    v = logits.shape[-1]
    rows = logits.reshape(-1, v)
    srows = slopes.reshape(-1, v) if slopes is not None else None
    if keep is not None:
        flat = keep.reshape(-1)
        rows = rows[flat]
        srows = srows[flat] if srows is not None else None
    return rows, srows


def _spread_map(evaluator, model, args, kwargs, chunk_size, want_full: bool):
    """Per-position spread (sample shape); optionally also full logits and slopes.

    With ``want_full=False`` every chunk's tangent is reduced to its spread at once,
    so only one chunk's logits and tangent are alive at a time.
    """
    spreads, logits_parts, slope_parts = [], [], []
    with _guarded(model):
        for _, _, a, k in _chunks(args, kwargs, chunk_size):
            logits, slopes = evaluator(a, k)
            spreads.append(logit_spread(slopes))  # NaN for a row with a non-finite slope
            if want_full:
                logits_parts.append(logits)
                slope_parts.append(slopes)
            del logits, slopes
    spread = torch.cat(spreads)
    if want_full:
        return spread, torch.cat(logits_parts), torch.cat(slope_parts)
    return spread, None, None


def per_sample_spread(
    model: nn.Module,
    inputs,
    direction,
    *,
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
    method: str = "jvp",
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    fd_step: float | None = None,
) -> torch.Tensor:
    """Per-sample spread Delta a = max_k a_k - min_k a_k, memory-lean.

    With ``chunk_size`` the input batch is split along dim 0 and each chunk's
    (chunk, ..., V) tangent is reduced to its spread immediately: the full tangent
    is never materialized, so the peak memory is that of one chunk's forward plus
    its tangent (for a (8 x 1024, 50257) language model head and ``chunk_size=1``,
    well under twice the plain forward's peak; see
    ``benchmarks/bench_slopes_memory.py``). Chunking is for models without
    batch-coupled layers (BatchNorm in train mode raises).

    Args:
        model, inputs, direction, method, logits_fn, fd_step: as in ``logit_slopes``.
        chunk_size: rows of the input batch per evaluation (None: one pass).
        mask: optional bool tensor of the sample shape (logits without the class
            axis); False positions are dropped.
    Returns:
        (N,) spreads of the kept samples in row-major (flattened) order.
    """
    args, kwargs = _split_inputs(inputs)
    evaluator = _Evaluator(model, direction, method, logits_fn, fd_step)
    _check_chunking(model, args, kwargs, chunk_size)
    spread, _, _ = _spread_map(evaluator, model, args, kwargs, chunk_size, want_full=False)
    keep = _valid_mask(spread.shape, mask, None, None, spread.device)
    flat = spread.reshape(-1)
    return flat if keep is None else flat[keep.reshape(-1)]


# ---------------------------------------------------------------------- measurement


def _scalar(x) -> float | None:
    if x is None:
        return None
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _as_list(x: torch.Tensor | None):
    return None if x is None else x.detach().cpu().tolist()


@dataclass(repr=False)
class Measurement:
    """Radius measurement of one batch along one direction.

    Per-sample tensors cover the kept samples (mask / ignore_index applied) in
    flattened row-major order; ``sample_index[i]`` is sample i's position among all
    flattened samples (``torch.unravel_index(sample_index, sample_shape)`` gives
    (b, t)).

    Attributes:
        spread: (N,) Delta a = max_k a_k - min_k a_k (before dividing by T).
        rho: (N,) rho_a = pi T / Delta a (+inf where Delta a = 0).
        rho_batch: aggregate of ``rho`` (``aggregate``: "min" -> pi T / max Delta a).
        bottleneck: flattened-sample index (into all B*T positions) of the sample
            with the largest spread, i.e. the smallest rho_a.
        r: ||p|| / rho_batch when ``step_norm`` was given, else None.
        top2, exact: (N,) top-2 proxy and certified exact radii (``exact=True``), in
            the same units as rho (temperature applied), else None.
    """

    spread: torch.Tensor
    rho: torch.Tensor
    rho_batch: float
    bottleneck: int
    sample_index: torch.Tensor
    sample_shape: tuple[int, ...]
    temperature: float
    aggregate: Any = "min"
    step_norm: float | None = None
    r: float | None = None
    top2: torch.Tensor | None = None
    exact: torch.Tensor | None = None
    method: str = "jvp"

    @property
    def n_samples(self) -> int:
        return int(self.spread.numel())

    @property
    def max_spread(self) -> float:
        return float(self.spread.max()) if self.n_samples else float("nan")

    def __repr__(self) -> str:
        parts = [
            f"n_samples={self.n_samples}",
            f"rho_batch={self.rho_batch:.4g}",
            f"max_spread={self.max_spread:.4g}",
            f"bottleneck={self.bottleneck}",
        ]
        if self.aggregate != "min":
            parts.append(f"aggregate={self.aggregate!r}")
        if self.temperature != 1.0:
            parts.append(f"temperature={self.temperature:g}")
        if self.r is not None:
            parts.append(f"step_norm={self.step_norm:.4g}, r={self.r:.4g}")
        if self.top2 is not None:
            parts.append(f"min_top2={float(self.top2.min()):.4g}")
        if self.exact is not None:
            parts.append(f"min_exact={float(torch.nan_to_num(self.exact, nan=math.inf).min()):.4g}")
        return f"Measurement({', '.join(parts)})"

    def to_dict(self) -> dict:
        """Plain Python floats, ints and lists (``json.dumps`` writes inf as Infinity)."""
        agg = self.aggregate if isinstance(self.aggregate, str) else list(self.aggregate)
        return {
            "n_samples": self.n_samples,
            "sample_shape": list(self.sample_shape),
            "temperature": self.temperature,
            "aggregate": agg,
            "method": self.method,
            "rho_batch": self.rho_batch,
            "max_spread": self.max_spread,
            "bottleneck": self.bottleneck,
            "step_norm": self.step_norm,
            "r": self.r,
            "spread": _as_list(self.spread),
            "rho": _as_list(self.rho),
            "sample_index": _as_list(self.sample_index),
            "top2": _as_list(self.top2),
            "exact": _as_list(self.exact),
        }


def measure(
    model: nn.Module,
    inputs,
    direction,
    *,
    step_norm: float | torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    temperature: float = 1.0,
    aggregate: str | Sequence = "min",
    exact: bool = False,
    mask: torch.Tensor | None = None,
    ignore_index: int | None = None,
    chunk_size: int | None = None,
    method: str = "jvp",
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    fd_step: float | None = None,
) -> Measurement:
    """Measure the softmax radius of a batch along ``direction``.

    ``rho_a(x) = pi T / Delta a(x)`` per sample, the batch radius
    ``aggregate(rho_a)`` (``"min"`` = pi T / max_x Delta a(x), the guaranteed one;
    or ``("quantile", q)``), the bottleneck sample, and ``r = step_norm / rho_batch``.
    Slopes are per unit of ``direction``, so radii are in units of t along it: for
    the normalized step of an optimizer update p pass ``direction=p`` together with
    ``step_norm=1`` (the step is t = 1), or equivalently the unit direction p / ||p||
    with ``step_norm=||p||``.

    Args:
        model, inputs, method, logits_fn, fd_step: as in ``logit_slopes``.
        direction: the step direction v; radii are in units of t along v, so use a
            unit-norm v for radii in parameter-space distance.
        step_norm: ||p||, the step length along v, for r.
        targets: optional integer targets of the sample shape (for ``ignore_index``
            and the top-2 proxy's class y).
        temperature: softmax temperature T (logits z / T).
        aggregate: "min" or ("quantile", q) (see ``ghoststep.radius.aggregate``).
        exact: also compute per-sample top-2 and certified exact radii (needs the
            full logits and slopes; with ``chunk_size`` they are concatenated).
        mask: bool (sample shape); False positions (padding) are left out of every
            statistic.
        ignore_index: with ``targets``, positions whose target equals it are left out.
        chunk_size: as in ``per_sample_spread`` (the full tangent is never stored
            unless ``exact=True``).
    Returns:
        ``Measurement``.
    """
    if not (
        isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    args, kwargs = _split_inputs(inputs)
    evaluator = _Evaluator(model, direction, method, logits_fn, fd_step)
    _check_chunking(model, args, kwargs, chunk_size)
    spread_map, logits, slopes = _spread_map(
        evaluator, model, args, kwargs, chunk_size, want_full=exact
    )
    sample_shape = tuple(spread_map.shape)
    _check_targets(targets, sample_shape)
    keep = _valid_mask(sample_shape, mask, targets, ignore_index, spread_map.device)
    flat = spread_map.reshape(-1)
    index = torch.arange(flat.numel(), device=flat.device)
    if keep is not None:
        index = index[keep.reshape(-1)]
    if index.numel() == 0:
        raise ValueError("no samples left to measure (the mask removes every position)")
    spread = flat[index]
    if bool(torch.isnan(spread).any()):
        raise ValueError("the slopes are not finite for some samples (NaN/inf in the model?)")
    rho = math.pi * temperature / spread  # +inf where spread == 0
    rho_batch = _scalar(_aggregate(rho, aggregate))
    bottleneck = int(index[int(torch.argmax(spread))])
    r = None
    if step_norm is not None:
        r = _scalar(normalized_step(step_norm, torch.tensor(rho_batch, dtype=torch.float64)))
        step_norm = _scalar(step_norm)
    top2 = ex = None
    if exact:
        z_rows, a_rows = flatten_samples(logits, slopes, keep)
        z_rows, a_rows = z_rows / temperature, a_rows / temperature
        t_rows = None
        if targets is not None:
            t_rows = targets.to(z_rows.device).reshape(-1)
            t_rows = t_rows if keep is None else t_rows[keep.reshape(-1)]
        top2 = top2_radius(z_rows, a_rows, target=t_rows)
        ex = exact_radius(z_rows, a_rows)
    return Measurement(
        spread=spread,
        rho=rho,
        rho_batch=rho_batch,
        bottleneck=bottleneck,
        sample_index=index,
        sample_shape=sample_shape,
        temperature=float(temperature),
        aggregate=aggregate,
        step_norm=step_norm,
        r=r,
        top2=top2,
        exact=ex,
        method=method,
    )


# ------------------------------------------------------------------------ directions


def _normalize(parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    norm = torch.sqrt(sum(t.double().pow(2).sum() for t in parts))
    if float(norm) > 0:
        parts = [(t.double() / norm).to(t.dtype) for t in parts]
    return parts, norm


def gradient_direction(
    model: nn.Module,
    loss,
    inputs=None,
    targets=None,
    *,
    logits_fn: Callable[[Any], torch.Tensor] | None = None,
    normalize: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The (normalized) gradient of a loss as a direction.

    Three ways to give the loss:

    * a scalar tensor still attached to the graph (e.g. the training loss you just
      computed); the graph is kept (``retain_graph=True``) so a later ``backward``
      still works;
    * a callable with no arguments returning that scalar (a closure);
    * a callable ``loss_fn(logits, targets)`` (or ``loss_fn(logits)`` when
      ``targets`` is None) together with ``inputs``: the model is run here, in its
      current mode, with buffers and the RNG state restored afterwards (no side
      effects), e.g. ``gradient_direction(model, F.cross_entropy, x, y)``.

    ``.grad`` fields are not touched (``torch.autograd.grad``). Parameters the loss
    does not reach get a zero component.

    Returns:
        ``(direction, grad_norm)``: a dict ``{name: tensor}`` over the trainable
        parameters (g / ||g||, or g when ``normalize=False``; zeros if g = 0) and
        ||g|| as a 0-d float64 tensor.
    """
    named = trainable_parameters(model)
    params = [p for _, p in named]
    if isinstance(loss, torch.Tensor):
        value, retain = loss, True
    elif callable(loss) and inputs is None:
        value, retain = loss(), False
    elif callable(loss):
        args, kwargs = _split_inputs(inputs)
        saved = {n: b.clone() for n, b in model.named_buffers()}
        try:
            with _rng_fork(model), torch.enable_grad():
                out = (logits_fn or default_logits_fn)(model(*args, **kwargs))
                value = loss(out, targets) if targets is not None else loss(out)
                grads = torch.autograd.grad(value, params, allow_unused=True)
        finally:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])
        value, retain = None, False
    else:
        raise TypeError("loss must be a scalar tensor or a callable")
    if value is not None:
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ValueError("the loss must be a scalar tensor")
        if not value.requires_grad:
            raise ValueError(
                "the loss is not attached to an autograd graph (computed under no_grad?)"
            )
        grads = torch.autograd.grad(value, params, allow_unused=True, retain_graph=retain)
    parts = [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]
    parts, norm = _normalize(parts) if normalize else (parts, None)
    if norm is None:
        norm = torch.sqrt(sum(t.double().pow(2).sum() for t in parts))
    return {n: t for (n, _), t in zip(named, parts, strict=True)}, norm


def random_direction(
    model: nn.Module, seed: int = 0, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """A random unit direction over the trainable parameters, reproducible by ``seed``.

    Gaussian entries drawn on the CPU from a private ``torch.Generator`` (the global
    RNG is neither used nor advanced), then scaled to unit global L2 norm and moved
    to each parameter's device and dtype (``dtype`` overrides the dtype). The same
    seed gives the same direction on any device.

    Returns:
        dict ``{name: tensor}``.
    """
    named = trainable_parameters(model)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    draws = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for _, p in named]
    norm = torch.sqrt(sum(d.pow(2).sum() for d in draws))
    return {
        n: (d / norm).to(device=p.device, dtype=dtype or p.dtype)
        for (n, p), d in zip(named, draws, strict=True)
    }


def _snapshot(value):
    """(original object, value copy) so a restore keeps object identity."""
    if isinstance(value, torch.Tensor):
        return value, value.detach().clone()
    return value, copy.deepcopy(value)


def _restore(pair):
    original, saved = pair
    if isinstance(original, torch.Tensor):
        with torch.no_grad():
            original.copy_(saved)
        return original
    return saved


def optimizer_update_direction(
    optimizer: torch.optim.Optimizer,
    model: nn.Module | None = None,
    *,
    closure: Callable[[], Any] | None = None,
):
    """The pending update p = what ``optimizer.step()`` would add to each parameter.

    The step is actually taken, the parameter change recorded, and then the
    parameters, the optimizer state (every tensor restored in place, object identity
    kept), the param-group settings and the LR scheduler's step flag are put back
    exactly; ``.grad`` is not touched. The update includes momentum, Adam's
    preconditioning and weight decay. Pass the *inner* optimizer, not a wrapper
    whose ``step`` itself measures or rescales.

    Memory: transiently one copy of every parameter plus one copy of the optimizer
    state (Adam: two more parameter-sized tensors), plus the returned update.

    Args:
        optimizer: a ``torch.optim.Optimizer`` whose gradients are ready.
        model: if given, the result is a dict ``{name: update}`` over the model's
            trainable parameters (zeros for parameters the optimizer does not hold);
            otherwise a list aligned with the optimizer's parameters in param-group
            order (the same as ``model.parameters()`` when the optimizer was built
            from it).
        closure: passed to ``optimizer.step`` (it is evaluated, with its side effects).
    Returns:
        The update p (not normalized; ``direction_norm(p)`` is ||p||).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    state_keys = list(optimizer.state.keys())
    saved_state = {
        key: {k: _snapshot(v) for k, v in optimizer.state[key].items()} for key in state_keys
    }
    saved_groups = [
        {k: (v, None) if k == "params" else _snapshot(v) for k, v in g.items()}
        for g in optimizer.param_groups
    ]
    missing = object()
    opt_called = getattr(optimizer, "_opt_called", missing)
    try:
        optimizer.step(closure) if closure is not None else optimizer.step()
        with torch.no_grad():
            updates = [p.detach() - b for p, b in zip(params, before, strict=True)]
    finally:
        with torch.no_grad():
            for p, b in zip(params, before, strict=True):
                p.copy_(b)
        for key in list(optimizer.state.keys()):
            if key not in saved_state:
                del optimizer.state[key]
        for key, entries in saved_state.items():
            current = optimizer.state[key]
            current.clear()
            current.update({k: _restore(pair) for k, pair in entries.items()})
        for g, saved in zip(optimizer.param_groups, saved_groups, strict=True):
            g.clear()  # same dict object, same key order as before
            g.update({k: pair[0] if k == "params" else _restore(pair) for k, pair in saved.items()})
        if opt_called is missing:
            if hasattr(optimizer, "_opt_called"):
                del optimizer._opt_called
        else:
            optimizer._opt_called = opt_called
    if model is None:
        return updates
    by_id = {id(p): u for p, u in zip(params, updates, strict=True)}
    return {
        n: by_id[id(p)] if id(p) in by_id else torch.zeros_like(p)
        for n, p in trainable_parameters(model)
    }

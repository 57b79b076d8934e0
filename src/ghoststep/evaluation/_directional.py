"""Model outputs and their directional derivatives along a parameter direction.

Every evaluation of a model in ghoststep runs here: ``slopes`` (logit slopes),
``measurement`` (the radius measurement), the controller, the internal (attention /
FFN) radii and the line probes. For a direction v over the trainable parameters
and any output ``y = output_fn(model(*args, **kwargs))`` (the logits, or a tuple of
internal activations) it returns ``(y, y_dot)`` with ``y_dot = d/dt y(theta + t v)``
at t = 0, by one of three methods:

* ``"jvp"``: forward-mode AD (``torch.autograd.forward_ad`` dual parameters through
  ``torch.func.functional_call``; for FSDP2 models through the ordinary forward, with
  the duals put on each unit's all-gathered parameters: ``dual_unsharded``
  in ``_sharding``), exact. One primal + tangent pass, which costs about as much as a
  training step (forward and backward) on matmul / conv networks.
  ``F.scaled_dot_product_attention`` runs with its math kernel inside this pass only
  (the fused flash / memory-efficient kernels have no forward AD), so models with the
  default attention (``nn.TransformerEncoderLayer``, Hugging Face ``"sdpa"``) need no
  change and train with their fast kernel.
* ``"fd"``: central difference ``(y(theta + h v) - y(theta - h v)) / 2h`` in float64
  (parameters, floating buffers and inputs cast; the module is not modified), with
  ``h = eps64^(1/3) / ||v||``. Three float64 forwards: a slow reference.
* ``"fast"``: one-sided difference ``(y(theta + h v) - y(theta)) / h`` in the
  parameters' own float32 / float64, through the model's **ordinary forward** (the
  trainable parameters are shifted in place and restored bitwise), so it needs no
  ``functional_call`` and no forward-mode AD. ``y(theta)`` can be supplied
  (``baseline=``: the controller passes the logits its training forward already
  computed), so the slopes cost one extra forward. The step h is chosen so that the
  outputs move by about 0.01 (``FAST_MOVE``; in logit units, i.e. 0.3 % of the
  radius): the O(h) truncation error and the O(eps / h) round-off of two float32
  forwards are both about 1e-3 or less there. The controller takes h from the
  previous step's spread; without one, ``fast_step`` guesses from the parameter norm
  and a move outside [0.001, 0.1] is redone once with the corrected step.

  Error and where it is unsafe: the relative slope error is O(h |y''| / |y'|) +
  O(eps |y| / (h |y'|)), about 1e-4 to 1e-3 on smooth networks (the radius agrees
  with ``"jvp"`` to well under 1 %; ``benchmarks/bench_controller_overhead.py``
  measures it along training). It is a secant, not a derivative: where the network
  is not smooth within h of theta (a ReLU or max-pool switching, a top-k selection
  changing, a quantizer), the slope of the affected samples is the average over the
  kink, not the one-sided derivative the JVP gives. It needs float32 or float64
  parameters (in bfloat16 / float16 eps^(1/2) is 1e-2 to 1e-1: a ValueError names
  ``"jvp"``), and the baseline must come from a forward of the same precision. On
  CUDA both forwards run with TF32 off (:func:`full_float32`): TF32 rounding (about
  1e-3 relative, PyTorch's default for cuDNN convolutions) would put 10 % or more
  into the difference. The controller therefore does its own full-float32 baseline
  forward (two extra forwards, not one) when the training forward ran under autocast
  or with TF32 allowed on a CUDA model; turn TF32 off for training
  (``torch.backends.cudnn.allow_tf32 = False``) to keep the one-forward cost.

Semantics shared by all methods (what exactly is differentiated):

* The model runs **in its current mode** (``model.training`` is never changed): in
  train mode BatchNorm normalizes with the batch statistics and dropout draws masks.
* **No side effects.** Parameters end bitwise as they were; buffers (BatchNorm running
  statistics, ``num_batches_tracked``) are bitwise unchanged (cloned for
  ``functional_call``, saved and restored around ordinary forwards); the CPU and the
  model's CUDA RNG states are restored afterwards (``torch.random.fork_rng``), so the
  training RNG stream is as if nothing happened. ``rng=`` (from
  ``ghoststep.evaluation.capture_rng``) replays a given state first: every evaluation
  then draws the same dropout masks as the forward that state was captured before.
* Everything runs under ``torch.no_grad`` (no autograd graph), except
  :func:`call_at`, which is differentiable in ``t``.

Directions are one tangent per trainable parameter
(``ghoststep.evaluation.resolve_direction`` accepts a dict, an aligned sequence or a
flat tensor); inputs are replayed, with the RNG and buffers kept, by the private ``_replay``
module of ``ghoststep.evaluation`` and outputs read by ``_outputs``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from ..radius._bounds import logit_spread_unchecked
from ._directions import global_norm, trainable_parameters
from ._outputs import REPLAY_NOISE, fingerprint_gap, logits_reader
from ._replay import (
    HALF,
    RNGState,
    check_chunking,
    chunks,
    cuda_devices,
    preserved_buffers,
    replay_rng,
)
from ._sharding import dual_unsharded, fsdp_units, reshard

# The public names are listed once, in the package's ``__init__``.

# How the slopes are evaluated (``method=``); the experiments' training methods are
# another thing.
SLOPE_METHODS = ("jvp", "fd", "fast")


def fast_step(
    param_norm: float | Callable[[], float],
    direction_norm: float,
    dtype: torch.dtype,
    *,
    moved_per_step: float | None = None,
) -> float:
    """The step h of the one-sided difference (``"fast"``) along a direction of norm
    ||v|| (then :func:`refined_step` once):

    * with ``moved_per_step``, how far the outputs move per unit step (the controller's
      previous spread): ``FAST_MOVE / moved_per_step``, when finite and > 0;
    * else the first guess, a parameter displacement
      ``h ||v|| = sqrt(eps(dtype)) * max(||theta||, 1)`` (3.5e-4 of the parameter norm
      in float32); ``param_norm`` may be a callable, then only called here.
    """
    hint = moved_per_step
    if hint is not None and math.isfinite(hint) and hint > 0:
        return FAST_MOVE / hint
    if not direction_norm > 0:
        return 0.0
    norm = param_norm() if callable(param_norm) else param_norm
    return math.sqrt(torch.finfo(dtype).eps) * max(float(norm), 1.0) / direction_norm


# The one-sided difference is most accurate when the outputs move by about a hundredth
# of a logit unit between its two forwards (measured on the benchmark models: the slope
# error is about 1e-3 or less from 0.002 to 0.3, grows as O(h) above -- faster in ReLU
# networks, whose kinks the secant crosses -- and as O(eps / h) below).
FAST_MOVE = 0.01
_FAST_WINDOW = (0.001, 0.1)


def refined_step(step: float, moved: float) -> float | None:
    """A better step when the outputs moved by ``moved`` (max over entries) at ``step``
    and that lies outside [0.001, 0.1]; None when ``step`` is fine (or nothing moved)."""
    if not (math.isfinite(moved) and moved > 0) or _FAST_WINDOW[0] <= moved <= _FAST_WINDOW[1]:
        return None
    return step * FAST_MOVE / moved


# ------------------------------------------------------------------------ evaluation


_FWD_AD = re.compile(r"forward AD with ([\w.:]+)")


def _forward_ad_error(err: BaseException) -> NotImplementedError | None:
    match = _FWD_AD.search(str(err))
    if match is None:
        return None
    op = match.group(1)
    hint = ""
    if "rnn" in op or "lstm" in op.lower():
        hint = " For CPU LSTMs wrap the call in `torch.backends.mkldnn.flags(enabled=False)`."
    return NotImplementedError(
        f"forward-mode AD is not implemented for the op {op!r} used by this model, so "
        f'method="jvp" cannot run. Use method="fast" (one-sided float32 difference) or '
        f'"fd" (central float64 difference).{hint}'
    )


def _checked(out, what: str = "output_fn"):
    """``out`` (what ``output_fn`` returned) after checking every leaf is a tensor."""
    for leaf in pytree.tree_leaves(out):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{what} must return a tensor (or a tuple of them), got {type(leaf).__name__}"
            )
    return out


def forward(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any],
    *,
    output_fn: Callable[[Any], Any] | None = None,
    rng: RNGState | None = None,
    devices: Sequence[int] | None = None,
):
    """``output_fn(model(*args, **kwargs))`` through the ordinary forward, without side
    effects (no_grad; buffers restored; RNG replayed from ``rng`` and restored)."""
    output_fn = output_fn or logits_reader()
    devices = cuda_devices(model) if devices is None else devices
    with torch.no_grad(), replay_rng(devices, rng), preserved_buffers(model):
        out = _checked(output_fn(model(*args, **kwargs)))
    reshard(model)  # FSDP2: no stale all-gathered parameters after a no_grad forward
    return pytree.tree_map(lambda t: t.detach(), out)


def call_at(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any],
    tangents: Sequence[torch.Tensor],
    t,
    *,
    primals: Sequence[torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    output_fn: Callable[[Any], Any] | None = None,
    frozen: bool = False,
):
    """``output_fn(model(...))`` at ``theta + t v`` through ``functional_call``.

    The module is not modified (buffers are cloned per call; the RNG is not touched);
    ``t`` may be a tensor that requires grad (line probes differentiate through it).
    ``dtype`` casts parameters, floating buffers and floating inputs (at any depth of
    nested arguments) first (e.g. float64). ``primals`` replaces the trainable
    parameters' values (default: theirs). ``frozen``: the tangents are aligned with
    every parameter (:func:`moving_parameters`).
    """
    output_fn = output_fn or logits_reader()
    named = moving_parameters(model, frozen)
    base = [p.detach() for _, p in named] if primals is None else list(primals)

    def cast(x):
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x

    state = {n: cast(b).clone() for n, b in model.named_buffers()}
    for (name, _), p, v in zip(named, base, tangents, strict=True):
        state[name] = cast(p) + t * cast(v) if v is not None else cast(p)
    args, kwargs = pytree.tree_map_only(torch.Tensor, cast, (tuple(args), dict(kwargs)))
    out = functional_call(model, state, args, kwargs, tie_weights=True, strict=False)
    return _checked(output_fn(out))


def tf32_allowed() -> bool:
    """Whether float32 convolutions or matrix products on CUDA may round their inputs to
    TF32 (10-bit mantissa; PyTorch's default for cuDNN convolutions)."""
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)


@contextlib.contextmanager
def full_float32():
    """TF32 off for CUDA convolutions and matrix products inside the block. A one-sided
    difference of two TF32 forwards has a relative error of about 1e-3 |y| / move,
    i.e. 10 % or more at the move ``"fast"`` uses; in full float32 it is 1e-5."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def math_attention():
    """A context selecting the math kernel of ``F.scaled_dot_product_attention`` (the
    one with forward AD), on CPU and CUDA."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 has no sdpa_kernel
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def moving_parameters(model: nn.Module, frozen: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs a direction's tangents are aligned with: the
    trainable ones (:func:`trainable_parameters`), or with ``frozen`` every parameter of
    the model in ``named_parameters()`` order (an optimizer keeps moving a parameter
    frozen with ``requires_grad_(False)``: momentum, weight decay)."""
    return list(model.named_parameters()) if frozen else trainable_parameters(model)


def _jvp(model, args, kwargs, tangents, primals, output_fn, rng, devices, frozen):
    sharded = bool(fsdp_units(model))
    if sharded:
        if primals is not None:
            raise ValueError("primals= is not supported for FSDP2 (fully_shard) models")
        reshard(model)  # the sharded parameters are the trainable ones (see reshard)
    named = moving_parameters(model, frozen)
    base = [p.detach() for _, p in named] if primals is None else primals
    with (
        torch.no_grad(),
        replay_rng(devices, rng),
        preserved_buffers(model),
        fwAD.dual_level(),
        math_attention(),
    ):
        try:
            if sharded:  # duals on the unsharded parameters, the model's own forward
                with dual_unsharded(model, dict(zip((n for n, _ in named), tangents))):
                    out = model(*args, **kwargs)
            else:
                state = {}  # the trainable parameters; buffers are the module's own
                for (name, _), p, v in zip(named, base, tangents, strict=True):
                    state[name] = p if v is None else fwAD.make_dual(p, v)
                out = functional_call(model, state, args, kwargs, tie_weights=True, strict=False)
        except (NotImplementedError, RuntimeError) as err:
            better = _forward_ad_error(err)
            if better is None:
                raise
            raise better from err
        out = _checked(output_fn(out))
        leaves, spec = pytree.tree_flatten(out)
        primal_out, tangent_out = [], []
        for leaf in leaves:
            primal, tangent = fwAD.unpack_dual(leaf)
            primal_out.append(primal)
            tangent_out.append(torch.zeros_like(primal) if tangent is None else tangent)
    return pytree.tree_unflatten(primal_out, spec), pytree.tree_unflatten(tangent_out, spec)


def _central(model, args, kwargs, tangents, output_fn, step, rng, devices, frozen):
    params = [p for _, p in moving_parameters(model, frozen)]
    device = params[0].device
    wide = torch.float32 if device.type == "mps" else torch.float64
    vnorm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in tangents if v is not None))
    if step is None:
        step = torch.finfo(wide).eps ** (1.0 / 3.0) / vnorm if vnorm > 0 else 0.0
    outs = []
    # Every evaluation in the wide dtype from the same RNG state (one dropout mask).
    for sign in (0.0,) if step == 0.0 else (0.0, 1.0, -1.0):
        with torch.no_grad(), replay_rng(devices, rng):
            outs.append(
                call_at(
                    model,
                    args,
                    kwargs,
                    tangents,
                    sign * step,
                    dtype=wide,
                    output_fn=output_fn,
                    frozen=frozen,
                )  # fmt: skip
            )
    dtype = params[0].dtype
    values = pytree.tree_map(lambda y: y.to(dtype), outs[0])
    if step == 0.0:
        return values, pytree.tree_map(torch.zeros_like, values)
    slopes = pytree.tree_map(lambda a, b: ((a - b) / (2.0 * step)).to(dtype), outs[1], outs[2])
    return values, slopes


def check_fast_dtype(params: Sequence[torch.Tensor]) -> None:
    """``"fast"`` differences two forwards: float32 or float64 parameters only."""
    for p in params:
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f'method="fast" needs float32 or float64 parameters (a one-sided difference '
                f'in {p.dtype} has a relative error of 1e-2 or worse); use method="jvp"'
            )


def difference_quotient(shifted, baseline, step: float):
    """``(shifted - baseline) / step`` leaf by leaf, in the baseline's dtype."""
    return pytree.tree_map(lambda a, b: (a - b) / step, shifted, baseline)


def _one_sided(model, args, kwargs, tangents, output_fn, step, rng, devices, baseline, frozen):
    params = [p.detach() for _, p in moving_parameters(model, frozen)]
    check_fast_dtype(params)
    moving = [(p, v) for p, v in zip(params, tangents, strict=True) if v is not None]
    fixed_step = step is not None
    if step is None:
        with torch.no_grad():
            pnorm = float(global_norm(params))
            vnorm = float(global_norm([v for _, v in moving])) if moving else 0.0
        step = fast_step(pnorm, vnorm, params[0].dtype)
    if baseline is None:
        baseline = forward(model, args, kwargs, output_fn=output_fn, rng=rng, devices=devices)
    if step == 0.0:
        return baseline, pytree.tree_map(torch.zeros_like, baseline)
    saved = [p.clone() for p, _ in moving]

    def shifted_by(t: float):
        try:
            with torch.no_grad():
                torch._foreach_add_([p for p, _ in moving], [v for _, v in moving], alpha=t)
            return forward(model, args, kwargs, output_fn=output_fn, rng=rng, devices=devices)
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p for p, _ in moving], saved)

    shifted = shifted_by(step)
    if not fixed_step:  # a second forward when the outputs moved too much or too little
        moved = max(
            (
                float((a - b).abs().max())
                for a, b in zip(
                    pytree.tree_leaves(shifted), pytree.tree_leaves(baseline), strict=True
                )
                if a.numel()
            ),
            default=0.0,
        )
        better = refined_step(step, moved)
        if better is not None:
            step, shifted = better, shifted_by(better)
    return baseline, difference_quotient(shifted, baseline, step)


def directional(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any],
    tangents: Sequence[torch.Tensor | None],
    *,
    method: str = "jvp",
    output_fn: Callable[[Any], Any] | None = None,
    step: float | None = None,
    rng: RNGState | None = None,
    primals: Sequence[torch.Tensor] | None = None,
    baseline=None,
    frozen: bool = False,
):
    """Outputs and their directional derivatives along ``tangents``: ``(y, y_dot)``.

    Args:
        model: any module, evaluated in its current mode without side effects.
        args, kwargs: the forward's arguments (see :func:`split_inputs`).
        tangents: one tensor (or None for zero) per trainable parameter, in
            :func:`trainable_parameters` order (:func:`resolve_direction` builds them).
        method: ``"jvp"`` | ``"fd"`` | ``"fast"`` (see the module docstring).
        output_fn: maps the model output to a tensor or a tuple / dict of tensors
            (default: the logits, :func:`logits_reader`).
        step: the difference step t along the tangents (``"fd"``, ``"fast"``);
            default eps^(1/3) / ||v|| (fd); for fast :func:`fast_step`, redone once
            with :func:`refined_step` when the outputs moved by more than 0.1 or less
            than 0.001 (then three forwards).
        rng: an RNG state from :func:`capture_rng` to evaluate from (same dropout
            masks as the forward it was captured before); default the current one.
        primals: ``"jvp"`` only: evaluate at these parameter values instead of the
            current ones (aligned with ``tangents``).
        baseline: ``"fast"`` only: ``y`` at the current parameters, if already known
            (computed with the same RNG state and precision); saves a forward.
    Returns:
        ``(y, y_dot)`` with the structure of ``output_fn``'s result; ``y_dot`` in
        output units per unit of t along the tangents.
    Raises:
        ValueError: unknown method; ``"fast"`` on parameters that are not float32/64.
        NotImplementedError: ``"jvp"`` met an op without forward-mode AD (names it).
    """
    if method not in SLOPE_METHODS:
        raise ValueError(f"method must be one of {SLOPE_METHODS}, got {method!r}")
    output_fn = output_fn or logits_reader()
    devices = cuda_devices(model)
    if method == "jvp":
        return _jvp(model, args, kwargs, tangents, primals, output_fn, rng, devices, frozen)
    if primals is not None:
        raise ValueError(f'primals= is only supported by method="jvp", not {method!r}')
    if method == "fd":
        return _central(model, args, kwargs, tangents, output_fn, step, rng, devices, frozen)
    with full_float32() if devices else contextlib.nullcontext():
        return _one_sided(
            model, args, kwargs, tangents, output_fn, step, rng, devices, baseline, frozen
        )


# ------------------------------------------------------------ spreads along a direction
#
# The controller's measurement: per-position spreads ``max_k a_k - min_k a_k`` of one
# batch, chunk by chunk (each chunk's tangent or difference reduced at once), as flat
# float64 tensors. Neither function moves the parameters: the secant evaluates the
# model where its parameters are.

# On the CPU the difference and its two reductions run over blocks of rows this large,
# so that each block is still in cache for the reductions (at V = 8192 the logits of a
# batch are tens of MB: three passes through memory become one).
_BLOCK_BYTES = 1 << 20


def spread_of_difference(
    shifted: torch.Tensor, baseline: torch.Tensor, sink: list | None = None
) -> torch.Tensor:
    """``logit_spread_unchecked(shifted - baseline)``, using ``shifted`` as scratch; shape
    ``shifted.shape[:-1]``. ``sink``: a list that receives the difference's
    :func:`projected` rows, computed while each block is in cache."""
    classes = shifted.shape[-1]
    rows = max(1, _BLOCK_BYTES // max(1, classes * shifted.element_size()))
    if shifted.device.type != "cpu" or shifted.numel() <= rows * classes:
        difference = shifted.sub_(baseline)
        if sink is not None:
            sink.append(projected(difference))
        return logit_spread_unchecked(difference)
    flat, base = shifted.reshape(-1, classes), baseline.reshape(-1, classes)
    out = flat.new_empty(flat.shape[0])
    for start in range(0, flat.shape[0], rows):
        block = flat[start : start + rows].sub_(base[start : start + rows])
        torch.sub(block.amax(-1), block.amin(-1), out=out[start : start + rows])
        if sink is not None:
            sink.append(projected(block))
    return out.view(shifted.shape[:-1])


def tangent_spreads(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any],
    tangents: Sequence[torch.Tensor | None],
    *,
    method: str,
    output_fn: Callable[[Any], Any],
    rng: RNGState | None,
    chunk_size: int | None,
    fingerprint: torch.Tensor | None = None,
    coarse: bool = False,
    **slopes_kwargs,
) -> tuple[torch.Tensor, float]:
    """``(spreads, gap)``: the flat float64 spread of the slopes along ``tangents`` (one
    per parameter of the model, ``frozen`` alignment) at every position, by ``method``
    (``"jvp"`` / ``"fd"``: :func:`directional`), and the largest relative gap between
    the primal logits and ``fingerprint`` (the training forward's, from
    :func:`~ghoststep.evaluation._outputs.fingerprint`) above the noise of their
    precision (:data:`~ghoststep.evaluation._outputs.REPLAY_NOISE`; ``coarse``: the
    training forward ran under autocast), 0.0 when within it or without one."""
    if chunk_size is not None:
        check_chunking(model, args, kwargs, chunk_size)
    parts, mismatch = [], 0.0
    for start, stop, a, k in chunks(args, kwargs, chunk_size):
        primal, slopes = directional(
            model, a, k, tangents, method=method, output_fn=output_fn, rng=rng, frozen=True,
            **slopes_kwargs,
        )  # fmt: skip
        if fingerprint is not None:
            gap = fingerprint_gap(primal, fingerprint[start:stop])
            low = coarse or primal.dtype in HALF
            if gap > REPLAY_NOISE[low]:
                mismatch = max(mismatch, gap)
        parts.append(logit_spread_unchecked(slopes).reshape(-1))
    return torch.cat(parts).double(), mismatch


def secant_spreads(
    model: nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any],
    baseline,
    step: float,
    *,
    output_fn: Callable[[Any], Any],
    rng: RNGState | None,
    devices: Sequence[int],
    chunk_size: int | None,
    sink: list | None = None,
) -> torch.Tensor:
    """The flat float64 spread of ``(y - baseline) / step`` at every position, ``y`` the
    outputs of one forward at the parameters as they are (the caller has put them at
    ``old + step v``; ``baseline``: the outputs at ``old``, or a list of parts over
    consecutive rows when the forward is not chunked). ``sink``: a list that receives
    the :func:`projected` rows of ``y - baseline``, in row order."""
    if chunk_size is not None:
        check_chunking(model, args, kwargs, chunk_size)
    parts = []
    for start, stop, a, k in chunks(args, kwargs, chunk_size):
        shifted = forward(model, a, k, output_fn=output_fn, rng=rng, devices=devices)
        pieces = baseline if isinstance(baseline, list) else [baseline[start:stop]]
        first = 0
        for piece in pieces:
            last = first + piece.shape[0]
            parts.append(spread_of_difference(shifted[first:last], piece, sink).reshape(-1))
            first = last
    return torch.cat(parts).double() / step


# ------------------------------------------------------- the secant's step and checks


# "fast" trusts a difference whose move exceeds RESOLUTION rounding units of the largest
# logit: the rounding then adds at most 2 / RESOLUTION = 0.8 % to the spread, under the
# 2 % margin of "fast" (which also covers its O(h) error). At the usual 0.01 move this
# holds for logits up to about 300 in float32.
RESOLUTION = 250.0


class Unresolved(ArithmeticError):
    """``"fast"`` cannot resolve the logits' move at their magnitude."""

    def __init__(self, moved: float, magnitude: float) -> None:
        super().__init__(
            f"the logits (max |z| = {magnitude:.3g}) moved by {moved:.3g} at the secant's "
            f"step, not {RESOLUTION:g} of their rounding units: a difference of two "
            "forwards in this precision cannot resolve their slopes"
        )


def away_from_one(fraction: float) -> float:
    """The final step is recovered from the evaluation point and the proposal as a
    lerp with weight (s - f) / (1 - f): keep f away from 1."""
    return 0.5 if abs(1.0 - fraction) < 0.5 else fraction


_PROJECTIONS = 4  # zero-sum class projections of the baseline check
_pairs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def projected(logits: torch.Tensor) -> torch.Tensor:
    """``(positions, 4)``: differences of 4 fixed random pairs of classes of the logits
    ``(..., K)``: zero-sum projections (a shift common to all classes, which no spread
    sees, drops out) that read 8 columns, not a pass over all K."""
    classes = logits.shape[-1]
    key = (classes, logits.device)
    if key not in _pairs:
        fixed = torch.Generator().manual_seed(0)  # never the training RNG
        first = torch.randint(0, classes, (_PROJECTIONS,), generator=fixed)
        other = first + torch.randint(1, max(2, classes), (_PROJECTIONS,), generator=fixed)
        _pairs[key] = (first.to(logits.device), (other % classes).to(logits.device))
    first, other = _pairs[key]
    flat = logits.reshape(-1, classes)
    return flat.index_select(1, first) - flat.index_select(1, other)


def _finite_max(values: torch.Tensor) -> float:
    """max |values| over the finite entries (masked classes give inf / nan), 0 if none."""
    values = values.abs()
    return float(values.nan_to_num(0.0, 0.0, 0.0).max()) if values.numel() else 0.0


def baseline_gap(plus, minus) -> float:
    """Whether the baseline is this function's, from the two sides of the secant.

    A one-sided secant is off by O(step |y''|): measured up to 7 % low on a tiny GPT-2
    in float32, enough to break r <= target_r. The two secants err in opposite
    directions, and the spread (max - min) is a convex function of the slopes, so the
    mean of the two spreads bounds the derivative's spread from above up to O(step^2):
    one more forward, taken only near the bound.

    With both sides, d+ + d- = (z(+h) - z0) + (z(-h) - z0) is O(h^2) for the baseline
    z0 of this function and 2 (z0' - z0) for a stale one (inputs or buffers changed
    after the training forward), while d+ - d- = z(+h) - z(-h) = 2 h a either way.
    Returns the largest |first| over the largest |second|, both through a few zero-sum
    projections of the classes (:func:`projected`; ``plus`` / ``minus``: per plan, the
    projected rows of d+ / d-); above 1 the baseline is not this function's (a kink
    crossed within h gives at most about 1)."""
    residual = odd = 0.0
    for above, below in zip(plus, minus, strict=True):
        above, below = torch.cat(above), torch.cat(below)
        residual = max(residual, _finite_max(above + below))
        odd = max(odd, _finite_max(above - below))
    return residual / odd if odd > 0 else 0.0

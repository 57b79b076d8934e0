"""The controller's measurement: the per-position logit spread of the captured batches
along the proposed update, by method (``"jvp"`` / ``"fd"``: the tangent at the old
parameters; ``"fast"``: one forward at old + f p against the training forward's logits),
reduced on the device to one radius with one host sync.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from torch import nn

from ..evaluation._directional import (
    directional,
    fast_step,
    forward,
    full_float32,
    refined_step,
)
from ..evaluation._inputs import check_chunking, chunks, split_inputs
from ..evaluation._isolation import autocast_as, original_forward
from ..evaluation._sharding import local_shards, max_over_ranks, reshard
from ..measurement._reduce import reduce_spreads
from ..radius._bounds import logit_spread_unchecked, radius_from_spread
from ._function import Watch, fingerprint_gap, flags_as
from ._sampling import Plan, Sampling

__all__ = [
    "MeterReading",
    "SecantMeter",
    "SpreadMeter",
    "TangentMeter",
    "Unresolved",
    "make_meter",
]


class MeterReading(NamedTuple):
    """What the meter read in one step (the controller's; ``measure()`` returns a
    ``Measurement``). ``spread``: the aggregated spread per unit of v (0 when nothing
    was counted); ``rho_a``: the limiting radius (with the extra radii);
    ``bottleneck``: the position index over the micro-batches in order;
    ``rho_samples``: per-position radii (CPU float32) when kept; ``radii``: the extra
    radii dict or None; ``counted``: some position was not masked; ``pending``:
    (inputs, spread, mask) of the last plan, for the bottleneck buffer."""

    spread: float
    rho_a: float
    bottleneck: int
    finite: bool
    rho_samples: torch.Tensor | None
    radii: dict[str, float] | None
    counted: bool
    pending: tuple | None


# The largest relative gap between the replayed and the training forward's logits
# fingerprints that is noise (float32 / float64; 16-bit or autocast): a replay of the
# same function differs by rounding only, a changed input or buffer by far more.
_REPLAY_GAP, _REPLAY_GAP_LOW = 1e-3, 5e-2

# On the CPU the difference and its two reductions run over blocks of rows this large,
# so that each block is still in cache for the reductions (at V = 8192 the logits of a
# batch are tens of MB: three passes through memory become one).
_BLOCK_BYTES = 1 << 20


def spread_of_difference(shifted: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """``logit_spread_unchecked(shifted - baseline)``, using ``shifted`` as scratch; shape
    ``shifted.shape[:-1]``."""
    classes = shifted.shape[-1]
    rows = max(1, _BLOCK_BYTES // max(1, classes * shifted.element_size()))
    if shifted.device.type != "cpu" or shifted.numel() <= rows * classes:
        return logit_spread_unchecked(shifted.sub_(baseline))
    flat, base = shifted.reshape(-1, classes), baseline.reshape(-1, classes)
    out = flat.new_empty(flat.shape[0])
    for start in range(0, flat.shape[0], rows):
        block = flat[start : start + rows].sub_(base[start : start + rows])
        torch.sub(block.amax(-1), block.amin(-1), out=out[start : start + rows])
    return out.view(shifted.shape[:-1])


class SpreadMeter:
    """What the two meters share: the settings, the tangent plumbing, the extra radii and
    the reduction of per-position spreads to one radius. Build one with
    :func:`make_meter`; :class:`TangentMeter` (``"jvp"`` / ``"fd"``) and
    :class:`SecantMeter` (``"fast"``) implement :meth:`measure`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        method: str,
        logits_fn: Callable[[Any], torch.Tensor],
        temperature: float,
        sampling: Sampling,
        chunk_size: int | None,
        slopes_kwargs: Mapping[str, Any],
        extra_radii: Callable | None,
        limit_by: Sequence[str] | None,
        keep_samples: bool,
        process_group: Any,
    ) -> None:
        self.model = model
        self.method = method
        self.logits_fn = logits_fn
        self.temperature = temperature
        self.sampling = sampling
        self.chunk_size = chunk_size
        self.slopes_kwargs = dict(slopes_kwargs)
        self.extra_radii = extra_radii
        self.limit_by = limit_by
        self.keep_samples = keep_samples
        self.process_group = process_group
        self.devices: list[int] = []
        self.spread_hint: float | None = None  # last max spread per unit v ("fast")
        self.watch = Watch()  # the controller's (warnings about the measured function)
        self.own_baseline = False  # "fast": the training logits did not match a replay

    def with_method(self, method: str) -> SpreadMeter:
        """A meter for ``method`` with these settings and this state (devices, hint)."""
        other = copy.copy(self)
        other.__class__ = SecantMeter if method == "fast" else TangentMeter
        other.method = method
        return other

    # -------------------------------------------------------------------- per step

    def precision(self):
        """The context of every measuring forward (see :class:`SecantMeter`)."""
        return nullcontext()

    def measure(self, plans: list[Plan], proposal, recheck: float | None):
        """Measure along v = p / tau over the plans (parameters at the old values on
        entry; ``proposal``, a :class:`~ghoststep.controller._proposal.Proposal`, holds
        the parameters, the proposed values, tau and where the parameters are).
        ``recheck``: for ``"fast"``, the max spread per unit v from which the difference
        is taken on both sides; None: never. Returns a :class:`MeterReading`."""
        raise NotImplementedError

    def try_gradient(self, params, plan: Plan) -> None:
        """The slopes along the gradient on one plan (before the first inner step: an
        error, e.g. an op without forward AD, leaves the optimizer untouched)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        self._spread_of(plan, self._tangent(self.direction(params, grads)))

    def direction(self, params, updates, frozen: bool = True) -> list[torch.Tensor | None]:
        """Updates aligned with every parameter of the model (None: not optimized), or
        with ``frozen=False`` with its trainable ones (the ``extra_radii`` hook's
        alignment). Every one: a parameter frozen with ``requires_grad_(False)`` stays
        in the optimizer's groups and can still move (momentum, weight decay), and the
        tangent must carry that move. ``params`` may be the parameters or, for FSDP2,
        their local shards (``local_shards``): a DTensor parameter's update is its
        local shard's."""
        by_id = {id(p): u for p, u in zip(params, updates, strict=True)}
        reshard(self.model)  # FSDP2: the registered parameters are the sharded ones
        model_params = [q for q in self.model.parameters() if frozen or q.requires_grad]
        shards = local_shards(model_params)
        return [
            by_id.get(id(q), by_id.get(id(s))) for q, s in zip(model_params, shards, strict=True)
        ]

    @contextmanager
    def evaluation_precision(self, plan: Plan):
        """The conditions a plan's forwards run under, whatever surrounds ``step()``: the
        modules' train / eval flags of the training forward (put back after), and its
        autocast for ``"jvp"`` (the tangent in the precision the model trains in: exact
        to a few 1e-3 in bfloat16), none for the differences ``"fast"`` / ``"fd"`` (in
        bfloat16 a secant at a 0.01-logit move is off by 100 % or more)."""
        with flags_as(self.model, plan.flags):
            with autocast_as(plan.autocast if self.method == "jvp" else ()):
                yield

    # ------------------------------------------------------------------- internals

    def _tangent(self, tangents):
        def spread(args, kwargs, rows: slice, plan: Plan) -> torch.Tensor:
            primal, slopes = directional(
                self.model,
                args,
                kwargs,
                tangents,
                method=self.method,
                output_fn=self.logits_fn,
                rng=plan.rng,
                frozen=True,
                **self.slopes_kwargs,
            )
            # "fd" runs in float64, where dropout may draw other masks: "jvp" only
            if self.method == "jvp" and plan.fingerprint is not None:
                self._check_replay(primal, plan.fingerprint[rows], plan)
            return logit_spread_unchecked(slopes)

        return spread

    def _check_replay(self, primal: torch.Tensor, recorded: torch.Tensor, plan: Plan) -> None:
        """The replay's logits at the old parameters against the training forward's
        fingerprint, within the precision's noise (a kernel of another order, e.g. the
        math attention the JVP runs with: 1e-6 relative in float32, 1e-2 in bfloat16)."""
        low = bool(plan.autocast) or primal.dtype in (torch.bfloat16, torch.float16)
        gap = fingerprint_gap(primal, recorded)
        if gap > (_REPLAY_GAP_LOW if low else _REPLAY_GAP):
            self.watch.mismatch(self.method, gap)

    def _forward(self, args, kwargs, plan: Plan) -> torch.Tensor:
        return forward(
            self.model, args, kwargs, output_fn=self.logits_fn, rng=plan.rng, devices=self.devices
        )

    def _spread_of(self, plan: Plan, spread_fn) -> torch.Tensor:
        """Flat float64 per-position spread of one plan, in ``chunk_size`` row chunks."""
        args, kwargs = plan.call
        with self.evaluation_precision(plan):
            if self.chunk_size is None:
                return spread_fn(args, kwargs, slice(None), plan).reshape(-1).double()
            check_chunking(self.model, args, kwargs, self.chunk_size)
            parts = [
                spread_fn(a, k, slice(start, stop), plan).reshape(-1)
                for start, stop, a, k in chunks(args, kwargs, self.chunk_size)
            ]
        return torch.cat(parts).double()

    def _radii(self, params, update, tau: float, plans) -> dict[str, float] | None:
        """The ``extra_radii`` hook's radii (smallest over the micro-batches) as distances
        along v = p / tau, at the old parameter values; None without the hook."""
        if self.extra_radii is None:
            return None
        radii: dict[str, float] = {}
        direction = self.direction(params, update, frozen=False)
        for plan in plans:
            with self.evaluation_precision(plan):
                extra = self.extra_radii(self.model, plan.evaluated, direction)
            for key, t in dict(extra).items():
                radius, before = float(t) * tau, radii.get(str(key), math.inf)
                # min() would drop a NaN; keep it so the step is treated as a fault
                radii[str(key)] = math.nan if math.isnan(radius) else min(before, radius)
        missing = [k for k in (self.limit_by or ()) if k not in radii and k != "out"]
        if missing:
            raise KeyError(f"limit_by names {missing}, but the radii are {sorted(radii)}")
        return radii

    def _reduce(self, plans: list[Plan], spreads: list[torch.Tensor], radii) -> MeterReading:
        """The plans' spreads to one radius (:func:`reduce_spreads`: on the device, one
        host sync, the MAX over ranks), then the named radii."""
        keeps = [
            self.sampling.mask(plan.evaluated, spread.numel(), spread.device)
            for plan, spread in zip(plans, spreads, strict=True)
        ]
        found = reduce_spreads(
            spreads,
            keeps,
            quantile=self.sampling.quantile,
            temperature=self.temperature,
            over_ranks=True,
            process_group=self.process_group,
        )
        # the last plan's (inputs, spread, mask) for the buffer; never a non-finite one
        pending = (plans[-1].evaluated, spreads[-1], keeps[-1]) if found.finite_here else None
        rho, finite = found.rho_a, found.finite
        if finite and radii is not None:
            rho, finite, radii = self._limit_by_named_radii(rho, radii)
        samples = None
        if finite and self.keep_samples:
            valid = [v for v in found.kept if v.numel()]
            if valid:
                samples = radius_from_spread(torch.cat(valid), self.temperature).float().cpu()
        return MeterReading(
            found.spread, rho, found.bottleneck, finite, samples, radii, found.counted, pending
        )

    def _limit_by_named_radii(self, rho: float, radii: dict[str, float]):
        """The smallest of the radii named by ``limit_by``, the same on every rank
        (reduced as the equivalent spread pi T / rho, like the output spread)."""
        radii = dict(radii, out=rho)
        rho = min(radii[k] for k in (self.limit_by or radii))
        finite = not any(math.isnan(v) for v in radii.values())
        limit, finite = max_over_ranks(
            radius_from_spread(rho, self.temperature) if finite else 0.0,
            finite,
            self.process_group,
        )
        return radius_from_spread(limit, self.temperature), finite, radii


class TangentMeter(SpreadMeter):
    """``"jvp"`` / ``"fd"``: the slopes of the tangent at the old parameters."""

    def measure(self, plans: list[Plan], proposal, recheck: float | None):
        params, tau = proposal.params, proposal.tau
        # One transient copy: the tangent p (the JVP's primal is the old values).
        update = proposal.update()
        tangents = self.direction(params, update)
        spreads = [self._spread_of(plan, self._tangent(tangents)) / tau for plan in plans]
        del tangents
        radii = self._radii(params, update, tau, plans)
        del update
        return self._reduce(plans, spreads, radii)


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


class SecantMeter(SpreadMeter):
    """``"fast"``: one forward at old + f p against the training forward's logits (and
    one at old - f p near the bound)."""

    @contextmanager
    def precision(self):
        """Full float32 on CUDA for every measuring forward (a JVP has no cancellation:
        TF32 costs it 1e-3 relative, ``"fast"`` 10 %), and the model's own forward where
        Accelerate wrapped it in autocast (:func:`original_forward`)."""
        with full_float32() if self.devices else nullcontext(), original_forward(self.model):
            yield

    def measure(self, plans: list[Plan], proposal, recheck: float | None):
        """Moves the parameters through ``proposal`` (they end at old +/- f p)."""
        tau = proposal.tau
        radii = None
        fraction = self.fd_fraction(tau, proposal)
        baselines = [self._baseline(plan) for plan in plans]
        if self.extra_radii is not None:  # at the old values, before the shift
            radii = self._radii(proposal.params, proposal.update(), tau, plans)
        # projections of the logits at old + f p, for the check on the other side
        plus = None if recheck is None else [[] for _ in plans]
        proposal.move_to(fraction)
        spreads = self._shifted_spreads(plans, baselines, fraction * tau, plus)
        better = refined_step(fraction * tau, fraction * tau * self.spread_hint)
        if better is not None:  # the outputs moved too far or too little: redo
            fraction = away_from_one(better / tau)
            proposal.move_to(fraction)
            plus = None if plus is None else [[] for _ in plans]
            spreads = self._shifted_spreads(plans, baselines, fraction * tau, plus)
        self._check_resolved(baselines, fraction * tau, proposal)
        if recheck is not None and self.spread_hint >= recheck:
            proposal.move_to(-fraction)
            spreads, gap = self._other_side(plans, baselines, spreads, fraction * tau, plus)
            if gap > 1.0:
                self.watch.mismatch(self.method, gap)
                if not self.own_baseline and any(self._trained(plan) for plan in plans):
                    # the training forward's logits are not this function's: measure
                    # again against a baseline forward at the old parameters
                    self.own_baseline, self.spread_hint = True, None
                    proposal.move_to(0.0)
                    return self.measure(plans, proposal, recheck)
        del baselines
        return self._reduce(plans, spreads, radii)

    def _trained(self, plan: Plan) -> bool:
        """Whether the plan's baseline comes (partly) from the training forward."""
        return not self.own_baseline and (plan.baseline is not None or plan.head is not None)

    def fd_fraction(self, tau: float, proposal) -> float:
        """f = h / tau for the one-sided difference at old + f p: h moves the outputs by
        about ``FAST_MOVE`` at the previous step's spread (the first step guesses from
        ||old||; the parameters hold the old values here)."""
        dtype = proposal.params[0].dtype
        step = fast_step(proposal.norm, 1.0, dtype, moved_per_step=self.spread_hint)
        return away_from_one(step / tau)

    def _check_resolved(self, baselines, step: float, proposal) -> None:
        """Raise :class:`Unresolved` (parameters back at the old values) when the
        logits' move at the evaluation point, ``step * max spread``, is not above
        ``RESOLUTION`` times their rounding unit ``eps * max |z|``: each logit of a
        forward is rounded to eps |z| / 2, so the spread of a difference is off by up
        to 2 eps max |z| / move (an offset of 1e6 on float32 logits reads a spread of
        0 at the usual 0.01 move). The same decision on every rank."""
        tensors = [t for b in baselines for t in (b if isinstance(b, list) else [b])]
        tensors = [t for t in tensors if t.numel()]
        if not tensors:
            return
        magnitude = float(torch.stack([t.abs().amax().float() for t in tensors]).max())
        magnitude = max_over_ranks(magnitude, True, self.process_group)[0]
        moved = step * self.spread_hint
        eps = torch.finfo(tensors[0].dtype).eps
        if math.isfinite(magnitude) and math.isfinite(moved):
            if not moved > RESOLUTION * eps * magnitude:
                proposal.move_to(0.0)
                raise Unresolved(moved, magnitude)

    def _other_side(self, plans, baselines, spreads, step: float, plus):
        """Average each position's one-sided spread with the one from old - step v, and
        check the baseline: ``(spreads, gap)``.

        A one-sided secant is off by O(step |y''|): measured up to 7 % low on a tiny
        GPT-2 in float32, enough to break r <= target_r. The two secants err in
        opposite directions, and the spread (max - min) is a convex function of the
        slopes, so the mean of the two spreads bounds the derivative's spread from
        above up to O(step^2): one more forward, taken only near the bound.

        With both sides, (z(+h) - z0) + (z(-h) - z0) is O(h^2) for the baseline z0 of
        this function and 2 (z0' - z0) for a stale one (inputs or buffers changed after
        the training forward), while z(+h) - z(-h) = 2 h a either way. ``gap``: the
        largest |first| over the largest |second|, both through a few zero-sum
        projections of the classes (:func:`_projected`); above 1 the baseline is not
        this function's (a kink crossed within h gives at most about 1)."""
        minus = [[] for _ in plans]
        spreads = [
            0.5 * (spread + self._spread_of(plan, self._difference(baseline, sink)) / step)
            for plan, baseline, spread, sink in zip(plans, baselines, spreads, minus, strict=True)
        ]
        residual = odd = 0.0
        for baseline, above, below in zip(baselines, plus, minus, strict=True):
            parts = baseline if isinstance(baseline, list) else [baseline]
            middle = torch.cat([_projected(part) for part in parts])
            above, below = torch.cat(above), torch.cat(below)
            residual = max(residual, _finite_max(above + below - 2.0 * middle))
            odd = max(odd, _finite_max(above - below))
        return spreads, residual / odd if odd > 0 else 0.0

    def _difference(self, baseline, sink: list | None = None):
        def spread(args, kwargs, rows: slice, plan: Plan) -> torch.Tensor:
            shifted = self._forward(args, kwargs, plan)
            if sink is not None:
                sink.append(_projected(shifted))
            # a list: parts over consecutive rows, and the forward was not chunked
            parts = baseline if isinstance(baseline, list) else [baseline[rows]]
            spreads, start = [], 0
            for part in parts:
                stop = start + part.shape[0]
                spreads.append(spread_of_difference(shifted[start:stop], part))
                start = stop
            return spreads[0] if len(spreads) == 1 else torch.cat(spreads)

        return spread

    def _shifted_spreads(self, plans, baselines, step: float, sinks=None) -> list[torch.Tensor]:
        """Spreads per unit of v from forwards at the evaluation point old + step v
        (``sinks``: one list per plan collecting the logits' projections)."""
        sinks = sinks or [None] * len(plans)
        spreads = [
            self._spread_of(plan, self._difference(baseline, sink)) / step
            for plan, baseline, sink in zip(plans, baselines, sinks, strict=True)
        ]
        # The next step's first guess (move the outputs by about FAST_MOVE), and the
        # redo decision: the max over ranks, so that every rank evaluates at one point.
        local = float(torch.stack([s.max() for s in spreads]).max()) if plans else 0.0
        self.spread_hint = max_over_ranks(local, True, self.process_group)[0]
        return spreads

    def _baseline(self, plan: Plan):
        """Logits at the old values: the training forward's when the plan has them,
        else a forward (after the training forward's ``head`` rows, if any)."""
        if plan.baseline is not None and not self.own_baseline:
            return plan.baseline
        head = None if self.own_baseline else plan.head
        args, kwargs = plan.call if head is None else split_inputs(plan.tail)
        with self.evaluation_precision(plan):
            parts = [
                self._forward(a, k, plan) for _, _, a, k in chunks(args, kwargs, self.chunk_size)
            ]
        if head is not None:  # the subset's rows from the training forward
            parts.insert(0, head)
        if self.chunk_size is None and len(parts) > 1:
            return parts  # head and tail, left apart (see Plan)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


_PROJECTIONS = 4  # zero-sum class projections of the baseline check
_projectors: dict[tuple, torch.Tensor] = {}


def _projected(logits: torch.Tensor) -> torch.Tensor:
    """``(positions, 4)``: the logits ``(..., K)`` times fixed random zero-sum sign
    vectors over the classes (a shift common to all classes, which no spread sees,
    drops out; 4 numbers per position instead of K)."""
    classes = logits.shape[-1]
    key = (classes, logits.device, logits.dtype)
    if key not in _projectors:
        fixed = torch.Generator().manual_seed(0)  # never the training RNG
        signs = torch.randint(0, 2, (classes, _PROJECTIONS), generator=fixed) * 2.0
        _projectors[key] = (signs - signs.mean(0)).to(logits.device, logits.dtype)
    return logits.reshape(-1, classes) @ _projectors[key]


def _finite_max(values: torch.Tensor) -> float:
    """max |values| over the finite entries (masked classes give inf / nan), 0 if none."""
    values = values.abs()
    return float(values.nan_to_num(0.0, 0.0, 0.0).max()) if values.numel() else 0.0


def make_meter(method: str, model: nn.Module, **settings) -> SpreadMeter:
    """The meter for ``method`` (``"auto"``: a tangent meter until it is resolved)."""
    return SpreadMeter(model, method=method, **settings).with_method(method)


def away_from_one(fraction: float) -> float:
    """The final step is recovered from the evaluation point and the proposal as a
    lerp with weight (s - f) / (1 - f): keep f away from 1."""
    return 0.5 if abs(1.0 - fraction) < 0.5 else fraction

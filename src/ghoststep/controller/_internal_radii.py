"""Internal radii of a transformer, and the controller limited by them.

The controller limits a step by the output-logit radius ``rho_out`` (its rho_a).
:func:`internal_radii` measures other radii of a transformer whose forward can expose
its internals, along any direction; :class:`AllRadiiController` is the controller
limited by the smallest of them (the paper's all-radii controller, Section 6.6):

* ``attn``: ``pi / Delta_attn``, the softmax-ghost bound of the pre-softmax attention
  logits (the largest spread of their tangents over layers, heads, queries, samples);
* ``ffn``: ``Q_q(|h| / |h_dot|)``, the distance of the FFN pre-activations to the
  ReLU kink (a conservative proxy, not a bound; paper Appendix 2).

The model must accept ``return_internals=True`` and then return ``(logits,
{"attention_logits": [s, ...], "ffn_preacts": [h, ...]})``: per layer the scores
``s`` (B, H, T_q, T_k), causally masked keys at ``-inf``, and the pre-activations
``h`` (B, T, d_ff).

Example::

    ctrl = AllRadiiController(torch.optim.Adam(model.parameters()), model)
    ...
    ctrl.step()
    ctrl.last_radii, ctrl.last_binding  # {"out": ..., "attn": ..., "ffn": ...}, "ffn"
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from ghoststep.evaluation import directional, trainable_parameters
from ghoststep.radius import logit_spread, radius_from_spread

from ._controller import RadiusController

__all__ = ["RADII", "internal_radii", "AllRadiiController"]

RADII = ("out", "attn", "ffn")
_KEYS = {"attn": "attention_logits", "ffn": "ffn_preacts"}  # where each is in the internals


def internal_radii(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    direction: Sequence[torch.Tensor | None],
    *,
    ffn_quantile: float = 0.01,
) -> dict[str, float]:
    """Attention and FFN radii of a transformer along ``direction``, in units of t.

    One forward-mode JVP of ``model(inputs, return_internals=True)`` (which returns the
    pre-softmax attention logits ``s`` (B, H, T, T) and FFN pre-activations ``h``
    (B, T, d_ff) per layer) gives the tangents ``s_dot``, ``h_dot`` along v. Then

    * ``attn``: ``pi / max(max_keys s_dot - min_keys s_dot)`` over layers, heads,
      queries and samples (the softmax-ghost bound of every attention row; causally
      masked keys, at -inf, are left out);
    * ``ffn``: the ``ffn_quantile`` quantile of ``|h| / |h_dot|`` over every
      pre-activation entry with ``h_dot != 0`` (the distance to the ReLU kink,
      paper Appendix 2; a conservative proxy, not a bound).

    ``direction`` is aligned with the model's trainable parameters (None: zero); it
    need not have unit norm: the radii are in units of t along it (``theta + t
    direction``), so ``||direction||`` times a radius is its distance in parameter space.
    Parameters, buffers and the RNG are left untouched; no autograd graph is built.
    """
    named = trainable_parameters(model)
    if len(direction) != len(named):
        raise ValueError(f"direction has {len(direction)} parts for {len(named)} parameters")

    def internals(out):
        return out[1]["attention_logits"], out[1]["ffn_preacts"]

    (scores, pre), (dscores, dpre) = directional(
        model, (inputs,), {"return_internals": True}, list(direction), output_fn=internals
    )
    spread = max((_attention_spread(s, d) for s, d in zip(scores, dscores)), default=0.0)
    ratios = [_kink_ratios(p, d) for p, d in zip(pre, dpre)]
    return {"attn": radius_from_spread(spread), "ffn": _quantile(ratios, ffn_quantile)}


def _attention_spread(scores: torch.Tensor, dscores: torch.Tensor) -> float:
    """Largest spread of the score tangents over the keys a query attends to: (...,
    T_q, T_k) scores, masked (causal) keys at -inf are left out (their tangent is 0).
    A query with every key masked spreads -inf - inf = -inf, which the max passes by."""
    masked = scores == -math.inf
    if not bool(masked.any()):
        return float(logit_spread(dscores).max())
    hi = dscores.masked_fill(masked, -math.inf).amax(-1)
    lo = dscores.masked_fill(masked, math.inf).amin(-1)
    return max(float((hi - lo).max()), 0.0)


def _kink_ratios(pre: torch.Tensor, dpre: torch.Tensor) -> torch.Tensor:
    """``|h| / |h_dot|`` (flat float64) over the pre-activation entries that move."""
    h, dh = pre.reshape(-1).double(), dpre.reshape(-1).double().abs()
    moving = dh > 0
    return h[moving].abs() / dh[moving]


def _quantile(ratios: Sequence[torch.Tensor], q: float) -> float:
    """The ``q`` quantile (the ``ceil(q n)``-th smallest) of the ratios; inf if none."""
    ratio = torch.cat(list(ratios)) if ratios else torch.empty(0, dtype=torch.float64)
    if not ratio.numel():
        return math.inf
    return float(ratio.kthvalue(max(1, int(math.ceil(q * ratio.numel())))).values)


class _InPass:
    """The attention / FFN radii read from the forwards the controller runs anyway.

    The controller calls the model with :attr:`kwargs` (``return_internals=True``) and
    reads its output through a wrapper that passes the logits on and keeps what the
    radii need of the internals: only the radii in ``names``, and for ``"ffn"`` the kink
    ratios (float64, one per moving pre-activation entry) only when it is asked for.

    * ``"jvp"`` (:meth:`reading`, then :meth:`radii`): the tangents, while the dual
      tensors are alive; chunked forwards add up, one micro-batch at a time.
    * ``"fast"`` (:meth:`recording` at old + f p and old - f p, then
      :meth:`secant_radii`): the internals of both sides, one micro-batch ``key``
      each, and from them the central difference ``(y(+f) - y(-f)) / 2f`` as the
      tangent and ``(y(+f) + y(-f)) / 2`` as the value at old (both O(f^2) off).

    Radii are in units of t along the update the forwards moved by.
    """

    kwargs = {"return_internals": True}

    def __init__(self, names: Sequence[str], ffn_quantile: float) -> None:
        self.names = tuple(n for n in RADII[1:] if n in names)
        self.ffn_quantile = ffn_quantile
        self.sides: dict[tuple[int, bool], tuple[float, list]] = {}
        self.begin()

    def begin(self) -> None:
        self._spread = 0.0
        self._ratios: list[torch.Tensor] = []

    def reading(self, logits_fn: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
        def read(out):
            logits, internals = out
            self._keep({n: map(_primal_tangent, internals[_KEYS[n]]) for n in self.names})
            return logits_fn(logits)

        return read

    def recording(self, logits_fn, index: int, fraction: float) -> Callable[[Any], torch.Tensor]:
        """An output function that keeps the internals of micro-batch ``index``'s
        forwards (chunks in order) at old + ``fraction`` p, on the side of its sign; a
        new point on the + side drops the - side's, taken at another point."""
        kept: list[dict[str, list[torch.Tensor]]] = []
        if fraction > 0:
            self.sides.pop((index, False), None)
        self.sides[index, fraction > 0] = (fraction, kept)

        def read(out):
            logits, internals = out
            kept.append({n: [t.detach() for t in internals[_KEYS[n]]] for n in self.names})
            return logits_fn(logits)

        return read

    def recorded(self, index: int) -> bool:
        """Whether micro-batch ``index`` has the internals of both sides."""
        return (index, True) in self.sides and (index, False) in self.sides

    def secant_radii(self, index: int) -> dict[str, float]:
        """Micro-batch ``index``'s radii from the internals of its two sides."""
        (fraction, above), (_, below) = (
            self.sides.pop((index, True)),
            self.sides.pop((index, False)),
        )

        def central(a, b):
            return 0.5 * (a + b), (a - b) / (2.0 * fraction)

        for a, b in zip(above, below, strict=True):
            self._keep({n: map(central, a[n], b[n]) for n in self.names})
        return self.radii()

    def _keep(self, pairs) -> None:
        """Reduce ``{name: (value, tangent) per layer}`` into the running radii."""
        for value, tangent in pairs.get("attn", ()):
            self._spread = max(self._spread, _attention_spread(value, tangent))
        self._ratios += [_kink_ratios(value, tangent) for value, tangent in pairs.get("ffn", ())]

    def radii(self) -> dict[str, float]:
        """The micro-batch's radii; the next reading starts afresh."""
        out = {}
        if "attn" in self.names:
            out["attn"] = radius_from_spread(self._spread)
        if "ffn" in self.names:
            out["ffn"] = _quantile(self._ratios, self.ffn_quantile)
        self.begin()
        return out


def _primal_tangent(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dual tensor's primal and tangent (zero where nothing moves it)."""
    primal, tangent = fwAD.unpack_dual(x)
    return primal, torch.zeros_like(primal) if tangent is None else tangent


def _internal_radii_hook(
    model, inputs, update, *, names: Sequence[str], ffn_quantile: float
) -> dict[str, float]:
    """``RadiusController(extra_radii=...)`` hook: the radii ``names`` along p, from
    their own JVP (the methods that take no forward-mode pass of their own)."""
    x = inputs[0] if isinstance(inputs, tuple) else inputs
    radii = internal_radii(model, x, update, ffn_quantile=ffn_quantile)
    return {k: radii[k] for k in names}


class AllRadiiController(RadiusController):
    """A :class:`~ghoststep.RadiusController` whose radius is ``min`` over several terms.

    Every step it measures the output-logit radius ``rho_out`` exactly as the base
    controller does, plus the attention and FFN radii of :func:`internal_radii` along
    the same update, and uses ``rho_net = min(rho_x for x in limit_by)``
    (``StepStats.radius``; ``StepStats.rho_a`` is ``rho_out``). This is the paper's
    all-radii controller of Section 6.6 (``limit_by=("out", "attn", "ffn")``, the
    default).

    Only the radii in ``limit_by`` or ``report`` are measured, from the forwards the
    controller runs for the output radius, called with ``return_internals=True``:

    * ``method="jvp"``: the tangents of the attention logits and FFN pre-activations
      in the controller's own forward-mode pass, beside those of the output logits
      (the values :func:`internal_radii` gives, at the cost of a reduction over
      tensors the pass computes anyway);
    * ``"fast"``: the central difference of the internals at old + f p (the secant's
      forward) and old - f p (the recheck's forward near the bound, else one more
      forward), O(f^2) off the tangent: within about 1e-3 of the JVP's radii;
    * ``"fd"``: one :func:`internal_radii` JVP per micro-batch.

    The radii measured and the binding term are kept in ``last_radii`` /
    ``last_binding`` (``StepStats.radii`` / ``binding``), e.g. an output-only
    controller that records the other two: ``limit_by=("out",), report=("attn",
    "ffn")``.

    Args:
        limit_by: the radii that limit the step, a subset of ``("out", "attn", "ffn")``.
        report: radii measured and recorded without limiting the step.
        ffn_quantile: quantile q of ``Q_q(|h| / |h_dot|)``.
        Everything else: as :class:`~ghoststep.RadiusController`.
    """

    def __init__(
        self,
        optimizer,
        model,
        *,
        limit_by: Sequence[str] = RADII,
        report: Sequence[str] = (),
        ffn_quantile: float = 0.01,
        **kwargs,
    ) -> None:
        for name, names in (("limit_by", limit_by), ("report", report)):
            if set(names) - set(RADII) or (name == "limit_by" and not names):
                kind = "a non-empty subset" if name == "limit_by" else "a subset"
                raise ValueError(f"{name} must be {kind} of {RADII}, got {tuple(names)!r}")
        if not 0.0 < ffn_quantile <= 1.0:
            raise ValueError(f"ffn_quantile must be in (0, 1], got {ffn_quantile!r}")
        measured = tuple(k for k in RADII[1:] if k in set(limit_by) | set(report))
        hook = None
        if measured:
            hook = functools.partial(
                _internal_radii_hook, names=measured, ffn_quantile=float(ffn_quantile)
            )
        super().__init__(optimizer, model, extra_radii=hook, limit_by=tuple(limit_by), **kwargs)
        self.ffn_quantile = float(ffn_quantile)
        self.report = tuple(report)
        self._in_pass = _InPass(measured, self.ffn_quantile) if measured else None

    @property
    def last_radii(self) -> dict[str, float] | None:
        return None if self.last is None else self.last.radii

    @property
    def last_binding(self) -> str | None:
        return None if self.last is None else self.last.binding

"""Internal radii of a transformer: an ``extra_radii`` provider for the controller.

The controller limits a step by the output-logit radius ``rho_out`` (its rho_a).
Its ``extra_radii`` hook adds other radii measured along the same update;
:func:`internal_radii` is that hook for a transformer whose forward can expose its
internals, and :class:`AllRadiiController` the controller that uses it (the paper's
all-radii controller, Section 6.6):

* ``attn``: ``pi / Delta_attn``, the softmax-ghost bound of the pre-softmax attention
  logits (the largest spread of their tangents over layers, heads, queries, samples);
* ``ffn``: ``Q_q(|h| / |h_dot|)``, the distance of the FFN pre-activations to the
  ReLU kink (a conservative proxy, not a bound; paper Appendix 2).

The model must accept ``return_internals=True`` and then return ``(logits,
{"attention_logits": [s, ...], "ffn_preacts": [h, ...]})``: per layer the scores
``s`` (B, H, T_q, T_k), causally masked keys at ``-inf``, and the pre-activations
``h`` (B, T, d_ff).

Example (any ``extra_radii`` hook has this signature)::

    ctrl = AllRadiiController(torch.optim.Adam(model.parameters()), model)
    ...
    ctrl.step()
    ctrl.last_radii, ctrl.last_binding  # {"out": ..., "attn": ..., "ffn": ...}, "ffn"
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from ghoststep.evaluation import directional, trainable_parameters
from ghoststep.radius import logit_spread, radius_from_spread

from ._controller import RadiusController

__all__ = ["RADII", "internal_radii", "AllRadiiController"]

RADII = ("out", "attn", "ffn")


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
    need not have unit norm: divide the radii by ``||direction||`` for unit units.
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
    rho_attn = radius_from_spread(spread)
    h = torch.cat([p.reshape(-1) for p in pre]).double()
    dh = torch.cat([d.reshape(-1) for d in dpre]).double().abs()
    moving = dh > 0
    if bool(moving.any()):
        ratio = h[moving].abs() / dh[moving]
        k = max(1, int(math.ceil(ffn_quantile * ratio.numel())))
        rho_ffn = float(ratio.kthvalue(k).values)
    else:
        rho_ffn = math.inf
    return {"attn": rho_attn, "ffn": rho_ffn}


def _attention_spread(scores: torch.Tensor, dscores: torch.Tensor) -> float:
    """Largest spread of the score tangents over the keys a query attends to: (...,
    T_q, T_k) scores, masked (causal) keys at -inf are left out (their tangent is 0)."""
    live = torch.isfinite(scores)
    if bool(live.all()):
        return float(logit_spread(dscores).max())
    hi = dscores.masked_fill(~live, -math.inf).amax(-1)
    lo = dscores.masked_fill(~live, math.inf).amin(-1)
    return float(torch.where(live.any(-1), hi - lo, torch.zeros_like(hi)).max())


def _internal_radii_hook(model, inputs, update, *, ffn_quantile: float) -> dict[str, float]:
    """``RadiusController(extra_radii=...)`` hook: attention and FFN radii along p."""
    return internal_radii(
        model, inputs[0] if isinstance(inputs, tuple) else inputs, update, ffn_quantile=ffn_quantile
    )


class AllRadiiController(RadiusController):
    """A :class:`~ghoststep.RadiusController` whose radius is ``min`` over several terms.

    Every step it measures the output-logit radius ``rho_out`` exactly as the base
    controller does, plus the attention and FFN radii of :func:`internal_radii` along
    the same update (through the controller's ``extra_radii`` hook), and uses
    ``rho_net = min(rho_x for x in limit_by)`` (``StepStats.radius``; ``StepStats.rho_a``
    is ``rho_out``). All three radii and the binding term are kept in ``last_radii`` /
    ``last_binding`` whatever ``limit_by`` is, so an output-only controller
    (``limit_by=("out",)``) or a monitored run still reports them. This is the paper's
    all-radii controller of Section 6.6 (``limit_by=("out", "attn", "ffn")``, the
    default).

    Args:
        limit_by: the radii that limit the step, a subset of ``("out", "attn", "ffn")``.
        ffn_quantile: quantile q of ``Q_q(|h| / |h_dot|)``.
        Everything else: as :class:`~ghoststep.RadiusController`.
    """

    def __init__(
        self,
        optimizer,
        model,
        *,
        limit_by: Sequence[str] = RADII,
        ffn_quantile: float = 0.01,
        **kwargs,
    ) -> None:
        unknown = set(limit_by) - set(RADII)
        if unknown or not limit_by:
            raise ValueError(f"limit_by must be a non-empty subset of {RADII}, got {limit_by!r}")
        if not 0.0 < ffn_quantile <= 1.0:
            raise ValueError(f"ffn_quantile must be in (0, 1], got {ffn_quantile!r}")
        hook = functools.partial(_internal_radii_hook, ffn_quantile=float(ffn_quantile))
        super().__init__(optimizer, model, extra_radii=hook, limit_by=tuple(limit_by), **kwargs)
        self.ffn_quantile = float(ffn_quantile)

    @property
    def last_radii(self) -> dict[str, float] | None:
        return None if self.last is None else self.last.radii

    @property
    def last_binding(self) -> str | None:
        return None if self.last is None else self.last.binding

"""The training stabilizers people use, as methods of the shared spike protocol.

Each method is a setting of :func:`~ghoststep_lab.common.training.controlled_run`:
a gradient transform applied after backward (the clippers), a replacement of the
base optimizer (the Adam variants), or the radius controller's mode.

===============  ====================================================  =================
method           what it does                                          implementation
===============  ====================================================  =================
``plain``        the bare base optimizer                               torch / pytorch-
                                                                       optimizer (Lion)
``clip_grad``    ``clip_grad_norm_(max_norm=1)``                       torch
``agc``          unit-wise adaptive gradient clipping (Brock et al.    ``pytorch_optimizer
                 2021): each unit's gradient norm <= lambda x           .agc``
                 max(unit parameter norm, 1e-3), lambda = 0.01
``zclip``        z-score clipping of the global gradient norm against  ``zclip.ZClip``
                 its EMA mean / std (Kumar et al. 2025)                (PyPI ``zclip``)
``adagc``        Adam with per-parameter adaptive clipping against     ``pytorch_optimizer
                 each tensor's EMA gradient norm (Wang et al. 2025)    .AdaGC``
``spam``         Adam with spike clipping (g^2 > theta v) and          ``pytorch_optimizer
                 periodic momentum reset (Huang et al. 2025)           .SPAM``
``stable_spam``  SPAM with adaptive max-clipping and gradient-norm     ``pytorch_optimizer
                 scaling (Huang et al. 2025)                           .StableSPAM``
``controller``   ``RadiusController(mode="clip", target_r=1)``         ghoststep
``controller_set`` ``RadiusController(mode="set", target_r=1)``        ghoststep
===============  ====================================================  =================

``adagc``, ``spam`` and ``stable_spam`` are Adam variants: they replace Adam and have
no SGD or Lion form, so they run with ``optimizer="adam"`` only. Settings beyond the
packages' defaults (chosen before any run, none tuned): no weight decay anywhere (the
plain Adam runs have none); ZClip without its fixed ``max_grad_norm=1`` fallback (that
is ``clip_grad``); AdaGC's warm-up (absolute clipping at norm 1) shortened from 100 to
25 steps, ZClip's warm-up, so that its adaptive clipping is active at a step-50 spike.
Only the controllers are wrapped in a :class:`~ghoststep.RadiusController`; the other
methods train the bare optimizer (``wrap=False``), so their wall clock is theirs alone.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch

from ghoststep_lab.common.data import markov_language
from ghoststep_lab.common.training import RunRecord, controlled_run, token_cross_entropy

__all__ = [
    "METHODS",
    "ADAM_ONLY",
    "SOURCES",
    "AGC",
    "ZClipTransform",
    "applicable",
    "method_settings",
    "arch_settings",
    "stabilizer_run",
]

METHODS = (
    "plain",
    "clip_grad",
    "agc",
    "zclip",
    "adagc",
    "spam",
    "stable_spam",
    "controller",
    "controller_set",
)
ADAM_ONLY = ("adagc", "spam", "stable_spam")
SOURCES = {
    "plain": "torch.optim (Adam, SGD); pytorch-optimizer 4.1.0 Lion",
    "clip_grad": "torch.nn.utils.clip_grad_norm_",
    "agc": "pytorch-optimizer 4.1.0, function agc (applied to every parameter)",
    "zclip": "zclip 1.0.0, class ZClip (max_grad_norm=None)",
    "adagc": "pytorch-optimizer 4.1.0, class AdaGC (weight_decay=0, warmup_steps=25)",
    "spam": "pytorch-optimizer 4.1.0, class SPAM (defaults)",
    "stable_spam": "pytorch-optimizer 4.1.0, class StableSPAM (defaults)",
    "controller": "ghoststep RadiusController(mode='clip', target_r=1)",
    "controller_set": "ghoststep RadiusController(mode='set', target_r=1)",
}


class AGC:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, arXiv:2102.06171).

    For each unit i (a row of a weight matrix, a filter of a convolution, a whole
    bias vector): ``G_i <- G_i * lambda * max(||W_i||, eps) / ||G_i||`` when
    ``||G_i|| > lambda * max(||W_i||, eps)``; other units are left alone. Calls
    ``pytorch_optimizer.agc`` on every parameter with a gradient.
    """

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3):
        from pytorch_optimizer.optimizer.agc import agc

        if clipping <= 0 or eps <= 0:
            raise ValueError(f"clipping and eps must be > 0, got {clipping}, {eps}")
        self.clipping, self.eps, self._agc = clipping, eps, agc

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.copy_(self._agc(p, p.grad, agc_eps=self.eps, agc_clip_val=self.clipping))


class ZClipTransform:
    """Z-score gradient-norm clipping (Kumar et al. 2025, arXiv:2504.02507) via ``zclip``.

    After ``warmup_steps`` steps that only collect ||g||, each step computes
    ``z = (||g|| - mu) / sigma`` from the EMA mean and variance (``alpha``); when
    ``z > z_thresh`` the gradient is rescaled to norm ``mu + z_thresh^2 sigma / z``
    (the package's ``adaptive_scaling``), and the EMA is updated with the clipped
    norm. ``max_grad_norm=None``: no fixed cap on top.
    """

    def __init__(self, z_thresh: float = 2.5, alpha: float = 0.97, warmup_steps: int = 25):
        from zclip import ZClip

        self.zclip = ZClip(
            alpha=alpha, z_thresh=z_thresh, max_grad_norm=None, warmup_steps=warmup_steps
        )

    def __call__(self, model: torch.nn.Module) -> None:
        self.zclip.step(model)


def _adagc(params, lr: float, warmup_steps: int = 25):
    from pytorch_optimizer import AdaGC

    return AdaGC(params, lr=lr, weight_decay=0.0, warmup_steps=warmup_steps)


def _spam(params, lr: float, reset_every: int = 500):
    from pytorch_optimizer import SPAM

    return SPAM(params, lr=lr, update_proj_gap=reset_every)


def _stable_spam(params, lr: float, reset_every: int = 1000):
    from pytorch_optimizer import StableSPAM

    return StableSPAM(params, lr=lr, update_proj_gap=reset_every)


def applicable(method: str, optimizer: str) -> bool:
    """Whether ``method`` runs with base ``optimizer`` (the Adam variants: Adam only)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return optimizer == "adam" or method not in ADAM_ONLY


def method_settings(
    method: str,
    optimizer: str = "adam",
    *,
    target_r: float = 1.0,
    clip_norm: float = 1.0,
    agc_lambda: float = 0.01,
    zclip_z: float = 2.5,
    adagc_warmup: int = 25,
    spam_reset_every: int = 500,
) -> dict[str, Any]:
    """Keyword arguments of :func:`controlled_run` that make ``method`` on ``optimizer``.

    >>> method_settings("controller")["mode"], method_settings("zclip")["wrap"]
    ('clip', False)
    """
    if not applicable(method, optimizer):
        raise ValueError(f"{method} is an Adam variant; it does not run with {optimizer!r}")
    out: dict[str, Any] = dict(optimizer=optimizer, mode="monitor", wrap=False, method=method)
    if method in ("controller", "controller_set"):
        out.update(wrap=True, mode="clip" if method == "controller" else "set", target_r=target_r)
    elif method == "clip_grad":
        out["clip_norm"] = clip_norm
    elif method == "agc":
        out["grad_transform"] = functools.partial(AGC, agc_lambda)
    elif method == "zclip":
        out["grad_transform"] = functools.partial(ZClipTransform, zclip_z)
    elif method == "adagc":
        out["optimizer"] = functools.partial(_adagc, warmup_steps=adagc_warmup)
    elif method == "spam":
        out["optimizer"] = functools.partial(_spam, reset_every=spam_reset_every)
    elif method == "stable_spam":
        out["optimizer"] = _stable_spam
    return out


def arch_settings(arch: str, batch_size: int, lm: Mapping[str, int] | None = None) -> dict:
    """Data, loss and model arguments of :func:`controlled_run` for ``arch``.

    The digits classifiers use the defaults. ``"tinylm"`` trains on
    :func:`~ghoststep_lab.common.data.markov_language` (``lm``: ``vocab``,
    ``seq_len``, ``order``, ``batch_size``) with GPT-2's embedding init (std 0.02).
    """
    if arch != "tinylm":
        return dict(batch_size=batch_size)
    lm = dict(lm or {})
    vocab, seq_len = lm.get("vocab", 32), lm.get("seq_len", 16)
    return dict(
        batch_size=lm.get("batch_size", 32),
        data=markov_language(vocab=vocab, seq_len=seq_len, order=lm.get("order", 1)),
        loss_fn=token_cross_entropy,
        model_kwargs=dict(
            vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_len=seq_len, emb_std=0.02
        ),
    )


def stabilizer_run(
    arch: str,
    method: str,
    optimizer: str,
    lr: float,
    seed: int,
    *,
    factor: float = 1.0,
    spike_at: int | None = None,
    spike_steps: int | None = None,
    steps: int = 200,
    batch_size: int = 64,
    eval_every: int = 5,
    lm: Mapping[str, int] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> RunRecord:
    """One run of ``method`` on base ``optimizer`` at base LR ``lr`` (a spike optional).

    ``settings`` go to :func:`method_settings` (thresholds, target_r). A job of plain
    values, so it travels to worker processes.
    """
    return controlled_run(
        arch,
        seed=seed,
        lr=lr,
        steps=steps,
        factor=factor,
        spike_at=spike_at,
        spike_steps=spike_steps,
        eval_every=eval_every,
        **arch_settings(arch, batch_size, lm),
        **method_settings(method, optimizer, **dict(settings or {})),
    )

"""Directional logit slopes of any PyTorch model, and their per-sample spreads.

Along a parameter step ``theta + t v`` the logits of every sample move, to first order,
as ``z + a t`` with slopes ``a = J_z(x) v``: one forward-mode Jacobian-vector product
per batch. ``logit_slopes`` computes ``(z, a)``; ``per_sample_spread`` reduces them
chunk by chunk to the spread ``Delta a = max_k a_k - min_k a_k`` (the radius is
``rho_a = pi T / Delta a``; ``measure`` turns spreads into radii, see
``ghoststep.radius`` for the math).

Methods and semantics
---------------------
All evaluation goes through ``ghoststep.evaluation.directional`` (the package's page
states what exactly is differentiated and the side-effect guarantees): the model runs in its
current mode (train-mode BatchNorm uses batch statistics, dropout draws a mask);
parameters, buffers and the RNG stream are left bitwise as they were.

* ``method="jvp"``: forward-mode AD, one pass, exact.
* ``method="fd"``: central difference in float64 (three forwards), a reference.
* ``method="fast"``: one-sided float32 difference through the model's ordinary
  forward (two forwards here; inside the controller one, against the training
  forward's logits). Relative error about 1e-4 to 1e-3 on smooth networks; a secant
  across ReLU / max-pool switches within the step h.

Directions are dicts, aligned sequences or flat tensors over the trainable
parameters (``ghoststep.evaluation`` states the rules and builds gradient and random
directions).

Reference: P. Sao, "Ghosts of Softmax", arXiv:2603.13552 (2026), section 3.

>>> import torch
>>> from ghoststep.evaluation import random_direction
>>> from ghoststep.measurement import logit_slopes, per_sample_spread
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> x = torch.randn(5, 4)
>>> v = random_direction(model, seed=1)
>>> logits, slopes = logit_slopes(model, x, v)
>>> slopes.shape
torch.Size([5, 3])
>>> per_sample_spread(model, x, v, chunk_size=2).shape
torch.Size([5])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..evaluation._directional import SLOPE_METHODS, directional, fast_step
from ..evaluation._directions import direction_norm, resolve_direction, trainable_parameters
from ..evaluation._masks import keep_mask
from ..evaluation._outputs import detect_layout, logits_reader
from ..evaluation._replay import check_chunking, chunks, split_inputs
from ..radius._bounds import logit_spread

__all__ = ["logit_slopes", "per_sample_spread", "flatten_samples"]


class _Evaluator:
    """``(logits, slopes)`` of slices of the inputs along one resolved direction."""

    def __init__(self, model, direction, method, logits_fn, secant_step):
        if method not in SLOPE_METHODS:
            raise ValueError(f"method must be one of {SLOPE_METHODS}, got {method!r}")
        if secant_step is not None and not (
            isinstance(secant_step, (int, float)) and secant_step > 0
        ):
            raise ValueError(f"secant_step must be a positive number, got {secant_step!r}")
        self.model = model
        self.method = method
        self.logits_fn = logits_reader(logits_fn)
        self.tangents = resolve_direction(model, direction)
        self.step = secant_step
        if method == "fast" and secant_step is None:  # one step for every chunk
            params = [p.detach() for _, p in trainable_parameters(model)]
            norm = float(direction_norm(self.tangents))
            self.step = fast_step(float(direction_norm(params)), norm, params[0].dtype)

    def __call__(self, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return directional(
            self.model,
            args,
            kwargs,
            self.tangents,
            method=self.method,
            output_fn=self.logits_fn,
            step=self.step,
        )


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


def logit_slopes(
    model: nn.Module,
    inputs,
    direction,
    *,
    method: str = "jvp",
    logits_fn: Callable[[Any], Any] | None = None,
    chunk_size: int | None = None,
    secant_step: float | None = None,
    class_dim: int | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``z`` and directional logit slopes ``a = J_z(x) v`` of every sample.

    Args:
        model: any ``nn.Module``; evaluated in its current mode, without side effects
            (see the module docstring).
        inputs: a tensor, a tuple/list of tensors (positional arguments), a dict
            (keyword arguments, e.g. ``input_ids``, ``attention_mask``) or a
            ``ghoststep.Call`` (any call, made exactly as given).
        direction: parameter-space direction v (dict, aligned sequence or flat
            tensor; see the module docstring). It need not be unit norm: the slopes
            are linear in v.
        method: ``"jvp"`` (forward-mode AD, exact), ``"fd"`` (float64 central
            difference) or ``"fast"`` (one-sided float32 difference, two forwards).
        logits_fn: maps the model output to the logits tensor, or to several softmax
            heads (a tuple / list / dict of (B, ...) tensors, joined along the
            positions: ``ghoststep.evaluation.LogitsReader``); default
            ``default_logits_fn`` (a tensor, ``.logits``, a dict whose only non-scalar
            tensor is ``"logits"``, or a Hugging Face ``(loss, logits)`` tuple; never a
            guess). A single logit per sample (shape (B,) or (..., 1), a binary
            classifier) is read as the two-class softmax [0, z]; ``-inf`` logits
            (masked classes) drop out of the spread.
        class_dim: the class axis of the logits (e.g. 1 for ``F.cross_entropy``'s
            (B, C, d1, ...)); moved last in the result. Default: a Hugging Face
            model's (``*ForSemanticSegmentation``: 1), else the last axis.
        activation: ``"softmax"`` or ``"sigmoid"`` (every logit its own binary
            classifier, read as [0, z]: result (..., L, 2)); default softmax, or
            sigmoid for a Hugging Face ``multi_label_classification`` model.
        chunk_size: evaluate the input batch in slices of this many rows (dim 0) and
            concatenate. Not allowed when a BatchNorm uses batch statistics (the
            slopes would depend on the chunking).
        secant_step: step h for ``"fd"`` (theta +- h v; default eps^(1/3)/||v||) and
            ``"fast"`` (theta + h v; default ``ghoststep.evaluation.fast_step``).
    Returns:
        ``(logits, slopes)``, both in the reader's layout (positions..., K) (e.g.
        (B, K) or (B, T, V)); slopes in logit units per unit of t along v.
    Raises:
        ValueError: bad direction (names the parameter), bad method or chunk_size, no
            trainable parameters.
        TypeError: non-tensor inputs.
        NotImplementedError: an op without forward-mode AD (names it, suggests fixes).
    """
    logits_fn = reader_for(model, logits_fn, class_dim, activation)
    parts = _per_chunk(
        model, inputs, direction, method, logits_fn, secant_step, chunk_size, lambda z, a: (z, a)
    )
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def reader_for(model: nn.Module, logits_fn, class_dim, activation):
    """The :class:`~ghoststep.evaluation.LogitsReader` of the measurement functions: the
    arguments, else a Hugging Face model's layout, else the class axis last."""
    detected_dim, detected_activation = detect_layout(model)
    if class_dim is None and activation is None:
        class_dim, activation = detected_dim, detected_activation
    return logits_reader(
        logits_fn,
        class_dim=-1 if class_dim is None else class_dim,
        activation=activation or "softmax",
    )


def _per_chunk(model, inputs, direction, method, logits_fn, secant_step, chunk_size, keep):
    """``keep(logits, slopes)`` of every chunk of the batch, in order.

    Only what ``keep`` returns outlives its chunk, so a reduction (the spread) never
    holds more than one chunk's logits and tangent.
    """
    args, kwargs = split_inputs(inputs)
    evaluator = _Evaluator(model, direction, method, logits_fn, secant_step)
    check_chunking(model, args, kwargs, chunk_size)
    with _guarded(model):
        return [keep(*evaluator(a, k)) for _, _, a, k in chunks(args, kwargs, chunk_size)]


def sample_mask(
    sample_shape, device, mask=None, targets=None, ignore_index=None
) -> torch.Tensor | None:
    """Bool keep-mask of the sample shape from ``mask`` and ``targets != ignore_index``;
    None when neither is given (every sample kept). Checks the mask, then
    :func:`keep_mask`."""
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(sample_shape):
            raise ValueError(
                f"mask must have the sample shape {tuple(sample_shape)} (logits without the "
                f"class axis), got {tuple(mask.shape)}"
            )
    return keep_mask(mask, targets, ignore_index, device)


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
    keep = sample_mask(logits.shape[:-1], logits.device, mask)
    v = logits.shape[-1]
    rows = logits.reshape(-1, v)
    srows = slopes.reshape(-1, v) if slopes is not None else None
    if keep is not None:
        flat = keep.reshape(-1)
        rows = rows[flat]
        srows = srows[flat] if srows is not None else None
    return rows, srows


def spread_map(
    model: nn.Module,
    inputs,
    direction,
    *,
    want_full: bool = False,
    chunk_size: int | None = None,
    method: str = "jvp",
    logits_fn: Callable[[Any], Any] | None = None,
    secant_step: float | None = None,
    class_dim: int | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Spread of every sample position; with ``want_full`` also the logits and slopes.

    Args:
        model, inputs, direction, chunk_size, method, logits_fn, secant_step, class_dim,
            activation: as in ``logit_slopes``.
        want_full: keep (and concatenate) every chunk's logits and slopes too;
            otherwise each chunk's tangent is reduced to its spread at once.
    Returns:
        ``(spread, logits, slopes)``: spread of the sample shape (logits without the
        class axis; NaN for a row with a non-finite slope), in logit units per unit of
        t; logits and slopes shaped like the model's logits, or None without
        ``want_full``.
    """

    def keep(logits, slopes):
        return (logit_spread(slopes), logits, slopes) if want_full else (logit_spread(slopes),)

    logits_fn = reader_for(model, logits_fn, class_dim, activation)
    parts = _per_chunk(model, inputs, direction, method, logits_fn, secant_step, chunk_size, keep)
    spread = torch.cat([p[0] for p in parts])
    if not want_full:
        return spread, None, None
    return spread, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def per_sample_spread(
    model: nn.Module,
    inputs,
    direction,
    *,
    chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
    method: str = "jvp",
    logits_fn: Callable[[Any], Any] | None = None,
    secant_step: float | None = None,
    class_dim: int | None = None,
    activation: str | None = None,
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
        model, inputs, direction, method, logits_fn, secant_step, class_dim, activation:
            as in ``logit_slopes``.
        chunk_size: rows of the input batch per evaluation (None: one pass).
        mask: optional bool tensor of the sample shape (logits without the class
            axis); False positions are dropped.
    Returns:
        (N,) spreads of the kept samples in row-major (flattened) order.
    """
    spread, _, _ = spread_map(
        model,
        inputs,
        direction,
        chunk_size=chunk_size,
        method=method,
        logits_fn=logits_fn,
        secant_step=secant_step,
        class_dim=class_dim,
        activation=activation,
    )
    keep = sample_mask(spread.shape, spread.device, mask)
    flat = spread.reshape(-1)
    return flat if keep is None else flat[keep.reshape(-1)]

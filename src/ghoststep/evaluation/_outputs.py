"""Model outputs: which part is the logits and how the loss reads them, never guessed.

``logits_reader`` is the output function every logit evaluation uses. It reads the
logits of a model output (``default_logits_fn`` or the caller's ``logits_fn``: one
tensor, or several softmax heads) and normalises them to a common layout everything
downstream sees, a tensor ``(positions..., K)`` whose last axis holds the classes of
one softmax:

* the class axis moved last (``class_dim``: ``F.cross_entropy`` reads ``(B, C, d1,
  ...)`` on dim 1, a language model ``(B, T, V)`` on the last);
* per-element sigmoid logits (``activation="sigmoid"``, multi-label
  ``BCEWithLogitsLoss``) and a single binary logit as the two-class softmax
  ``[0, z]`` (spread ``|a|`` per element);
* masked classes (``-inf`` logits, e.g. RL action masking) replaced by their
  position's largest finite logit, so they drop out of the spread;
* several heads concatenated along the positions of each row.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = [
    "REPLAY_NOISE",
    "fingerprint",
    "fingerprint_gap",
    "LayoutError",
    "LogitsReader",
    "class_logits",
    "default_logits_fn",
    "describe_output",
    "detect_layout",
    "logits_reader",
]

ACTIVATIONS = ("softmax", "sigmoid")

# A loss that reads z through a softmax over dim d is invariant to z + c along d, so
# its gradient sums to 0 along d: exactly, up to the rounding of the gradient (float32:
# 1e-6 of sum |g|; a bfloat16 gradient: a few 1e-3). Along any other axis the sum is
# O(1) of sum |g| unless the labels conspire. The class axis is the one candidate whose
# relative sum is below this.
_SHIFT_INVARIANT = 2e-2


class LayoutError(ValueError):
    """The class axis of the logits cannot be told: pass ``class_dim`` (or
    ``activation`` / ``logits_fn``)."""


def default_logits_fn(output) -> torch.Tensor:
    """The logits of a model output, never guessed.

    Accepted: a tensor; an object with a tensor ``.logits`` (Hugging Face
    ``ModelOutput``); a mapping whose only tensor of one or more dimensions is
    ``"logits"`` (a scalar ``"loss"`` beside it is fine); a Hugging Face
    ``return_dict=False`` tuple ``(loss, logits)`` (its first item a scalar loss, the
    second its only other tensor). Anything else, in particular a dict or tuple with
    several candidate tensors (a second head, features), raises a ``TypeError`` that
    shows the output's structure and names ``logits_fn``: measuring one head only
    would leave the others unbounded.
    """
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        if len(_candidates(output.values())) == 1:
            return output["logits"]
    if (
        isinstance(output, (tuple, list))
        and len(output) >= 2
        and isinstance(output[0], torch.Tensor)
        and output[0].ndim == 0
        and isinstance(output[1], torch.Tensor)
        and output[1].ndim >= 1
        and len(_candidates(output)) == 1
    ):
        return output[1]
    raise TypeError(
        f"cannot tell which part of the model output is the logits; the output is "
        f"{describe_output(output)}. Pass logits_fn=... to pick them (e.g. "
        "logits_fn=lambda out: out[1]); with several softmax heads return them all "
        '(e.g. logits_fn=lambda out: (out["logits"], out["b"])): the radius is the '
        "smallest over the heads"
    )


def _candidates(values) -> list[torch.Tensor]:
    """The tensors of one or more dimensions among ``values`` (a scalar is a loss)."""
    return [v for v in values if isinstance(v, torch.Tensor) and v.ndim >= 1]


def describe_output(obj, depth: int = 0) -> str:
    """A short structural description of a model output (types and tensor shapes)."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor{tuple(obj.shape)}"
    if depth >= 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        items = ", ".join(f"{k!r}: {describe_output(v, depth + 1)}" for k, v in obj.items())
        return f"{type(obj).__name__}({{{items}}})"
    if isinstance(obj, (tuple, list)):
        items = ", ".join(describe_output(v, depth + 1) for v in obj)
        return f"{type(obj).__name__}({items})"
    return type(obj).__name__


def class_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(..., K)`` for the softmax radius. A binary classifier's single logit z
    per sample (shape ``(B,)`` or ``(..., 1)``, trained with ``BCEWithLogitsLoss``) is
    the two-class softmax ``[0, z]``: spread ``|a|``, exact radius
    ``sqrt(z^2 + pi^2) / |a|``. Other shapes are returned unchanged."""
    if logits.ndim == 1:
        logits = logits.unsqueeze(-1)
    if logits.shape[-1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=-1)
    return logits


def unmasked(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(..., K)`` with each ``-inf`` entry (a masked class) replaced by its
    position's largest finite logit, read by a gather at the argmax: under forward AD
    its tangent is then the argmax class's slope, a member of the unmasked set, so the
    max and min of the slopes over classes are those of the unmasked classes, and a
    difference of two such logits is finite. A position with every class masked
    reads 0 (it has no distribution to bound). Logits without ``-inf`` are returned
    as they are (one reduction, no temporary: no copy of a language model's logits per
    forward)."""
    return _unmask(logits, None)[0]


def _unmask(logits: torch.Tensor, masked: bool | None) -> tuple[torch.Tensor, bool]:
    """``(unmasked(logits), masked)``; ``masked`` known in advance skips the check."""
    if masked is None:
        masked = logits.numel() > 0 and bool(logits.detach().amin() == -math.inf)
    if not masked:
        return logits, False
    top = logits.gather(-1, logits.argmax(-1, keepdim=True))
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    return torch.where(torch.isneginf(logits), top, logits), True


def detect_layout(model: torch.nn.Module) -> tuple[int | None, str | None]:
    """``(class_dim, activation)`` a Hugging Face model's loss reads its logits with
    (``config.problem_type == "multi_label_classification"``: sigmoid; a
    ``*ForSemanticSegmentation``: dim 1; any other: the last dim); ``(None, None)``
    for other models."""
    config = getattr(model, "config", None)
    if config is None or not type(model).__module__.startswith(("transformers", "peft")):
        return None, None
    if getattr(config, "problem_type", None) == "multi_label_classification":
        return None, "sigmoid"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    return (1 if type(base).__name__.endswith("ForSemanticSegmentation") else -1), None


class LogitsReader:
    """The output function for the logits: ``output -> (positions..., K)``.

    One head (``logits_fn`` returns a tensor) keeps its positions: ``(B, K)`` ->
    ``(B, K)``, ``(B, T, V)`` -> ``(B, T, V)``, ``(B, C, H, W)`` with ``class_dim=1`` ->
    ``(B, H, W, C)``, sigmoid ``(B, L)`` -> ``(B, L, 2)``. Several heads (a tuple, list
    or dict of tensors, each ``(B, ...)``) are each read as one head, reshaped to
    ``(B, n_h, K_h)``, padded to the largest K by repeating their own last column (a
    duplicate changes neither the max nor the min over classes) and concatenated:
    ``(B, sum_h n_h, K)``, so a row's positions are all its heads' positions.

    Args:
        logits_fn: picks the logits (a tensor, or a tuple / list / dict of head
            tensors) from the model output; default :func:`default_logits_fn`.
        class_dim: the class axis of outputs with 3 or more dims (e.g. 1 for
            ``F.cross_entropy``'s ``(B, C, d1, ...)``, -1 for ``(B, T, V)``). None:
            outputs of 1 or 2 dims read the last, others the axis the gradient
            recorded by :meth:`watch` shows, else a :class:`LayoutError`.
        activation: ``"softmax"`` or ``"sigmoid"`` (every element its own binary
            logit; ``class_dim`` does not apply).
    """

    def __init__(
        self,
        logits_fn: Callable[[Any], Any] | None = None,
        *,
        class_dim: int | None = None,
        activation: str = "softmax",
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if class_dim is not None and not (isinstance(class_dim, int) and class_dim != 0):
            raise ValueError(
                f"class_dim must be None or a nonzero int (dim 0 is the batch), got {class_dim!r}"
            )
        self.pick = logits_fn or default_logits_fn
        self.class_dim = class_dim
        self.activation = activation
        # (relative |sum_d g| along dim 1, along the last dim) of the latest gradient
        self.evidence: tuple[float, float] | None = None
        self.watched: torch.Size | None = None  # shape of the watched head, if any

    @property
    def pending(self) -> bool:
        """Whether an output of 3 or more dims would still need the gradient evidence."""
        return self.class_dim is None and self.activation == "softmax"

    def __call__(self, output) -> torch.Tensor:
        return self.read(output)

    def read(self, output, masked: bool | None = None, found: list | None = None) -> torch.Tensor:
        """The output in the common layout. ``masked``: whether some class is masked
        (``-inf``), known in advance (True / False: no check, one pass over the logits
        saved) or None (checked); ``found``: a list that receives, per head, whether it
        had a masked class."""
        parts = []
        for head in self.heads(output):
            logits, flag = self._head(head, masked)
            parts.append(logits)
            if found is not None:
                found.append(flag)
        return parts[0] if len(parts) == 1 else self.joined(parts)

    def assuming(self, masked: bool | None) -> Callable[[Any], torch.Tensor]:
        """The reader as an output function for forwards whose masking is known (the
        training forward's): ``masked`` True / False skips the check (None: checks)."""
        return functools.partial(self.read, masked=masked)

    def heads(self, output) -> list[torch.Tensor]:
        """The raw head tensors ``logits_fn`` picks (one or several)."""
        picked = self.pick(output)
        if isinstance(picked, Mapping):
            picked = list(picked.values())
        heads = list(picked) if isinstance(picked, (tuple, list)) else [picked]
        if not heads or not all(isinstance(h, torch.Tensor) for h in heads):
            raise TypeError(
                "logits_fn must return a tensor or a tuple / list / dict of tensors, got "
                f"{describe_output(picked)}"
            )
        return heads

    def head(self, logits: torch.Tensor) -> torch.Tensor:
        """One head in the common layout ``(positions..., K)``."""
        return self._head(logits, None)[0]

    def _head(self, logits: torch.Tensor, masked: bool | None) -> tuple[torch.Tensor, bool]:
        if self.activation == "sigmoid":
            z = logits.unsqueeze(-1)
            return torch.cat([torch.zeros_like(z), z], dim=-1), False
        # one or two dims need no resolving: the classes are last
        dim = -1 if self.class_dim is None and logits.ndim <= 2 else self.dim_of(logits.shape)
        if dim not in (-1, logits.ndim - 1):
            logits = logits.movedim(dim, -1)
        return _unmask(class_logits(logits), masked)

    def dim_of(self, shape: torch.Size) -> int:
        """The class axis of a softmax head of this shape (resolved from the gradient
        evidence when pending)."""
        ndim = len(shape)
        if self.class_dim is not None:
            if not -ndim <= self.class_dim < ndim:
                raise LayoutError(
                    f"class_dim={self.class_dim} is not an axis of the logits {tuple(shape)}"
                )
            return self.class_dim
        if ndim <= 2:
            return -1
        if self.evidence is not None:
            self.class_dim = self._from_evidence(shape)
            return self.class_dim
        raise LayoutError(
            f"the logits {tuple(shape)} have {ndim} dims: which one holds the "
            "classes? Pass class_dim=1 for F.cross_entropy's (B, C, d1, ...) layout "
            "(segmentation), class_dim=-1 for (B, T, V) (language models), "
            'activation="sigmoid" for per-element binary logits, or logits_fn for an '
            "output that is not logits"
        )

    def resolve(self) -> None:
        """Fix a pending class axis now (before the first update) if a watched training
        output needs one; a :class:`LayoutError` when it cannot be told."""
        if self.pending and self.watched is not None:
            self.dim_of(self.watched)

    def _from_evidence(self, shape: torch.Size) -> int:
        along_1, along_last = self.evidence
        found = [d for d, ratio in ((1, along_1), (-1, along_last)) if ratio < _SHIFT_INVARIANT]
        if len(found) == 1:
            return found[0]
        raise LayoutError(
            f"the logits {tuple(shape)} have {len(shape)} dims and the loss's "
            f"gradient does not show which holds the classes (its relative sum is "
            f"{along_1:.3g} along dim 1 and {along_last:.3g} along the last; a softmax "
            "over a dim sums to 0 along it). Pass class_dim=1 for F.cross_entropy's (B, "
            'C, d1, ...) layout, class_dim=-1 for (B, T, V), activation="sigmoid" for '
            "per-element binary logits, or logits_fn for an output that is not logits"
        )

    def watch(self, output) -> None:
        """Record the loss's gradient on the first head of 3 or more dims of a training
        output (a hook on the tensor, run by ``backward``), for a pending class axis."""
        if not self.pending:
            return
        try:
            heads = self.heads(output)
        except (TypeError, KeyError, AttributeError, IndexError):
            return
        for logits in heads:
            if logits.ndim >= 3:
                self.watched = logits.shape
                if logits.requires_grad:
                    logits.register_hook(functools.partial(_record_gradient, self))
                return

    def joined(self, heads: list[torch.Tensor]) -> torch.Tensor:
        """Normalised heads ``(B, ..., K_h)`` -> ``(B, sum_h n_h, K)``."""
        rows = {h.shape[0] if h.ndim >= 2 else None for h in heads}
        if len(rows) != 1 or None in rows:
            raise ValueError(
                "several heads must share the batch dim (dim 0), got "
                f"{[tuple(h.shape) for h in heads]}"
            )
        classes = max(h.shape[-1] for h in heads)
        parts = []
        for h in heads:
            h = h.reshape(h.shape[0], -1, h.shape[-1])
            if h.shape[-1] < classes:
                pad = h[..., -1:].expand(*h.shape[:-1], classes - h.shape[-1])
                h = torch.cat([h, pad], dim=-1)
            parts.append(h)
        return torch.cat(parts, dim=1)


def _record_gradient(reader: LogitsReader, grad: torch.Tensor) -> None:
    g = grad.detach().float()  # the sums need no more (the threshold is 2e-2)
    total = float(g.abs().sum())
    if total > 0 and math.isfinite(total):
        reader.evidence = (
            float(g.sum(1).abs().sum()) / total,
            float(g.sum(-1).abs().sum()) / total,
        )


def logits_reader(
    logits_fn: Callable[[Any], Any] | None = None,
    *,
    class_dim: int | None = -1,
    activation: str = "softmax",
) -> LogitsReader:
    """The output function for the logits (a :class:`LogitsReader`; picklable whenever
    ``logits_fn`` is). ``logits_fn`` may itself be a reader: returned as it is. The
    default ``class_dim=-1`` is the convention of the evaluation functions (class axis
    last); the controller passes None and resolves it from the loss's gradient."""
    if isinstance(logits_fn, LogitsReader):
        return logits_fn
    return LogitsReader(logits_fn, class_dim=class_dim, activation=activation)


# The largest relative gap between a replay's and the training forward's logits
# fingerprints that is noise, by whether they are 16-bit or autocast (True) or float32 /
# float64 (False): a replay of the same function differs by rounding only, a changed
# input or buffer by far more.
REPLAY_NOISE = {False: 1e-3, True: 5e-2}


def fingerprint(logits: torch.Tensor) -> torch.Tensor:
    """A compact per-position summary of logits ``(..., K)``: 4 classes spread evenly
    over K, shape ``(..., 4)`` (fewer for K < 4), float32. A replay of the same function
    reproduces every logit to rounding, a changed input or buffer moves them all; 4
    columns read a few bytes per position instead of a pass over the K classes."""
    classes = logits.shape[-1]
    columns = torch.linspace(0, classes - 1, min(4, classes)).round().long().unique()
    return logits.detach().index_select(-1, columns.to(logits.device)).float()


def fingerprint_gap(replayed: torch.Tensor, recorded: torch.Tensor) -> float:
    """The largest difference of two fingerprints, relative to 1 + |value| (0 for
    entries non-finite in both)."""
    replayed = fingerprint(replayed)
    if replayed.shape != recorded.shape:
        return 0.0
    gap = (replayed - recorded.to(replayed.device)).abs() / (1.0 + recorded.abs())
    return float(gap.nan_to_num(0.0, 0.0, 0.0).max()) if gap.numel() else 0.0

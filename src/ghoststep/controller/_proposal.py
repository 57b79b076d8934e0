"""The inner optimizer's proposal as the controller handles it: one persistent spare
copy of the parameters, the swap that leaves the parameters at the old values and the
spare at the proposal (bitwise), ||p||, and the application of ``old + s p``.

No per-parameter host sync: norms are gathered into one tensor and read once. Sharded
(FSDP2) parameters are handled on their local shards, with the global sums taken over
the shard group (``ghoststep.evaluation._sharding``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..evaluation._directions import global_norm
from ..evaluation._isolation import HALF
from ..evaluation._sharding import agree, sum_over_shards
from ..evaluation._updates import OptimizerSnapshot

__all__ = [
    "Proposal",
    "all_finite",
    "check_dense",
    "check_supported",
    "holds_iterate",
    "rerun_scaled",
]


class Proposal:
    """The inner optimizer's proposed update p = new - old, for one controller: the
    parameters it moves (``params``: the old values after the swap, then old + at p), the
    spare copy that holds ``new`` after the swap, the step length ``tau`` = ||p|| and
    where the parameters are (``at``), with the arithmetic on them.

    Usage per step: :meth:`begin` (spare <- params) before the inner step, :meth:`swap`
    after it (params <- old, spare <- new; sets and returns tau), :meth:`move_to`
    evaluation points, then :meth:`apply`.
    """

    def __init__(self) -> None:
        # Kept between steps: a fresh allocation of every parameter's size each step
        # costs page faults on the CPU.
        self.spare: list[torch.Tensor] | None = None
        self.params: list[torch.Tensor] = []  # the (local shards of the) parameters
        self.shards = None  # the FSDP2 shard group (None: unsharded)
        self.at = 0.0  # where the parameters are: old + at p (after swap)
        self.tau = math.nan  # ||new - old|| (after swap)

    def begin(self, params: list[torch.Tensor], shards) -> list[torch.Tensor]:
        """Copy the parameters into the spare, before the inner step; returns the spare
        (:attr:`new` after :meth:`swap`)."""
        self.params, self.shards = params, shards
        spare = self.spare
        if spare is None or len(spare) != len(params) or any(
            s.shape != p.shape or s.dtype != p.dtype or s.device != p.device
            or s.stride() != p.stride()
            for s, p in zip(spare, params, strict=True)
        ):  # fmt: skip
            spare = [torch.empty_like(p) for p in params]
        torch._foreach_copy_(spare, params)
        self.spare = spare  # after the step it holds whatever the parameters do not
        return spare

    def update(self) -> list[torch.Tensor]:
        """p = new - params, a transient copy (at the old values: the proposed update)."""
        return torch._foreach_sub(self.spare, self.params)

    def exchange_ok(self) -> bool:
        # a shard's storage belongs to its DTensor: only plain parameters trade storage
        return self.shards is None and all(type(p.data) is torch.Tensor for p in self.params)

    def swap(self) -> float:
        """Exchange the contents (parameters <- old, spare <- new, both bitwise); set and
        return tau = ||new - old|| (summed over the shards of sharded parameters).

        Plain tensors exchange their storage (``.data``, no copy); shards and tensor
        subclasses are copied in place. The difference is taken in groups no larger
        than the largest parameter: the transient memory stays one parameter's size.
        """
        params, proposed = self.params, self.spare
        norms = []
        for group in _groups(params):
            # 16-bit parameters: the difference in float32 (in bfloat16 it rounds by 0.4 %)
            diff = torch._foreach_sub(
                [_wide(params[i]) for i in group], [_wide(proposed[i]) for i in group]
            )
            norms += torch._foreach_norm(diff)
            del diff
        if self.exchange_ok():
            _exchange(params, proposed)
        else:
            for group in _groups(params):
                ps, keep = [params[i] for i in group], [proposed[i] for i in group]
                new = [torch.empty_like(p) for p in ps]
                torch._foreach_copy_(new, ps)
                torch._foreach_copy_(ps, keep)
                torch._foreach_copy_(keep, new)
                del new
        self.at = 0.0
        device = params[0].device
        tau = math.sqrt(float(sum_over_shards(_squares(norms, device), self.shards)))
        if math.isinf(tau) and agree(all(bool(t.isfinite().all()) for t in proposed), self.shards):
            # overflow of a float32 norm, not a non-finite entry: redo in float64
            pairs = zip(params, proposed, strict=True)
            wide = torch.stack(
                [(q.double() - p.double()).pow(2).sum().to(device) for p, q in pairs]
            )
            tau = math.sqrt(float(sum_over_shards(wide.sum().reshape(1), self.shards)))
        self.tau = tau
        return tau

    def norm(self) -> float:
        """||params|| at their current point (over all shards): one pass, one host sync."""
        params = self.params
        squares = _squares(torch._foreach_norm(params), params[0].device)
        return math.sqrt(float(sum_over_shards(squares, self.shards)))

    def move_to(self, fraction: float) -> None:
        """Parameters (now at old + at p) <- old + f p (an evaluation point, f < 1)."""
        if fraction != self.at:
            # old + f p = e + (f - at) / (1 - at) (new - e), with e = old + at p
            weight = (fraction - self.at) / (1.0 - self.at)
            torch._foreach_lerp_(self.params, self.spare, weight)
            self.at = fraction

    def apply(self, scale: float) -> None:
        """Parameters (now at old + at p) <- old + s p. s = 1 copies the proposal bitwise;
        s = 0 from the old values leaves them bitwise. 16-bit parameters (measured at
        the old values) are rounded toward the old values (:func:`_round_toward_old`)."""
        params, proposed = self.params, self.spare
        if scale == 1.0:
            if self.exchange_ok():
                _exchange(params, proposed)  # the inner optimizer's tensors, bitwise
            else:
                torch._foreach_copy_(params, proposed)
            self.at = 1.0
        elif self.at == 0.0 and scale != 0.0 and any(p.dtype in HALF for p in params):
            _round_toward_old(params, proposed, scale)
            self.at = scale
        else:
            self.move_to(scale)


def rerun_scaled(snapshot: OptimizerSnapshot, optimizer, params, scale: float) -> float:
    """Restore the optimizer and the parameters from ``snapshot``, then its step again
    with every learning rate times ``scale`` (``scaled_update="rerun"``); returns the
    length of the resulting step."""
    snapshot.restore(optimizer, params)
    rates = [group.get("lr") for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        if lr is not None:
            group["lr"] = lr * scale
    try:
        optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, rates, strict=True):
            if lr is not None:
                group["lr"] = lr
    return float(global_norm(torch._foreach_sub(params, snapshot.params)))


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Every entry finite? One host sync: the 2-norms are finite unless an entry is not
    or a norm overflowed; only then are the entries checked one by one."""
    device = tensors[0].device
    norms = torch.stack([n.to(device) for n in torch._foreach_norm(tensors)])
    if bool(norms.isfinite().all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _squares(norms: Sequence[torch.Tensor], device) -> torch.Tensor:
    """Sum of squares of per-tensor norms, float64, as a 1-element tensor on ``device``."""
    if all(n.device == device and n.dtype == norms[0].dtype for n in norms):
        stacked = torch.stack(list(norms))  # one kernel, not one conversion per tensor
    else:
        stacked = torch.stack([n.to(device, torch.float64) for n in norms])
    return stacked.double().pow(2).sum().reshape(1)


def _round_toward_old(params, proposed, scale: float) -> None:
    """``params`` (the old values) <- old + s (new - old), each entry rounded toward
    old where rounding to nearest would lengthen it. In bfloat16 an entry whose step
    lies between half an ulp and one ulp rounds up to one ulp, up to twice its length:
    measured r 1.05 on a TinyLM against 0.98 intended. Rounded toward old, every entry
    moves at most s |p_i|, in p_i's direction. One parameter at a time in float32."""
    for p, q in zip(params, proposed, strict=True):
        if p.dtype not in HALF:
            p.lerp_(q, scale)
            continue
        old = p.float()
        step = (q.float() - old).mul_(scale)
        nearest = (old + step).to(p.dtype)
        longer = (nearest.float() - old).abs_() > step.abs_()
        p.copy_(torch.where(longer, torch.nextafter(nearest, p), nearest))


def _wide(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in HALF else t


def _groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Consecutive index groups whose total size is at most the largest tensor's."""
    limit = max(t.numel() for t in tensors)
    groups: list[list[int]] = [[]]
    size = 0
    for i, t in enumerate(tensors):
        if size + t.numel() > limit and groups[-1]:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += t.numel()
    return groups


def _exchange(params: Sequence[torch.Tensor], others: list[torch.Tensor]) -> None:
    """Swap the storage of each parameter with ``others[i]`` (no data is copied)."""
    for i, p in enumerate(params):
        mine = p.data
        p.data = others[i]
        others[i] = mine


def holds_iterate(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps an iterate of its own besides the parameters
    (schedule-free: z; Lookahead: the slow weights), so that rescaling the parameters
    alone would leave the two apart. Known families, by class name."""
    names = {cls.__name__.lower() for cls in type(optimizer).__mro__}
    return any("schedulefree" in n or "lookahead" in n for n in names)


def check_supported(optimizer: torch.optim.Optimizer) -> None:
    """Refuse, at construction, optimizers whose ``step`` needs a closure."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError(
            "RadiusController cannot wrap LBFGS: its step re-evaluates the loss through "
            "a closure along a line search, so there is no single proposed update to "
            "measure. Use a first-order optimizer, or measure LBFGS steps with "
            "ghoststep.measure(model, inputs, update, tau=1.0)"
        )
    if all(hasattr(optimizer, a) for a in ("first_step", "second_step", "base_optimizer")):
        name = type(optimizer).__name__
        raise ValueError(
            f"RadiusController cannot wrap {name}: its step needs a closure (two forward "
            "passes). Wrap its base optimizer instead, which makes the update: "
            f"`sam = {name}(...); sam.base_optimizer = RadiusController("
            "sam.base_optimizer, model)`, then train with sam as usual "
            "(first_step / second_step or step(closure))"
        )


def check_dense(params: Sequence[torch.Tensor]) -> None:
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            raise RuntimeError(
                "RadiusController does not support sparse gradients "
                "(e.g. nn.Embedding(sparse=True)); use dense gradients"
            )

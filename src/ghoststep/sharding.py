"""Sharded parameters (FSDP2 ``fully_shard``: DTensors): local shards and the one
process group over which a step's global quantities (||p||, ||theta||, the
all-finite flag) are summed.

The controller does its parameter arithmetic (the spare copy, the swap, the lerps) on
each rank's local shard, in place, and reduces the few scalars it needs; the model's own
forward (which all-gathers the shards) evaluates the outputs. Replicated parameters
(DDP, or no ``torch.distributed``) have no shard group: their local tensor is the whole
parameter and nothing is summed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "agree",
    "check_sharding",
    "is_sharded",
    "local_shards",
    "max_over_ranks",
    "shard_group",
    "sum_over_shards",
]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4 or no distributed build
        return None
    return DTensor


def is_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any tensor is a DTensor (FSDP2 parameters are)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(t, dtensor) for t in tensors)


def local_shards(tensors: Sequence[torch.Tensor | None]) -> list:
    """Each DTensor's local shard (a plain tensor sharing its storage: in-place changes
    reach the DTensor), other tensors (and None) unchanged."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return list(tensors)
    return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def shard_group(tensors: Sequence[torch.Tensor]):
    """The process group across which the DTensors are sharded, or None (no DTensor).

    Raises:
        NotImplementedError: DTensors on different meshes or placements, or sharded
            over more than one mesh dimension (only FSDP2 / HSDP layouts are handled).
    """
    dtensor = _dtensor_type()
    layouts = {
        (t.device_mesh, tuple(t.placements))
        for t in tensors
        if dtensor is not None and isinstance(t, dtensor)
    }
    if not layouts:
        return None
    if len(layouts) > 1:
        raise NotImplementedError(
            "RadiusController supports sharded parameters on one device mesh with one "
            f"placement (FSDP2 / HSDP); found {len(layouts)} layouts"
        )
    ((mesh, placements),) = layouts
    dims = [i for i, p in enumerate(placements) if p.is_shard()]
    if len(dims) != 1:
        raise NotImplementedError(
            f"RadiusController supports parameters sharded over one mesh dimension; the "
            f"placements are {placements}"
        )
    return mesh.get_group(dims[0])


def sum_over_shards(values: torch.Tensor, group) -> torch.Tensor:
    """Sum per-shard partial sums (e.g. squared norms) over the shard group, in place."""
    if group is not None:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM, group=group)
    return values


def agree(flag: bool, group) -> bool:
    """``flag`` on every rank of the shard group (the AND), so all ranks decide alike;
    ``flag`` itself without a group."""
    if group is None:
        return flag
    value = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64)
    dist = torch.distributed
    if dist.get_backend(group) == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return float(value) == 0.0


def max_over_ranks(value: float, finite: bool, group=None) -> tuple[float, bool]:
    """``(max of value, all finite)`` over the ranks of ``group`` (default: the world)
    when ``torch.distributed`` is initialized; the arguments themselves otherwise. A
    rank that is not finite contributes 0 to the max."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return value, finite
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    packed = torch.tensor(
        [value if finite else 0.0, 0.0 if finite else 1.0], dtype=torch.float64, device=device
    )
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    return float(packed[0]), bool(packed[1] == 0)


def check_sharding(model, params, method: str, extra_radii, scaled_update: str) -> None:
    """FSDP2 (DTensor) parameters: only the ordinary forward can evaluate them.
    FSDP1's flat parameters look like plain tensors but are shards: refused."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(
            "RadiusController does not support FSDP1 (FullyShardedDataParallel): its "
            "flat parameters are shards that look like whole tensors. Shard with FSDP2 "
            "(torch.distributed.fsdp.fully_shard; Lightning ModelParallelStrategy) and "
            'method="fast"'
        )
    if not is_sharded(params):
        return
    if method != "fast":
        raise ValueError(
            f'method="{method}" cannot evaluate sharded (FSDP2 / DTensor) '
            "parameters (functional_call and forward AD do not support them); use "
            'method="fast", which goes through the model\'s own FSDP forward'
        )
    for name, bad in (
        ("extra_radii", extra_radii is not None),
        ('scaled_update="rerun"', scaled_update == "rerun"),
    ):
        if bad:
            raise ValueError(f"{name} is not supported with sharded (FSDP2) parameters")

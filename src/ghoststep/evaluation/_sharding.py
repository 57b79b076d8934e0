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

import contextlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ._replay import HALF

__all__ = [
    "agree",
    "dual_unsharded",
    "fsdp_units",
    "half_compute",
    "is_sharded",
    "local_shards",
    "max_over_ranks",
    "reshard",
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
    """Each DTensor's local shard (the DTensor's own local tensor: in-place changes reach
    the DTensor, and the same object on every call, so shards can be matched by id),
    other tensors (and None) unchanged."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return list(tensors)
    return [_local(t) if isinstance(t, dtensor) else t for t in tensors]


def _local(t) -> torch.Tensor:
    # to_local() of a DTensor Parameter returns a fresh view on every call
    local = getattr(t, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else t.to_local()


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


# ------------------------------------------------------------------ FSDP2 units


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units (``fully_shard``-ed modules, ``FSDPModule``) of ``model``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def reshard(model: nn.Module) -> None:
    """Register every FSDP2 unit's sharded parameters again (no-op without FSDP2).

    FSDP2 keeps a unit's all-gathered parameters after a forward when it does not
    reshard after forward (``reshard_after_forward=False``, and the root module by
    default) until the backward; after a ``no_grad`` forward no backward comes, so
    the next forward would reuse them although the controller has changed the shards
    in place. Every measuring forward therefore reshards afterwards."""
    for unit in fsdp_units(model):
        unit.reshard()


def half_compute(model: nn.Module) -> bool:
    """Whether an FSDP2 unit computes in bfloat16 / float16 (its MixedPrecisionPolicy's
    ``param_dtype``; read from FSDP's state, False where it cannot be read)."""
    for unit in fsdp_units(model):
        try:
            dtype = unit._get_fsdp_state()._mp_policy.param_dtype
        except AttributeError:  # pragma: no cover - another FSDP2 internal layout
            continue
        if dtype in HALF:
            return True
    return False


def _slots(root: nn.Module, prefix: str, units: Sequence[nn.Module]):
    """``(module, name, qualified name)`` of every parameter slot under ``root`` that
    is not under another FSDP unit (tied slots included)."""
    stack, nested = [(root, prefix)], {id(u) for u in units}
    while stack:
        module, pre = stack.pop()
        for name, p in module._parameters.items():
            if p is not None:
                yield module, name, pre + name
        for name, child in module._modules.items():
            if child is not None and id(child) not in nested:
                stack.append((child, f"{pre}{name}."))


def gather_rows(shards: Sequence[torch.Tensor], shapes, group) -> list[torch.Tensor]:
    """The whole tensors of several dim-0 shards (``torch.chunk`` layout, FSDP2's
    ``Shard(0)``: rank r holds rows [r c, (r + 1) c) with c = ceil(n0 / world)) in ONE
    all-gather over ``group``: each shard padded to c rows, flattened, concatenated."""
    dist = torch.distributed
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    dtype = shards[0].dtype
    for t in shards[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    pieces, layout = [], []
    for t, shape in zip(shards, shapes, strict=True):
        rows, rest = math.ceil(shape[0] / world), math.prod(shape[1:])
        mine = (min(rows, max(0, shape[0] - rank * rows)), *shape[1:])
        if tuple(t.shape) != mine:
            raise ValueError(
                f"a tangent shard of shape {tuple(t.shape)} does not match the dim-0 shard "
                f"{mine} of a parameter of shape {tuple(shape)} on rank {rank}"
            )
        piece = t.new_zeros(rows * rest, dtype=dtype)
        piece[: t.numel()] = t.reshape(-1)
        pieces.append(piece)
        layout.append((rows, rest, shape))
    send = torch.cat(pieces)
    received = send.new_empty(world * send.numel())
    # all_gather_single: all_gather_into_tensor's newer name (deprecated from torch 2.13)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(received, send, group=group)
    received = received.view(world, send.numel())
    whole, start = [], 0
    for rows, rest, shape in layout:
        block = received[:, start : start + rows * rest]
        whole.append(block.reshape(world * rows, *shape[1:])[: shape[0]])
        start += rows * rest
    return whole


def _swap_in(slots, values: Mapping[str, torch.Tensor]) -> list:
    """Put a dual (the slot's current tensor + the tangent) into every slot; returns
    what to put back."""
    saved, duals = [], {}
    for module, name, key in slots:
        p = module._parameters[name]
        if key not in duals:
            tangent = values[key]
            if tangent.shape != p.shape:
                raise RuntimeError(
                    f"the tangent of {key!r} has shape {tuple(tangent.shape)}, the unsharded "
                    f"parameter {tuple(p.shape)}"
                )
            duals[key] = fwAD.make_dual(p.detach(), tangent.to(p.dtype))
        saved.append((module, name, p))
        module._parameters[name] = duals[key]
    return saved


def _put_back(saved) -> None:
    for module, name, p in reversed(saved):
        module._parameters[name] = p


class _DualUnits:
    """The hooks of :func:`dual_unsharded`: per unit, after FSDP's all-gather, the
    gathered tangents dualled onto the unsharded parameters; before FSDP's reshard, the
    unsharded parameters back."""

    def __init__(self, tangents: Mapping[str, torch.Tensor], shapes, group) -> None:
        self.tangents, self.shapes, self.group = tangents, shapes, group
        self.saved: dict[int, list] = {}

    def pre(self, slots, keys):
        def hook(unit, args):
            shards = [self.tangents[k] for k in keys]
            whole = gather_rows(shards, [self.shapes[k] for k in keys], self.group)
            self.saved[id(unit)] = _swap_in(slots, dict(zip(keys, whole, strict=True)))

        return hook

    def post(self, unit, args, output):
        _put_back(self.saved.pop(id(unit), ()))

    def restore(self) -> None:
        for saved in self.saved.values():
            _put_back(saved)
        self.saved.clear()


def _sharded_layout(model: nn.Module):
    """``({canonical name: sharded parameter}, {qualified name: canonical name},
    shard group)``, with every unit resharded; only ``Shard(0)`` layouts."""
    reshard(model)
    canonical: dict[int, str] = {}
    alias = {
        name: canonical.setdefault(id(p), name)
        for name, p in model.named_parameters(remove_duplicate=False)
    }
    params = dict(model.named_parameters())
    sharded = [p for p in params.values() if is_sharded([p])]
    group = shard_group(sharded)
    placements = sharded[0].placements if sharded else ()
    if any(pl.is_shard() and pl.dim != 0 for pl in placements):
        raise NotImplementedError(
            f'method="jvp" supports FSDP2 parameters sharded on dim 0; found {placements}'
        )
    return params, alias, group


@contextlib.contextmanager
def dual_unsharded(model: nn.Module, tangents: Mapping[str, torch.Tensor | None]):
    """Forward-mode AD through an FSDP2 model's ordinary forward (enter inside
    ``torch.autograd.forward_ad.dual_level()``).

    ``tangents``: canonical parameter name -> tangent: the local shard (or the DTensor)
    for a sharded parameter, the whole tensor for a plain one, None for none. Inside
    the block, each FSDP unit's forward replaces its unsharded parameters (after FSDP's
    all-gather) by duals whose tangents are gathered from the shards with one
    all-gather per unit, and puts them back before FSDP reshards them; parameters no
    unit manages carry their dual for the whole block. The units are resharded on
    entry and exit (see :func:`reshard`). Every rank must run the same forward.
    """
    units = fsdp_units(model)
    params, alias, group = _sharded_layout(model)
    local = {k: None if v is None else local_shards([v])[0] for k, v in tangents.items()}
    hooks = _DualUnits(local, {k: p.shape for k, p in params.items()}, group)
    handles, static = [], []
    try:
        prefixes = {id(m): f"{n}." if n else "" for n, m in model.named_modules()}
        for owner in ([] if model in units else [model]) + units:
            slots = [
                (m, n, alias[q])
                for m, n, q in _slots(owner, prefixes.get(id(owner), ""), units)
                if local.get(alias[q]) is not None
            ]
            if not slots:
                continue
            if owner not in units:  # not managed by FSDP: a plain (whole) parameter
                if is_sharded([m._parameters[n] for m, n, _ in slots]):
                    raise NotImplementedError(
                        'method="jvp" supports DTensor parameters managed by fully_shard only'
                    )
                static = _swap_in(slots, local)
                continue
            keys = list(dict.fromkeys(k for _, _, k in slots))
            # FSDP prepends its pre-hook (unshard) and appends its post-hook (reshard)
            handles.append(owner.register_forward_pre_hook(hooks.pre(slots, keys)))
            handles.append(owner.register_forward_hook(hooks.post, prepend=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
        hooks.restore()
        _put_back(static)
        reshard(model)

"""Checkpoints of the controller through ``torch.distributed.checkpoint`` (DCP).

``get_state_dict(model, ctrl)`` / ``set_state_dict(model, ctrl, ...)`` read and write the
controller as a torch optimizer: its state dict has ``"state"`` and ``"param_groups"``.
On a fresh controller DCP calls ``ctrl.step()`` with zero gradients and learning rate 0
to make the optimizer build its state: that must initialise the inner optimizers
without a batch, measure nothing and leave the learning rate alone. A save, a load into
fresh processes and the continued run equal the uninterrupted run bitwise (FSDP2 on two
gloo ranks).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import gloo_rank, spawn_ranks
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ghoststep import RadiusController

LR = 1.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


def _batch(step: int, rows=slice(None)):
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 6, generator=gen) * 2.0, torch.randint(0, 4, (8,), generator=gen)
    return x[rows], y[rows]


def _controller(model, wrapped=None, several: bool = False) -> RadiusController:
    wrapped = model if wrapped is None else wrapped
    if several:
        layers = [m for m in model if isinstance(m, nn.Linear)]
        adam = torch.optim.Adam(layers[0].parameters(), lr=LR)
        sgd = torch.optim.SGD(
            [p for m in layers[1:] for p in m.parameters()], lr=0.5 * LR, momentum=0.9
        )
        return RadiusController([adam, sgd], wrapped)
    return RadiusController(torch.optim.Adam(model.parameters(), lr=LR), wrapped)


def _train(wrapped, ctrl, steps, rows=slice(None), world: int = 1) -> None:
    for step in steps:
        x, y = _batch(step, rows)
        ctrl.zero_grad()
        (F.cross_entropy(wrapped(x), y, reduction="sum") * world / 8.0).backward()
        ctrl.step()


def _same(a, b) -> bool:
    """Nested equality, tensors bitwise."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("several", [False, True])
def test_dcp_initialises_a_fresh_controller_without_a_step(several):
    """get_state_dict on a fresh controller: no "no batch" error, the learning rates and
    the parameters untouched, no step counted, the inner state built."""
    model = _model()
    ctrl = _controller(model, several=several)
    before = [p.detach().clone() for p in model.parameters()]
    lrs = [g["lr"] for g in ctrl.param_groups]
    _, optim = get_state_dict(model, ctrl)
    after = [g["lr"] for g in ctrl.param_groups]
    print(f"\nfresh controller (several={several}): lrs {lrs} -> {after}, state entries "
          f"{len(optim['state'])}")  # fmt: skip
    assert [g["lr"] for g in ctrl.param_groups] == lrs
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert ctrl.step_count == 0 and ctrl.last is None and not ctrl.history
    assert len(optim["state"]) >= 1  # Adam built its moments
    assert set(optim) == {"state", "param_groups"}
    assert all(p.grad is None for p in model.parameters())
    _train(model, ctrl, range(2))  # and training starts as usual
    assert ctrl.step_count == 2


@pytest.mark.parametrize("several", [False, True])
def test_dcp_round_trip_resumes_bitwise(several):
    """get_state_dict after 3 steps, set_state_dict into a fresh model and controller
    (their state first built by DCP), 3 more steps: bitwise the uninterrupted run; the
    controller's own state (counters, method, the secant's step hint) came along."""
    model = _model()
    ctrl = _controller(model, several=several)
    _train(model, ctrl, range(3))
    saved = copy.deepcopy(get_state_dict(model, ctrl))
    ours = copy.deepcopy(ctrl.state_dict()["ghoststep"])
    _train(model, ctrl, range(3, 6))

    fresh = _model()
    resumed = _controller(fresh, several=several)
    with torch.no_grad():  # another start: the load must set everything
        for p in fresh.parameters():
            p.add_(1.0)
    set_state_dict(fresh, resumed, model_state_dict=saved[0], optim_state_dict=saved[1])
    assert _same(resumed.state_dict()["ghoststep"], ours)
    assert resumed.step_count == 3 and resumed.method == "fast"
    _train(fresh, resumed, range(3, 6))
    print(f"\nDCP round trip (several={several}): scales {[s.scale for s in resumed.history]}")
    assert any(s.scale < 1.0 for s in resumed.history)  # the clip binds
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)
    assert _same(ctrl.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("several", [False, True])
def test_state_dict_has_the_torch_layout_and_loads_every_form(several):
    """state_dict(): "state" and "param_groups" as a torch optimizer's, "ghoststep"
    beside them; it survives torch.save / torch.load(weights_only=True); the earlier
    {"inner", "ghoststep"} form and a bare inner state dict still load."""
    model = _model()
    ctrl = _controller(model, several=several)
    _train(model, ctrl, range(3))
    sd = ctrl.state_dict()
    assert set(sd) == {"state", "param_groups", "ghoststep"}
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    assert ids == list(range(len(list(model.parameters()))))
    assert set(sd["state"]) <= set(ids)
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    inner = [o.state_dict() for o in ctrl.optimizers]
    old_form = {"inner": inner[0] if len(inner) == 1 else inner, "ghoststep": sd["ghoststep"]}

    reference = copy.deepcopy((model, ctrl))
    _train(*reference, range(3, 5))
    for form in (loaded, old_form):
        fresh = copy.deepcopy(model)
        resumed = _controller(fresh, several=several)
        resumed.load_state_dict(copy.deepcopy(form))
        assert resumed.param_groups[0]["lr"] == LR
        assert "ghoststep" not in resumed.param_groups[0]  # never into the inner groups
        _train(fresh, resumed, range(3, 5))
        for a, b in zip(reference[0].parameters(), fresh.parameters(), strict=True):
            assert torch.equal(a, b)
    if not several:
        bare = _controller(copy.deepcopy(model))
        bare.load_state_dict(inner[0])  # a plain optimizer checkpoint
        assert bare.step_count == 0
        assert _same(bare.optimizer.state_dict(), inner[0])


# ------------------------------------------------------------------ FSDP2, two ranks

SAVE_AT, STEPS = 3, 6
ROWS = (5, 3)


def _gloo(rank: int, world: int, init_file: str):
    return gloo_rank(rank, world, init_file, timeout=30)


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in [m for m in model if isinstance(m, nn.Linear)][:-1]:
        fully_shard(layer)
    fully_shard(model)
    return model


def _full(model) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _dcp_worker(rank: int, world: int, init_file: str, out_dir: str, phase: str) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with _gloo(rank, world, init_file), warnings.catch_warnings():
        warnings.simplefilter("ignore", (RuntimeWarning, FutureWarning, UserWarning))
        torch.set_num_threads(1)
        start = sum(ROWS[:rank])
        rows = slice(start, start + ROWS[rank])
        model = _fsdp_model()
        ctrl = _controller(model)
        if phase == "save":
            _train(model, ctrl, range(SAVE_AT), rows, world)
            msd, osd = get_state_dict(model, ctrl)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out_dir}/ckpt")
            _train(model, ctrl, range(SAVE_AT, STEPS), rows, world)
        else:
            msd, osd = get_state_dict(model, ctrl)  # DCP builds the fresh state first
            lr = ctrl.param_groups[0]["lr"]
            state = {"model": msd, "optim": osd}
            dcp.load(state, checkpoint_id=f"{out_dir}/ckpt")
            set_state_dict(
                model, ctrl, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
            assert lr == LR and ctrl.param_groups[0]["lr"] == LR
            assert ctrl.step_count == SAVE_AT
            _train(model, ctrl, range(SAVE_AT, STEPS), rows, world)
        scales = [s.scale for s in ctrl.history][-(STEPS - SAVE_AT) :]
        torch.save(
            {"params": _full(model), "scales": scales, "step_count": ctrl.step_count},
            f"{out_dir}/{phase}{rank}.pt",
        )


@pytest.mark.slow
def test_fsdp2_dcp_save_load_continue_is_bitwise(tmp_path):
    """Two gloo ranks, FSDP2: train 3 steps, DCP-save, train 3 more (the uninterrupted
    run); fresh processes build a fresh model and controller, DCP-load, continue 3
    steps: the parameters equal the uninterrupted run's bitwise on every rank."""
    spawn_ranks(_dcp_worker, (2, str(tmp_path / "pg_save"), str(tmp_path), "save"), timeout=150.0)
    spawn_ranks(_dcp_worker, (2, str(tmp_path / "pg_load"), str(tmp_path), "load"), timeout=150.0)
    runs = {phase: [torch.load(tmp_path / f"{phase}{r}.pt") for r in range(2)] for phase in
            ("save", "load")}  # fmt: skip
    print(f"\nFSDP2 DCP: uninterrupted scales {runs['save'][0]['scales']}, resumed "
          f"{runs['load'][0]['scales']}")  # fmt: skip
    assert any(s < 1.0 for s in runs["save"][0]["scales"])  # the clip binds
    for rank in range(2):
        done, resumed = runs["save"][rank], runs["load"][rank]
        assert resumed["scales"] == done["scales"]
        assert resumed["step_count"] == done["step_count"] == STEPS
        for a, b in zip(done["params"], resumed["params"], strict=True):
            assert torch.equal(a, b)

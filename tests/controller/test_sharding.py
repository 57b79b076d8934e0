"""The controller under FSDP2 (``fully_shard``) and DDP: two gloo processes on the CPU.

Each rank trains on its own, uneven share of a batch (5 and 3 rows); the run must
equal a single-process controller on the whole batch, step for step: the same scale s
on every rank and parameters equal to float tolerance, over steps where the clip binds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import gloo_rank, shard_or_replicate
from torch import nn

from ghoststep import RadiusController
from ghoststep.evaluation._sharding import is_sharded, local_shards, shard_group

ROWS = (5, 3)  # rows per rank: an uneven split of each 8-row batch
STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )


def _batches():
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(sum(ROWS), 6, generator=gen), torch.randint(0, 4, (sum(ROWS),), generator=gen))
        for _ in range(STEPS)
    ]


def _train(model, ctrl, batches, rows=slice(None), world: int = 1):
    """The loss is each rank's share of the whole batch's mean (world x sum / N): FSDP
    and DDP average gradients over ranks, so the update is the whole batch's."""
    scales = []
    for x, y in batches:
        ctrl.zero_grad()
        out = model(x[rows])
        loss = F.cross_entropy(out, y[rows], reduction="sum") * world / len(x)
        loss.backward()
        ctrl.step()
        scales.append(ctrl.last.scale)
    return scales


def _gloo(rank: int, world: int, init_file: str):
    return gloo_rank(rank, world, init_file, timeout=60)


def _worker(
    rank: int, world: int, init_file: str, out_dir: str, kind: str, method: str = "fast"
) -> None:
    with _gloo(rank, world, init_file):
        torch.set_num_threads(1)
        model = _model()
        wrapped = shard_or_replicate(model, kind)
        ctrl = RadiusController(
            torch.optim.Adam(wrapped.parameters(), lr=1.0), wrapped, method=method
        )
        start = sum(ROWS[:rank])
        scales = _train(wrapped, ctrl, _batches(), slice(start, start + ROWS[rank]), world)
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        torch.save(
            {"params": [p.detach() for p in params], "scales": scales, "rhos": [
                s.rho_a for s in ctrl.history
            ]},
            f"{out_dir}/{kind}{method}{rank}.pt",
        )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "method"), [("fsdp", "fast"), ("ddp", "fast"), ("fsdp", "jvp")])
def test_two_ranks_equal_the_single_process_run(tmp_path, kind, method):
    import torch.multiprocessing as mp

    args = (2, str(tmp_path / "pg"), str(tmp_path), kind, method)
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{kind}{method}{r}.pt") for r in range(2)]

    model = _model()
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=1.0), model, method=method)
    scales = _train(model, ctrl, _batches())
    rhos = [s.rho_a for s in ctrl.history]
    print(f"\n{kind} {method}: scales rank0 {ranks[0]['scales']}, rank1 {ranks[1]['scales']}, "
          f"single {scales}")  # fmt: skip

    assert ranks[0]["scales"] == ranks[1]["scales"]  # every rank applies the same s
    assert max(scales) < 1.0  # the clip binds on every step
    tol = 1e-5 if method == "jvp" else 1e-4  # exact slopes: float32 summation order only
    for r in ranks:
        assert r["scales"] == pytest.approx(scales, rel=tol)
        assert r["rhos"] == pytest.approx(rhos, rel=tol)
        rho_err = max(abs(a / b - 1.0) for a, b in zip(r["rhos"], rhos, strict=True))
        worst = max(
            float((a - b).abs().max()) for a, b in zip(r["params"], model.parameters(), strict=True)
        )
        print(f"{kind} {method}: max |param - single-process param| = {worst:.2e}, "
              f"max relative rho_a error {rho_err:.2e}")  # fmt: skip
        assert worst < tol
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)


def test_unsharded_parameters_have_no_shard_group():
    model = _model()
    params = list(model.parameters())
    assert not is_sharded(params)
    assert shard_group(params) is None
    assert all(a is b for a, b in zip(local_shards(params), params, strict=True))


def _refusal_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with _gloo(rank, world, init_file):
        model = _model()
        fully_shard(model)
        messages, chosen = [], {}
        try:
            RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, method="fd")
        except ValueError as err:
            messages.append(str(err))
        chosen["fp32"] = RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model).method
        half = _model()
        fully_shard(half, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        chosen["bf16"] = RadiusController(torch.optim.SGD(half.parameters(), lr=0.1), half).method
        try:
            RadiusController(torch.optim.SGD(half.parameters(), lr=0.1), half, method="fast")
        except ValueError as err:
            messages.append(str(err))
        torch.save((messages, chosen), f"{out_dir}/refusal{rank}.pt")


@pytest.mark.slow
def test_fsdp_refuses_fd_and_auto_picks_by_precision(tmp_path):
    """FSDP2: "fd" is refused naming what works; "auto" is "fast" for float32 and "jvp"
    under a bfloat16 MixedPrecisionPolicy, where "fast" is refused."""
    import torch.multiprocessing as mp

    mp.spawn(_refusal_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2)
    messages, chosen = torch.load(tmp_path / "refusal0.pt")
    assert len(messages) == 2
    assert 'method="jvp" or method="fast"' in messages[0]
    assert "MixedPrecisionPolicy" in messages[1] and 'use method="jvp"' in messages[1]
    assert chosen == {"fp32": "fast", "bf16": "jvp"}


def test_fsdp1_is_refused_with_what_works():
    class FullyShardedDataParallel(nn.Module):  # stands in for FSDP1 (it needs a GPU)
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    model = FullyShardedDataParallel(_model())
    with pytest.raises(ValueError, match="FSDP1.*fully_shard.*fast"):
        RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model)

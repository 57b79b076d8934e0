"""Every rank takes the same path: two gloo processes on the CPU where one rank's share
of a batch has no rows, or only masked positions, or no gradient.

Collectives (gloo's and NCCL's) are matched by the order in which each rank enters them:
a rank that skipped one would pair its next collective with the other rank's skipped
one (a crash, "connection closed by peer", or with NCCL a hang until the timeout). The
run must finish on both ranks, every rank must apply the same scale s (or skip), and it
must equal a single-process controller on the whole batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import gloo_rank, shard_or_replicate, spawn_ranks
from torch import nn

from ghoststep import RadiusController

FEATURES, CLASSES = 6, 4

# rows of each step's 8-row batch on rank 0 and rank 1 (sum 8, or 0: no rows anywhere)
SPLITS = {
    "empty_first": [(8, 0), (5, 3), (5, 3)],
    "empty_later": [(5, 3), (8, 0), (5, 3), (0, 0), (3, 5)],
    "masked": [(5, 3), (5, 3), (4, 4)],
    # monitor mode; at step 1 rank 0's 8 rows are all masked and rank 1 has none
    "masked_monitor": [(5, 3), (8, 0), (4, 4)],
    "no_grad": [(5, 3), (5, 3)],
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, CLASSES)
    )


def _batches(steps: int):
    """8-row batches; the last feature is -1 on the rows rank 1 gets in "masked" (the
    mask_fn ignores them), +1 elsewhere."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(8, FEATURES, generator=gen) * 2.0
        x[:, -1] = 1.0
        out.append((x, torch.randint(0, CLASSES, (8,), generator=gen)))
    return out


def _keep(x: torch.Tensor) -> torch.Tensor:
    return x[:, -1] > 0


def _controller(model, wrapped, scenario: str, method: str) -> RadiusController:
    mask = _keep if scenario.startswith("masked") else None
    mode = "monitor" if scenario == "masked_monitor" else "clip"
    return RadiusController(
        torch.optim.Adam(model.parameters(), lr=1.0), wrapped, method=method, mask_fn=mask,
        mode=mode,
    )  # fmt: skip


def _run(model, wrapped, ctrl, scenario: str, rank: int | None, world: int):
    """Train over the scenario's steps; rank None: one process on the whole batch. The
    loss is each rank's share of the whole batch's summed loss / 8 (DDP averages the
    gradients: world x sum / 8), so the update is the whole batch's."""
    steps = []
    for step, ((x, y), split) in enumerate(zip(_batches(len(SPLITS[scenario])), SPLITS[scenario])):
        if rank is None:
            rows = slice(0, sum(split))
        else:
            start = sum(split[:rank])
            rows = slice(start, start + split[rank])
        if scenario.startswith("masked"):
            x = x.clone()
            x[split[0] :, -1] = -1.0  # rank 1's rows: every position masked
            if split[1] == 0:
                x[:, -1] = -1.0  # and all rows where rank 1 has none
        x, y = x[rows], y[rows]
        ctrl.zero_grad()
        out = wrapped(x)
        loss = F.cross_entropy(out, y, reduction="sum") * world / 8.0
        if not (scenario == "no_grad" and step == 1 and rank == 1):
            loss.backward()
        ctrl.step()
        steps.append(_summary(ctrl.last))
    return steps


def _summary(stats) -> tuple:
    """(scale, skipped, rho_a) of a step; a skipped step's NaN radius as None (NaN is
    not equal to itself)."""
    rho = None if stats.rho_a != stats.rho_a else stats.rho_a
    return (stats.scale, stats.skipped, rho)


def _gloo(rank: int, world: int, init_file: str):
    return gloo_rank(rank, world, init_file, timeout=30)


def _worker(rank: int, world: int, init_file: str, out_dir: str, scenario: str, kind: str):
    import warnings

    with _gloo(rank, world, init_file), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.set_num_threads(1)
        model = _model()
        wrapped = shard_or_replicate(model, kind)
        ctrl = _controller(model, wrapped, scenario, _method(kind))
        steps = (
            _run(model, wrapped, ctrl, scenario, rank, world)
            if kind != "manual"
            else (_manual(model, ctrl, scenario, rank, world))
        )
        params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        torch.save(
            {"steps": steps, "params": [p.detach().clone() for p in params]},
            f"{out_dir}/{scenario}{kind}{rank}.pt",
        )


def _manual(model, ctrl, scenario, rank, world):
    """Plain replicas; rank 1 runs no backward at step 1 (no gradient there)."""
    import torch.distributed as dist

    steps = []
    for step, ((x, y), split) in enumerate(zip(_batches(len(SPLITS[scenario])), SPLITS[scenario])):
        start = sum(split[:rank])
        rows = slice(start, start + split[rank])
        ctrl.zero_grad()
        loss = F.cross_entropy(model(x[rows]), y[rows], reduction="sum") * world / 8.0
        if not (step == 1 and rank == 1):
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        elif rank == 1:
            # the other rank's all-reduces need a partner: zeros, then forget them
            for p in model.parameters():
                dist.all_reduce(torch.zeros_like(p))
        ctrl.step()
        steps.append(_summary(ctrl.last))
    return steps


def _method(kind: str) -> str:
    return {"fsdp": "fast", "ddp_jvp": "jvp"}.get(kind, "auto")


def _single(scenario: str, kind: str):
    model = _model()
    ctrl = _controller(model, model, scenario, _method(kind))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        steps = _run(model, model, ctrl, scenario, None, 1)
    return steps, [p.detach() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "kind"),
    [
        ("empty_first", "ddp"),
        ("empty_first", "ddp_jvp"),
        ("empty_later", "ddp"),
        ("masked", "ddp"),
        ("masked_monitor", "ddp"),
        ("empty_later", "fsdp"),
    ],
)
def test_a_rank_without_rows_or_counted_positions_takes_the_same_path(tmp_path, scenario, kind):
    """One rank's share is empty (at the first step, or later, and a step empty on both)
    or all masked (in monitor mode, which applies an all-masked update: also one rank
    all masked while the other has no rows): both ranks finish, apply the same scale,
    skip alike, and equal a single process on the whole batch."""
    spawn_ranks(_worker, (2, str(tmp_path / "pg"), str(tmp_path), scenario, kind))
    ranks = [torch.load(tmp_path / f"{scenario}{kind}{r}.pt") for r in range(2)]
    single, params = _single(scenario, kind)
    print(f"\n{scenario} {kind}: rank0 {ranks[0]['steps']}\n  rank1 {ranks[1]['steps']}\n"
          f"  single {single}")  # fmt: skip
    assert ranks[0]["steps"] == ranks[1]["steps"]  # same s, same skip, same rho_a
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    skipped = [s[1] for s in ranks[0]["steps"]]
    assert skipped == [s[1] for s in single]
    if scenario != "masked_monitor":
        assert any(s[0] < 1.0 for s in single)  # the clip binds somewhere
    for (scale, _, rho), (scale1, _, rho1) in zip(ranks[0]["steps"], single, strict=True):
        assert scale == pytest.approx(scale1, rel=1e-4)
        assert (rho is rho1 is None) or rho == pytest.approx(rho1, rel=1e-4)
    worst = max(float((a - b).abs().max()) for a, b in zip(ranks[0]["params"], params, strict=True))
    print(f"{scenario} {kind}: max |param - single-process param| = {worst:.2e}")
    # monitor mode applies Adam's full steps (lr 1), which carry the gradients' float
    # summation order further
    assert worst < (1e-3 if scenario == "masked_monitor" else 1e-4)


@pytest.mark.slow
def test_a_rank_without_gradient_skips_on_every_rank(tmp_path):
    """Rank 1 has no gradient at step 1 (rank 0 has): every rank skips that step (a rank
    that stepped alone would leave the replicas apart), then both go on alike."""
    spawn_ranks(_worker, (2, str(tmp_path / "pg"), str(tmp_path), "no_grad", "manual"))
    ranks = [torch.load(tmp_path / f"no_gradmanual{r}.pt") for r in range(2)]
    print(f"\nno_grad: rank0 {ranks[0]['steps']}\n  rank1 {ranks[1]['steps']}")
    assert [s[1] for s in ranks[0]["steps"]] == [False, True]
    assert [s[1] for s in ranks[1]["steps"]] == [False, True]
    assert ranks[0]["steps"][0] == ranks[1]["steps"][0]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)


def _accumulating(method: str, options: dict, sizes) -> tuple[list, list]:
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    ctrl = RadiusController(
        torch.optim.Adam(model.parameters(), lr=1.0), model, method=method, **options
    )
    gen = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            ctrl.zero_grad()
            for rows in sizes:
                x = torch.randn(rows, FEATURES, generator=gen) * 2.0
                y = torch.randint(0, CLASSES, (rows,), generator=gen)
                (F.cross_entropy(model(x), y, reduction="sum") / 8.0).backward()
            ctrl.step()
    return [s.scale for s in ctrl.history], [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("method", ["fast", "jvp"])
@pytest.mark.parametrize(
    "options",
    [{}, {"chunk_size": 4}, {"buffer_size": 2}, {"subset": 4}, {"mask_fn": _keep}],
    ids=["plain", "chunk_size", "buffer_size", "subset", "mask_fn"],
)
def test_a_micro_batch_of_zero_rows_is_measured_as_nothing(method, options):
    """One process: a 0-row micro-batch among the accumulated ones (what an empty rank
    measures) adds no position, so the run equals the one without it, bitwise."""
    with_empty = _accumulating(method, options, (8, 0))
    first_empty = _accumulating(method, options, (0, 8))
    plain = _accumulating(method, options, (8,))
    assert with_empty[0] == first_empty[0] == plain[0]
    assert min(plain[0]) < 1.0
    for params in (with_empty[1], first_empty[1]):
        assert all(torch.equal(a, b) for a, b in zip(params, plain[1], strict=True))


def _always_on_worker(rank: int, world: int, init_file: str, out_dir: str):
    """DDP, always-on (every=4), 10 steps of 4 rows per rank; at step 5 only rank 1's
    learning rate jumps 10x (its proposal alone is suspicious)."""
    import warnings

    with _gloo(rank, world, init_file), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.set_num_threads(1)
        model = _model()
        wrapped = nn.parallel.DistributedDataParallel(model)
        ctrl = RadiusController(
            torch.optim.Adam(model.parameters(), lr=1e-3), wrapped, method="fast", every=4
        )
        measured = []
        for step, (x, y) in enumerate(_batches(10)):
            ctrl.param_groups[0]["lr"] = 1e-2 if (step == 5 and rank == 1) else 1e-3
            ctrl.zero_grad()
            F.cross_entropy(
                wrapped(x[4 * rank : 4 * rank + 4]), y[4 * rank : 4 * rank + 4]
            ).backward()
            ctrl.step()
            measured.append(ctrl.last.measured)
        torch.save(measured, f"{out_dir}/always_on{rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_agree_on_when_they_measure(tmp_path):
    """Always-on under DDP: the ranks measure on the same steps (the decision is reduced
    over the ranks: a rank measuring alone would enter collectives the other does not),
    also when only one rank's proposal jumps, and between measurements they measure
    nothing."""
    spawn_ranks(_always_on_worker, (2, str(tmp_path / "pg"), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"always_on{r}.pt") for r in range(2)]
    print(f"\nmeasured: rank0 {ranks[0]}\n          rank1 {ranks[1]}")
    assert ranks[0] == ranks[1]
    assert ranks[0][5]  # rank 1's jump, measured on both
    assert ranks[0][0] and not all(ranks[0])

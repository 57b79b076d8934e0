"""Does the controller let you stop tuning the learning rate? (beyond the paper)

No spike: each method trains for 150 steps at a fixed base learning rate, on a grid
from 1e-5 to 10 (six decades), and we record the final test accuracy.

* ``adam``, ``sgdm``: plain Adam and SGD with momentum 0.9;
* ``adam+clip``, ``sgdm+clip``: the same wrapped in ``RadiusController(mode="clip",
  target_r=1)`` (the step is shortened to at most rho_a);
* ``adam+set0.5``, ``adam+set1``, ``adam+set2``: Adam in set mode, r* = 0.5, 1, 2 (the
  step length is r* rho_a; the base LR only scales Adam's proposal, whose direction
  does not depend on it).

Per method the **stable range** is the ratio of the largest to the smallest grid LR
whose median final accuracy is within 2 points of that method's best (the LRs in
between need not all qualify; the table lists how many do). Hypothesis, stated before
running: the clip controller's stable range is >= 100x plain Adam's, at a best
accuracy within 1 point of plain Adam's best.

Run: ``ghoststep run lrsweep`` (paper preset; see ``docs/experiments.md`` for its wall
time) or ``--preset quick`` (seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ghoststep_lab.common.figures import new_figure, save_figure
from ghoststep_lab.common.results import Claim, ClaimRule, Results, Table, evaluate_claims
from ghoststep_lab.common.runner import parallel_map
from ghoststep_lab.common.training import controlled_run, median_iqr

ARCH_LABELS = {"transformer": "Transformer", "mlp_ln": "MLP+LN", "cnn_bn": "CNN+BN"}


@dataclass
class Config:
    """Defaults are the paper preset (sized to run in about 15 min on 2 cores)."""

    archs: tuple[str, ...] = ("mlp_ln", "cnn_bn", "transformer")
    lrs: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    methods: tuple[str, ...] = (
        "adam",
        "sgdm",
        "adam+clip",
        "sgdm+clip",
        "adam+set0.5",
        "adam+set1",
        "adam+set2",
    )
    steps: int = 150  # trimmed from 200 for time (paper preset ~15 min on 2 cores)
    batch_size: int = 64
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    workers: int = 2  # processes (0: one per core)
    threads: int = 1
    # claim thresholds (stated before running)
    within: float = 0.02  # stable: median final accuracy within 2 points of the best
    wider: float = 100.0  # hypothesis: controller's stable range >= 100x plain's ...
    best_within: float = 0.01  # ... at a best accuracy within 1 point of plain's best


PRESETS = {
    "quick": {
        "archs": ("mlp_ln",),
        "lrs": (1e-3, 1e-1, 10.0),
        "seeds": [0],
        "steps": 30,
        "methods": ("adam", "adam+clip", "adam+set1"),
        "workers": 1,
    },
    "paper": {},
}


def parse_method(method: str) -> dict:
    """``"adam"``, ``"sgdm+clip"``, ``"adam+set0.5"`` -> controlled_run arguments."""
    base, _, wrap = method.partition("+")
    if base not in ("adam", "sgdm") or (wrap and wrap != "clip" and not wrap.startswith("set")):
        raise ValueError(f"unknown method {method!r}: <adam|sgdm>[+clip|+set<r*>]")
    if not wrap:
        return dict(optimizer=base, wrap=False, mode="monitor", method=method)
    if wrap == "clip":
        return dict(optimizer=base, mode="clip", target_r=1.0, method=method)
    return dict(optimizer=base, mode="set", target_r=float(wrap[3:]), method=method)


def sweep_run(arch: str, method: str, lr: float, seed: int, steps: int, batch_size: int):
    """One no-spike run; evaluated only at the start and the end."""
    return controlled_run(
        arch,
        seed=seed,
        lr=lr,
        steps=steps,
        batch_size=batch_size,
        eval_every=steps,
        **parse_method(method),
    )


def stable_range(lrs, accs, within: float) -> tuple[float, float, float, int]:
    """``(ratio, lo, hi, count)``: LRs whose accuracy is within ``within`` of the best.

    ``accs`` are the median final accuracies at ``lrs``; non-finite ones never qualify.
    """
    accs = np.asarray(accs, dtype=float)
    best = np.nanmax(accs)
    ok = [lr for lr, a in zip(lrs, accs) if np.isfinite(a) and a >= best - within]
    return max(ok) / min(ok), min(ok), max(ok), len(ok)


def run(config: Config, out_dir: Path, progress: bool) -> Results:
    for m in config.methods:
        parse_method(m)
    jobs = [
        dict(
            arch=a, method=m, lr=float(lr), seed=s, steps=config.steps, batch_size=config.batch_size
        )
        for a in config.archs
        for m in config.methods
        for lr in config.lrs
        for s in config.seeds
    ]
    records = parallel_map(
        sweep_run,
        jobs,
        workers=config.workers,
        threads=config.threads,
        progress=progress,
        desc="lrsweep runs",
    )
    groups: dict[tuple, list] = {}
    for job, rec in zip(jobs, records):
        groups.setdefault((job["arch"], job["method"], job["lr"]), []).append(rec)
    finals = {k: median_iqr([r.final_acc for r in recs]) for k, recs in groups.items()}
    r_max = {
        k: max((x for r in recs for x in r.r_after if math.isfinite(x)), default=math.nan)
        for k, recs in groups.items()
    }
    ranges = {}
    for a in config.archs:
        for m in config.methods:
            accs = [finals[(a, m, float(lr))][0] for lr in config.lrs]
            ratio, lo, hi, count = stable_range(config.lrs, accs, config.within)
            ranges[(a, m)] = dict(
                ratio=ratio,
                lo=lo,
                hi=hi,
                count=count,
                best=float(np.nanmax(accs)),
                top=accs[int(np.argmax(config.lrs))],
            )
    return Results(
        title="Final accuracy vs base learning rate: plain optimizers vs the controller",
        summary=(
            f"{len(jobs)} runs of {config.steps} steps without a spike, base LR "
            f"{min(config.lrs):g} to {max(config.lrs):g}. Stable range: ratio of the "
            f"largest to the smallest LR whose median final accuracy is within "
            f"{config.within * 100:g} points of the method's best."
        ),
        claims=_claims(config, ranges, r_max),
        tables=[_range_table(config, ranges), _acc_table(config, finals)],
        figures=[_plot(config, finals, out_dir)],
        metrics={
            "finals": {
                f"{a}/{m}/{lr:g}": {
                    "median": v[0],
                    "q25": v[1],
                    "q75": v[2],
                    "per_seed": [r.final_acc for r in groups[(a, m, lr)]],
                }
                for (a, m, lr), v in finals.items()
            },
            "stable_range": {f"{a}/{m}": v for (a, m), v in ranges.items()},
            "r_applied_max": {f"{a}/{m}/{lr:g}": v for (a, m, lr), v in r_max.items()},
        },
        notes=[
            f"Grid: {', '.join(f'{lr:g}' for lr in config.lrs)}; a range's ends are grid "
            "points, so ratios are powers of the grid spacing. Set mode with Adam only "
            "(trimmed for time); SGD-momentum is run plain and with the clip controller.",
            "Plain runs train the bare optimizer; the controller runs use the default "
            "RadiusController (method 'jvp', the radius on each training minibatch).",
        ],
    )


def _range_rule(a: str, base: str) -> ClaimRule:
    """The clip-controller widens ``base``'s stable range on architecture ``a``."""
    wrapped = f"{base}+clip"
    return ClaimRule(
        f"{ARCH_LABELS.get(a, a)}: {wrapped}'s stable range is >= "
        + "{c.wider:g}x "
        + f"{base}'s, at a best accuracy within "
        + "{best_within_points:g} point(s)",
        "not in the paper (our hypothesis)",
        lambda x: (x.ranges[(a, base)], x.ranges[(a, wrapped)]),
        holds=lambda pc, x: (
            pc[1]["ratio"] >= x.c.wider * pc[0]["ratio"]
            and pc[1]["best"] >= pc[0]["best"] - x.c.best_within
        ),
        ours=lambda pc, x: (
            f"range {pc[1]['ratio']:.3g}x vs {pc[0]['ratio']:.3g}x; best "
            f"{pc[1]['best']:.1%} vs {pc[0]['best']:.1%}"
        ),
        note=lambda pc, x: (
            f"at the largest LR ({max(x.c.lrs):g}) {wrapped} ends at "
            f"{pc[1]['top']:.1%}, {base} at {pc[0]['top']:.1%}; the range counts only LRs within "
            f"{x.c.within * 100:g} points of the best"
        ),
        always_note=True,
    )


def _clip_r(x) -> list[float] | None:
    finite = [v for (a, m, lr), v in x.r_max.items() if m.endswith("+clip") and math.isfinite(v)]
    return finite or None


def _set_runs(x) -> list | None:
    runs = [(a, m, x.ranges[(a, m)]) for a in x.c.archs for m in x.c.methods if "+set" in m]
    return runs or None


# Claims beside the per-architecture range claims of :func:`_range_rule`.
CLAIMS = (
    ClaimRule(
        "Every applied clip-controller step has r <= 1",
        "r <= 1",
        _clip_r,
        holds=lambda clip_r, x: max(clip_r) <= 1 + 1e-6,
        ours=lambda clip_r, x: f"max r = {max(clip_r):.6g}",
    ),
    ClaimRule(
        "Set mode's final accuracy does not depend on the base LR (stable over the whole grid)",
        "by construction (Adam's direction does not depend on the LR)",
        _set_runs,
        holds=lambda sets, x: all(v["ratio"] >= max(x.c.lrs) / min(x.c.lrs) for _, _, v in sets),
        ours=lambda sets, x: "; ".join(
            f"{ARCH_LABELS.get(a, a)} {m} {v['ratio']:.3g}x" for a, m, v in sets
        ),
        note=lambda sets, x: (
            "the step length does not depend on the LR, but float rounding "
            "of the proposal does; runs that leave the radius (r* > 1) amplify it"
        ),
        always_note=True,
    ),
)


def _claims(config: Config, ranges: dict, r_max: dict) -> list[Claim]:
    ranges_rules = [
        _range_rule(a, base)
        for base in ("adam", "sgdm")
        if base in config.methods and f"{base}+clip" in config.methods
        for a in config.archs
    ]
    return evaluate_claims(
        [*ranges_rules, *CLAIMS], c=config, ranges=ranges, r_max=r_max,
        best_within_points=config.best_within * 100,
    )  # fmt: skip


def _range_table(config: Config, ranges: dict) -> Table:
    rows = [
        [
            ARCH_LABELS.get(a, a),
            m,
            f"{v['best']:.1%}",
            f"{v['ratio']:.3g}x",
            f"{v['lo']:g} - {v['hi']:g}",
            f"{v['count']}/{len(config.lrs)}",
        ]
        for (a, m), v in ranges.items()
    ]
    return Table(
        title=f"Stable range per method (median final accuracy within "
        f"{config.within * 100:g} points of the method's best)",
        columns=[
            "arch",
            "method",
            "best accuracy",
            "stable range",
            "LRs (lo - hi)",
            "grid LRs within",
        ],
        rows=rows,
    )


def _acc_table(config: Config, finals: dict) -> Table:
    rows = [
        [ARCH_LABELS.get(a, a), m] + [f"{finals[(a, m, float(lr))][0]:.1%}" for lr in config.lrs]
        for a in config.archs
        for m in config.methods
    ]
    return Table(
        title="Median final test accuracy per base LR",
        columns=["arch", "method"] + [f"{lr:g}" for lr in config.lrs],
        rows=rows,
    )


def _plot(config: Config, finals: dict, out_dir: Path):
    fig, axes = new_figure(1, len(config.archs), figsize=(4.2 * len(config.archs), 3.4))
    axes = np.atleast_1d(axes)
    for ax, a in zip(axes, config.archs):
        for m in config.methods:
            vals = np.array([finals[(a, m, float(lr))] for lr in config.lrs])
            style = "--" if "+set" in m else ("-" if "+clip" in m else ":")
            ax.plot(config.lrs, vals[:, 0], style, marker="o", markersize=3, label=m)
            ax.fill_between(config.lrs, vals[:, 1], vals[:, 2], alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("base learning rate")
        ax.set_title(ARCH_LABELS.get(a, a))
    axes[0].set_ylabel("final test accuracy")
    axes[0].legend(fontsize=6, loc="lower left")
    return save_figure(
        fig,
        out_dir,
        "lrsweep.png",
        "Final test accuracy vs base learning rate (median, IQR band); "
        "dotted: plain, solid: clip controller, dashed: set mode",
    )

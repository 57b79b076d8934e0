"""The controller against the stabilizers people use, under learning-rate spikes.

Beyond the paper (which compares only plain Adam and ``clip_grad_norm_(1)``): nine
methods (:mod:`~ghoststep_lab.common.stabilizers`: plain, fixed-norm clipping, AGC,
ZClip, AdaGC, SPAM, StableSPAM, the controller in clip and in set mode) face a
learning-rate spike at step 50 of a 200-step run: the LR is multiplied by ``factor``
for one step (the paper's published code for Fig. 10) or held for 150 steps (Fig. 6).

* Adam on MLP+LN, CNN+BN, TinyTransformer (digits) and a TinyLM (a synthetic bigram
  language, :func:`~ghoststep_lab.common.data.markov_language`);
* SGD with momentum 0.9 and Lion on MLP+LN and the TinyLM (the Adam variants AdaGC,
  SPAM, StableSPAM do not apply there).

Per cell (optimizer, architecture, spike, method): median and IQR over seeds of the
final test accuracy (test loss for the LM, in nats), the steps until test accuracy is
back to 90% of its pre-spike value (next-token accuracy for the LM), and the training
wall clock per step relative to the plain optimizer (evaluations excluded).

Run: ``ghoststep run baselines`` (the paper preset; see ``docs/experiments.md`` for its
wall time) or ``--preset quick`` (seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ghoststep_lab.common.figures import new_figure, save_figure
from ghoststep_lab.common.results import Claim, ClaimRule, Results, Table, evaluate_claims
from ghoststep_lab.common.runner import parallel_map
from ghoststep_lab.common.stabilizers import (
    ADAM_ONLY,
    METHODS,
    SOURCES,
    applicable,
    stabilizer_run,
)
from ghoststep_lab.common.training import median_iqr, recovery_steps, summarize_finals

ARCH_LABELS = {
    "transformer": "Transformer",
    "mlp_ln": "MLP+LN",
    "cnn_bn": "CNN+BN",
    "tinylm": "TinyLM",
}
OPT_LABELS = {"adam": "Adam", "sgdm": "SGD-m", "lion": "Lion"}
CONTROLLERS = ("controller", "controller_set")


@dataclass
class Config:
    """Defaults are the paper preset (sized to run in about 30 min on 2 cores)."""

    archs: tuple[str, ...] = ("mlp_ln", "cnn_bn", "transformer", "tinylm")
    methods: tuple[str, ...] = METHODS
    factors: tuple[float, ...] = (100.0, 10000.0)
    spike_lengths: tuple[int, ...] = (1, 150)  # steps the LR is multiplied (150: held)
    other_optimizers: tuple[str, ...] = ("sgdm", "lion")
    other_archs: tuple[str, ...] = ("mlp_ln", "tinylm")  # where SGD-m and Lion run
    other_seeds: int = 2  # SGD-m / Lion use the first k seeds (trimmed from 5 for time)
    lr_adam: float = 1e-3
    lr_sgdm: float = 1e-2
    lr_lion: float = 3e-4  # Lion's rule of thumb: Adam's LR / 3 to / 10
    steps: int = 200
    spike_at: int = 50
    batch_size: int = 64
    lm_batch_size: int = 32  # sequences of lm_seq_len tokens
    lm_vocab: int = 32
    lm_seq_len: int = 16
    eval_every: int = 10  # also the resolution of the recovery steps
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    target_r: float = 1.0
    clip_norm: float = 1.0
    agc_lambda: float = 0.01
    zclip_z: float = 2.5
    adagc_warmup: int = 25
    spam_reset_every: int = 500
    recover_fraction: float = 0.9
    workers: int = 2  # processes (0: one per core)
    threads: int = 1
    # claim thresholds (stated before running)
    near_points: float = 0.02  # controller within 2 accuracy points of the best method
    near_nats: float = 0.05  # ... or within 0.05 nats of the best LM test loss
    best_from: float = 1000.0  # controller strictly best at held spikes >= this factor
    same_as_plain: float = 0.10  # gradient clippers within 10 points of plain Adam
    cost_ratio: float = 2.5  # controller per-step cost <= 2.5x plain (Transformer, TinyLM)


PRESETS = {
    "quick": {
        "archs": ("mlp_ln",),
        "factors": (10000.0,),
        "spike_lengths": (1, 25),
        "other_archs": ("tinylm",),
        "other_optimizers": ("lion",),
        "seeds": [0],
        "other_seeds": 1,
        "steps": 40,
        "spike_at": 15,
        "eval_every": 5,
        "lm_seq_len": 8,
        "lm_batch_size": 16,
        "workers": 1,
    },
    "paper": {},
}


def _lr(config: Config, optimizer: str) -> float:
    return {"adam": config.lr_adam, "sgdm": config.lr_sgdm, "lion": config.lr_lion}[optimizer]


def _jobs(config: Config) -> list[dict]:
    settings = dict(
        target_r=config.target_r,
        clip_norm=config.clip_norm,
        agc_lambda=config.agc_lambda,
        zclip_z=config.zclip_z,
        adagc_warmup=config.adagc_warmup,
        spam_reset_every=config.spam_reset_every,
    )
    lm = dict(
        vocab=config.lm_vocab, seq_len=config.lm_seq_len, order=1, batch_size=config.lm_batch_size
    )
    plan = [("adam", config.archs, list(config.seeds))]
    plan += [
        (o, config.other_archs, list(config.seeds)[: config.other_seeds])
        for o in config.other_optimizers
    ]
    jobs = []
    for opt, archs, seeds in plan:
        for arch in archs:
            for f in config.factors:
                for length in config.spike_lengths:
                    for m in config.methods:
                        if not applicable(m, opt):
                            continue
                        jobs += [
                            dict(
                                arch=arch,
                                method=m,
                                optimizer=opt,
                                lr=_lr(config, opt),
                                seed=s,
                                factor=float(f),
                                spike_at=config.spike_at,
                                spike_steps=int(length),
                                steps=config.steps,
                                batch_size=config.batch_size,
                                eval_every=config.eval_every,
                                lm=lm,
                                settings=settings,
                            )
                            for s in seeds
                        ]
    return jobs


def _cell_summary(recs: list, config: Config) -> dict:
    """Finals, recovery, per-step cost and applied r of one cell's seeds."""
    losses = [r.final_loss if math.isfinite(r.final_loss) else math.inf for r in recs]
    loss_med, loss_q25, loss_q75 = median_iqr(losses)
    rec_steps = [recovery_steps(r, config.recover_fraction) for r in recs]
    r_after = [x for r in recs for x in r.r_after if math.isfinite(x)]
    return {
        **summarize_finals(recs, diverge_loss=10.0),
        "loss_median": loss_med,
        "loss_q25": loss_q25,
        "loss_q75": loss_q75,
        "loss_per_seed": losses,
        "pre_spike_acc": float(
            np.median([r.test_acc[r.eval_steps.index(r.spike_at)] for r in recs])
        ),
        "recovery_median": float(np.median(rec_steps)),
        "recovery_per_seed": rec_steps,
        "sec_per_step": float(np.median([r.train_seconds / r.steps for r in recs])),
        "r_applied_max": max(r_after) if r_after else math.nan,
    }


def _score(arch: str, s: dict) -> float:
    """Higher is better: accuracy for classifiers, minus the test loss for the LM."""
    return -s["loss_median"] if arch == "tinylm" else s["median"]


def run(config: Config, out_dir: Path, progress: bool) -> Results:
    if config.spike_at % config.eval_every or not 0 < config.spike_at < config.steps:
        raise ValueError(
            f"spike_at={config.spike_at} must lie inside the run and be a "
            f"multiple of eval_every={config.eval_every} (the pre-spike accuracy)"
        )
    jobs = _jobs(config)
    records = parallel_map(
        stabilizer_run,
        jobs,
        workers=config.workers,
        threads=config.threads,
        progress=progress,
        desc="baselines runs",
    )
    groups: dict[tuple, list] = {}
    for job, rec in zip(jobs, records):
        key = (job["optimizer"], job["arch"], job["factor"], job["spike_steps"], job["method"])
        groups.setdefault(key, []).append(rec)
    summary = {key: _cell_summary(recs, config) for key, recs in groups.items()}
    costs = _costs(summary)
    held = max(config.spike_lengths)
    text = (
        f"{len(jobs)} runs: {len(config.methods)} methods against LR spikes of "
        + ", ".join(f"{f:g}x" for f in config.factors)
        + f" at step {config.spike_at} of {config.steps}, lasting "
        + " or ".join(f"{n} step{'s' if n > 1 else ''}" for n in config.spike_lengths)
        + ". Final test accuracy (TinyLM: test loss, nats), steps to recover to "
        f"{config.recover_fraction:.0%} of the pre-spike accuracy, and wall clock per step "
        "relative to the plain optimizer."
    )
    return Results(
        title="The controller against adaptive clipping and spike-aware optimizers",
        summary=text,
        claims=_claims(config, summary, costs, held),
        tables=[
            _finals_table(config, summary),
            _recovery_table(config, summary),
            _cost_table(costs),
            _sources_table(config),
        ],
        figures=[_heatmap(config, summary, out_dir)],
        metrics={
            "summary": {_key(k): v for k, v in summary.items()},
            "cost_vs_plain": {f"{o}/{a}": v for (o, a), v in costs.items()},
            "curves": {
                _key(k): {"eval_steps": recs[0].eval_steps, "test_acc": [r.test_acc for r in recs]}
                for k, recs in groups.items()
            },
        },
        notes=_notes(config),
    )


def _key(key: tuple) -> str:
    opt, arch, f, length, m = key
    return f"{opt}/{arch}/{f:g}x/{length}/{m}"


def _cond_label(f: float, length: int, held: int) -> str:
    return f"{f:g}x {'held' if length == held else f'{length}-step'}"


def _costs(summary: dict) -> dict:
    """(optimizer, arch) -> {method: median per-step wall clock / plain's}."""
    per: dict[tuple, dict[str, list]] = {}
    for (opt, arch, _f, _n, m), s in summary.items():
        per.setdefault((opt, arch), {}).setdefault(m, []).append(s["sec_per_step"])
    out = {}
    for key, by_method in per.items():
        if "plain" not in by_method:
            continue
        base = float(np.median(by_method["plain"]))
        out[key] = {m: float(np.median(v)) / base for m, v in by_method.items()}
        out[key]["plain_ms"] = 1000 * base
    return out


def _conditions(config: Config, summary: dict) -> list[tuple]:
    """(optimizer, arch, factor, length) present in the summary, in config order."""
    seen = []
    for opt, arch, f, length, _m in summary:
        if (opt, arch, f, length) not in seen:
            seen.append((opt, arch, f, length))
    return seen


def _gap(arch: str, cell: dict, best: float, config: Config) -> tuple[float, bool]:
    """How far the controller's score is below the best (points or nats), and if near."""
    gap = best - _score(arch, cell)
    tol = config.near_nats if arch == "tinylm" else config.near_points
    return gap, gap <= tol + 1e-12


def _near_best(x) -> tuple[int, int, tuple, int]:
    """(cells near the best, cells, (condition, gap) of the largest gap, cells near the
    best non-ghoststep method)."""
    config, summary = x.c, x.summary
    worst, n_ok, n, n_ok_others = (None, -math.inf), 0, 0, 0
    for cond in _conditions(config, summary):
        arch = cond[1]
        cells = {m: summary[(*cond, m)] for m in config.methods if (*cond, m) in summary}
        if "controller" not in cells:
            continue
        best = max(_score(arch, s) for s in cells.values())
        gap, ok = _gap(arch, cells["controller"], best, config)
        others = [_score(arch, s) for m, s in cells.items() if not m.startswith("controller")]
        n_ok_others += not others or _gap(arch, cells["controller"], max(others), config)[1]
        n, n_ok = n + 1, n_ok + ok
        if gap > worst[1]:
            worst = (cond, gap)
    return n_ok, n, worst, n_ok_others


def _cond_name(cond: tuple) -> str:
    opt, arch, f, length = cond
    return f"{OPT_LABELS.get(opt, opt)} {ARCH_LABELS.get(arch, arch)} {f:g}x/{length}"


def _best_at_held(x) -> tuple[list[str], bool]:
    """(margin of the controller over the best other method per cell, all positive)."""
    config, summary = x.c, x.summary
    rows, ok = [], True
    for cond in _conditions(config, summary):
        if cond[2] < config.best_from or cond[3] != x.held or (*cond, "controller") not in summary:
            continue
        arch = cond[1]
        ctrl = _score(arch, summary[(*cond, "controller")])
        others = [
            _score(arch, summary[(*cond, m)])
            for m in config.methods
            if m not in CONTROLLERS and (*cond, m) in summary
        ]
        if not others:
            continue
        margin = ctrl - max(others)
        ok = ok and margin > 0
        rows.append(f"{_cond_name(cond)}: {margin:+.3g}")
    return rows, ok


def _controller_r_max(x) -> float | None:
    r_max = [s["r_applied_max"] for k, s in x.summary.items() if k[-1] == "controller"]
    return max(r_max) if r_max else None


def _set_spread(x) -> dict | None:
    """Spread over spikes of controller_set's median final score, per (optimizer, arch)."""
    scores: dict[tuple, list] = {}
    for (opt, arch, _f, _n, m), s in x.summary.items():
        if m == "controller_set":
            scores.setdefault((opt, arch), []).append(_score(arch, s))
    if not scores:
        return None
    return {k: max(v) - min(v) for k, v in scores.items()}


def _clippers(x) -> tuple[list[str], bool] | None:
    """(each clipper's gap to plain Adam at the held largest spike, all within tolerance)."""
    config, summary, held = x.c, x.summary, x.held
    top = max(config.factors)
    clippers = [m for m in ("clip_grad", "agc", "zclip", "adagc") if m in config.methods]
    rows, ok = [], True
    for arch in config.archs:
        plain = summary.get(("adam", arch, top, held, "plain"))
        if arch == "tinylm" or plain is None:
            continue
        for m in clippers:
            s = summary.get(("adam", arch, top, held, m))
            if s is not None:
                ok = ok and abs(s["median"] - plain["median"]) <= config.same_as_plain
                rows.append(
                    f"{ARCH_LABELS.get(arch, arch)} {m} {s['median'] - plain['median']:+.2f}"
                )
    return (rows, ok) if rows else None


def _one_step(x) -> tuple[list[str], bool] | None:
    """(one-step vs held spike per plain cell, one-step never worse)."""
    rows, ok = [], True
    for (opt, arch, f, n, m), s in x.summary.items():
        held_cell = x.summary.get((opt, arch, f, x.held, m))
        if m != "plain" or n == x.held or held_cell is None:
            continue
        better = _score(arch, s) >= _score(arch, held_cell)
        ok = ok and better
        rows.append(
            f"{OPT_LABELS.get(opt, opt)} {ARCH_LABELS.get(arch, arch)} {f:g}x "
            f"{'ok' if better else 'NO'}"
        )
    return (rows, ok) if rows else None


def _costs_rows(x) -> list[tuple] | None:
    rows = [
        (o, a, c["controller"])
        for (o, a), c in x.costs.items()
        if a in ("transformer", "tinylm") and "controller" in c
    ]
    return rows or None


# The predictions of this experiment (none is in the paper), in report order.
CLAIMS = (
    ClaimRule(
        lambda x: (
            f"The controller is within {x.c.near_points * 100:g} points of the best "
            f"method's median final accuracy (TinyLM: {x.c.near_nats:g} nats of the best test "
            "loss) in every cell"
        ),
        "not in the paper (our prediction)",
        _near_best,
        holds=lambda v, x: v[1] > 0 and v[0] == v[1],
        ours=lambda v, x: (
            f"{v[0]}/{v[1]} cells; largest gap {v[2][1]:.3g} at "
            + ("-" if v[2][0] is None else _cond_name(v[2][0]))
        ),
        note=lambda v, x: (
            f"against the non-ghoststep methods only (set mode left out): {v[3]}/{v[1]} cells"
        ),
        always_note=True,
    ),
    ClaimRule(
        "At held spikes >= {c.best_from:g}x the controller is strictly best (median "
        "above every non-ghoststep method; margin in accuracy, or nats for TinyLM)",
        "not in the paper (our prediction)",
        _best_at_held,
        holds=lambda v, x: bool(v[0]) and v[1],
        ours=lambda v, x: "; ".join(v[0]) or "no such cell",
    ),
    ClaimRule(
        "Every applied controller (clip) step has r <= 1",
        "r <= 1",
        _controller_r_max,
        holds=lambda r_max, x: r_max <= x.c.target_r * (1 + 1e-6),
        ours=lambda r_max, x: f"max r = {r_max:.6g}",
    ),
    ClaimRule(
        lambda x: (
            "Set mode ignores the LR scale: controller_set's median final score varies "
            f"by at most {x.c.near_points * 100:g} points ({x.c.near_nats:g} nats) across spikes"
        ),
        "by construction (the step is r* rho_a; only float rounding of the proposal differs)",
        _set_spread,
        holds=lambda spread, x: all(
            v <= (x.c.near_nats if a == "tinylm" else x.c.near_points)
            for (_o, a), v in spread.items()
        ),
        ours=lambda spread, x: "; ".join(
            f"{OPT_LABELS.get(o, o)} {ARCH_LABELS.get(a, a)} {v:.3g}"
            for (o, a), v in spread.items()
        ),
    ),
    ClaimRule(
        lambda x: (
            "Gradient clippers do not bound Adam's step: at a held "
            f"{max(x.c.factors):g}x spike, clip_grad, AGC, ZClip and AdaGC end within "
            f"{x.c.same_as_plain * 100:g} points of plain Adam (classifiers)"
        ),
        "not in the paper (our prediction: Adam's step ~ lr, whatever ||g||)",
        _clippers,
        holds=lambda v, x: v[1],
        ours=lambda v, x: "; ".join(v[0]),
    ),
    ClaimRule(
        "For the plain optimizer a one-step spike does no more harm than a held "
        "one (final score one-step >= held, every optimizer/arch/factor)",
        "paper code: one step; paper Fig. 6: held",
        _one_step,
        holds=lambda v, x: v[1],
        ours=lambda v, x: "; ".join(v[0]),
    ),
    ClaimRule(
        "The controller's wall clock per step is <= {c.cost_ratio:g}x the plain "
        "optimizer's on Transformer and TinyLM",
        "README benchmark: ~2x (jvp)",
        _costs_rows,
        holds=lambda rows, x: all(v <= x.c.cost_ratio for _, _, v in rows),
        ours=lambda rows, x: "; ".join(
            f"{OPT_LABELS.get(o, o)} {ARCH_LABELS.get(a, a)} {v:.2f}x" for o, a, v in rows
        ),
    ),
)


def _claims(config: Config, summary: dict, costs: dict, held: int) -> list[Claim]:
    return evaluate_claims(CLAIMS, c=config, summary=summary, costs=costs, held=held)


def _fmt_cell(arch: str, s: dict | None) -> str:
    if s is None:
        return "-"
    if arch == "tinylm":
        return f"{s['loss_median']:.3g} ({s['loss_q25']:.3g}-{s['loss_q75']:.3g})"
    return f"{s['median']:.1%} ({s['q25']:.0%}-{s['q75']:.0%})"


def _finals_table(config: Config, summary: dict) -> Table:
    held = max(config.spike_lengths)
    rows = [
        [OPT_LABELS.get(c[0], c[0]), ARCH_LABELS.get(c[1], c[1]), _cond_label(c[2], c[3], held)]
        + [_fmt_cell(c[1], summary.get((*c, m))) for m in config.methods]
        for c in _conditions(config, summary)
    ]
    return Table(
        title="Median final test accuracy (IQR) per cell; TinyLM: median final test loss "
        "in nats (IQR), lower is better",
        columns=["optimizer", "arch", "spike"] + list(config.methods),
        rows=rows,
    )


def _recovery_table(config: Config, summary: dict) -> Table:
    held = max(config.spike_lengths)

    def cell(s):
        if s is None:
            return "-"
        x = s["recovery_median"]
        return "never" if math.isinf(x) else f"{x:g}"

    rows = [
        [OPT_LABELS.get(c[0], c[0]), ARCH_LABELS.get(c[1], c[1]), _cond_label(c[2], c[3], held)]
        + [cell(summary.get((*c, m))) for m in config.methods]
        for c in _conditions(config, summary)
    ]
    return Table(
        title=f"Median steps after the spike until test accuracy is back to "
        f"{config.recover_fraction:.0%} of its pre-spike value (0: never fell below; "
        f"resolution {config.eval_every} steps)",
        columns=["optimizer", "arch", "spike"] + list(config.methods),
        rows=rows,
    )


def _cost_table(costs: dict) -> Table:
    rows = [
        [OPT_LABELS.get(o, o), ARCH_LABELS.get(a, a), f"{c['plain_ms']:.2f}"]
        + [f"{c[m]:.2f}x" if m in c else "-" for m in METHODS]
        for (o, a), c in costs.items()
    ]
    return Table(
        title="Training wall clock per step relative to the plain optimizer (median over "
        "cells; evaluations excluded; 2 worker processes on a shared machine)",
        columns=["optimizer", "arch", "plain ms/step"] + list(METHODS),
        rows=rows,
    )


def _sources_table(config: Config) -> Table:
    return Table(
        title="Where each method's implementation comes from",
        columns=["method", "implementation", "optimizers"],
        rows=[[m, SOURCES[m], "Adam only" if m in ADAM_ONLY else "all"] for m in config.methods],
    )


def _notes(config: Config) -> list[str]:
    return [
        f"Base LRs (our choices, from a short no-spike check, not tuned on spikes): Adam "
        f"{config.lr_adam:g}, SGD-momentum {config.lr_sgdm:g}, Lion {config.lr_lion:g}.",
        f"Trimmed for time: spikes {', '.join(f'{f:g}x' for f in config.factors)} only; "
        f"SGD-m and Lion on {', '.join(config.other_archs)} with {config.other_seeds} seeds "
        f"(Adam: {len(config.seeds)} seeds); {config.steps} steps.",
        f"SPAM resets its momentum every {config.spam_reset_every} steps (StableSPAM every "
        f"1000, the package defaults): within {config.steps} steps no reset fires, so what "
        "acts is their spike clipping.",
        "TinyLM: 2 layers, d = 32, vocab 32, on a seeded random bigram language (Dirichlet "
        "0.1 successors); its recovery uses next-token accuracy.",
        "controller_set's step is r* rho_a whatever the LR, so no spike reaches it; it is "
        "also a different training run from the others before the spike.",
    ]


def _heatmap(config: Config, summary: dict, out_dir: Path):
    held = max(config.spike_lengths)
    panels = []
    for c in _conditions(config, summary):
        if (c[0], c[1]) not in panels:
            panels.append((c[0], c[1]))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(nrows, ncols, figsize=(3.6 * ncols, 3.4 * nrows))
    axes = np.atleast_1d(axes).ravel()
    for ax, (opt, arch) in zip(axes, panels):
        conds = [c for c in _conditions(config, summary) if c[:2] == (opt, arch)]
        methods = [m for m in config.methods if applicable(m, opt)]
        lm = arch == "tinylm"
        grid = np.array(
            [
                [
                    summary[(*c, m)]["loss_median" if lm else "median"]
                    if (*c, m) in summary
                    else np.nan
                    for c in conds
                ]
                for m in methods
            ]
        )
        shown = np.log10(np.clip(grid, 1e-3, 1e4)) if lm else grid
        ax.imshow(
            shown,
            cmap="viridis_r" if lm else "viridis",
            aspect="auto",
            vmin=None if lm else 0.0,
            vmax=None if lm else 1.0,
        )
        for i in range(len(methods)):
            for j in range(len(conds)):
                v = grid[i, j]
                ax.text(
                    j,
                    i,
                    "-" if not np.isfinite(v) else (f"{v:.2g}" if lm else f"{100 * v:.0f}"),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
        ax.set_xticks(
            range(len(conds)),
            [_cond_label(c[2], c[3], held) for c in conds],
            rotation=45,
            ha="right",
            fontsize=6,
        )
        ax.set_yticks(range(len(methods)), methods, fontsize=6)
        unit = "test loss (nats)" if lm else "accuracy %"
        ax.set_title(
            f"{OPT_LABELS.get(opt, opt)} {ARCH_LABELS.get(arch, arch)}: {unit}", fontsize=8
        )
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return save_figure(
        fig,
        out_dir,
        "baselines_heatmap.png",
        "Median final test accuracy (%; TinyLM: test loss in nats, lower is "
        "better) per method (rows) and spike (columns)",
    )

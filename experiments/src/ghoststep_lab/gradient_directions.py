"""Random-direction sweeps: is r = tau / rho_a(v) a direction-independent coordinate? (Fig. 8)

Protocol: train the digits MLP with Adam and keep checkpoints when its test accuracy
first reaches each stage threshold (paper: ~73%, 91%, 94%). At each checkpoint (eval
mode), take the steepest-descent direction of the full training loss and
``n_random`` seeded random unit directions. Along each direction v, measure
``rho_a(v) = pi / max_x Delta a(x; v)`` over the training set and step
``theta + tau v`` with ``tau = r rho_a(v)``: loss ratio (post/pre training loss) and
flip fraction (share of training predictions that change class) vs r. Also the
directional curvature ``kappa = v^T H v`` of the training loss and the
Hessian-implied step ``2 / kappa`` against ``rho_a(v)``. With several training
seeds the gradient's numbers are medians over seeds and the random directions are
pooled.

The paper: transitions near r ~ 1 for every direction; at r = 1 the median random
loss ratio is ~1.08 / 1.14 / 1.20 (early / mid / late) and the gradient's ~1.50 /
1.48 / 1.59, the gradient being the extreme direction; ``2 / kappa`` exceeds
``rho_a`` in every case, by ~10x early to ~460x late.

Run: ``ghoststep run directions --preset quick``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghoststep import measure, random_direction
from ghoststep_lab.common.data import digits
from ghoststep_lab.common.figures import new_figure, save_figure
from ghoststep_lab.common.probes import (
    curvature_along,
    descent_direction,
    first_crossing,
    line_sweep,
    log_grid,
    quadratic_step,
    train_checkpoints,
    value_at,
)
from ghoststep_lab.common.results import Claim, ClaimRule, Results, evaluate_claims
from ghoststep_lab.common.runner import progress_bar
from ghoststep_lab.common.training import sig

STAGE_NAMES = ("early", "mid", "late")


@dataclass
class Config:
    """Defaults follow Fig. 8 and App. 5.5: three stages, gradient + 20 random directions."""

    arch: str = "mlp"
    stage_accuracies: tuple[float, ...] = (0.73, 0.91, 0.94)
    paper_random_r1: tuple[float, ...] = (1.08, 1.14, 1.20)  # median random loss ratio at r = 1
    paper_gradient_r1: tuple[float, ...] = (1.50, 1.48, 1.59)  # gradient loss ratio at r = 1
    paper_hessian_ratio: tuple[float, ...] = (10.0, 460.0)  # (2/kappa) / rho_a, early -> late
    n_random: int = 20
    r_min: float = 0.1
    r_max: float = 10.0
    n_r: int = 21  # odd: r = 1 is on the grid
    max_steps: int = 3000
    lr: float = 1e-3
    batch_size: int = 64
    # training seeds: gradient values are medians, randoms pooled
    seeds: tuple[int, ...] = (0, 1, 2)
    direction_seed: int = 1000  # random direction k of seed s: direction_seed + 1000 s + k
    data_seed: int = 0
    random_r1_tolerance: float = 0.15  # |ours - paper| for the random loss ratio at r = 1
    gradient_r1_tolerance: float = 0.25  # relative, for the gradient at r = 1
    hessian_factor: float = 3.0  # early / late Hessian ratios within this factor of paper
    threads: int = 1  # intra-op torch threads while running (0: leave as is)


PRESETS = {"quick": {"n_random": 5, "n_r": 9, "seeds": (0,)}, "paper": {}}


def _probe(model, X, y, v, r, sign_label: str) -> dict:
    rho = measure(model, X, v).rho_a
    sweep = line_sweep(model, X, y, v, r * rho)
    kappa = curvature_along(model, X, y, v)
    tau_h = quadratic_step(kappa)
    ratio = sweep.loss_ratio.numpy()
    return {
        "kind": sign_label,
        "rho_a": rho,
        "loss_ratio": ratio.tolist(),
        "flip_fraction": sweep.flip_fraction.numpy().tolist(),
        "curvature": kappa,
        "hessian_step": tau_h,
        "hessian_over_rho": tau_h / rho,
        "onset_r": float(first_crossing(r, ratio, 2.0)),
        "loss_ratio_r1": value_at(r, ratio, 1.0),
        "flip_r1": value_at(r, sweep.flip_fraction.numpy(), 1.0),
    }


def _median_probe(runs: list[dict]) -> dict:
    """Element-wise median over seeds of ``_probe`` results. A missing onset (NaN: the
    loss never doubled on the grid) counts as beyond the grid, not as absent."""
    out = {"kind": runs[0]["kind"]}
    for key, value in runs[0].items():
        if key == "kind":
            continue
        arr = np.array([x[key] for x in runs], dtype=float)
        if key == "onset_r":
            med = float(np.median(np.where(np.isnan(arr), np.inf, arr)))
            out[key] = med if math.isfinite(med) else math.nan
            continue
        med = np.median(arr, axis=0)
        out[key] = med.tolist() if isinstance(value, list) else float(med)
    return out


def _stage_probes(config: Config, ck, X, y, r, seed: int, name: str, progress: bool) -> dict:
    model = ck.model
    down = descent_direction(model, X, y)
    randoms = [
        _probe(
            model,
            X,
            y,
            random_direction(model, seed=config.direction_seed + 1000 * seed + k),
            r,
            "random",
        )
        for k in progress_bar(
            range(config.n_random), desc=f"seed {seed} {name} directions", enabled=progress
        )
    ]
    return {
        "seed": seed,
        "test_accuracy": ck.test_accuracy,
        "step": ck.step,
        "gradient": _probe(model, X, y, down, r, "gradient"),
        "gradient_ascent": _probe(
            model, X, y, {k: -t for k, t in down.items()}, r, "gradient ascent"
        ),
        "random": randoms,
    }


def run(config: Config, out_dir: Path, progress: bool) -> Results:
    data = digits(config.data_seed)
    X, y = data.X_train, data.y_train
    r = log_grid(config.r_min, config.r_max, config.n_r)
    targets = list(config.stage_accuracies)
    names = list(STAGE_NAMES) if len(targets) == 3 else [f"stage{i}" for i in range(len(targets))]
    per_stage: dict[int, list[dict]] = {i: [] for i in range(len(targets))}
    for seed in [int(s) for s in config.seeds]:
        checkpoints = train_checkpoints(
            config.arch,
            seed,
            steps=config.max_steps,
            at_accuracy=targets,
            lr=config.lr,
            batch_size=config.batch_size,
            data=data,
            progress=progress,
        )
        for ck in checkpoints:
            i = targets.index(ck.target_accuracy)
            per_stage[i].append(_stage_probes(config, ck, X, y, r, seed, names[i], progress))

    stages = []
    for i, seed_runs in per_stage.items():
        if not seed_runs:
            continue
        randoms = [d for run_ in seed_runs for d in run_["random"]]
        rand_ratio = np.array([d["loss_ratio"] for d in randoms])
        rand_flip = np.array([d["flip_fraction"] for d in randoms])
        rand_r1 = np.array([d["loss_ratio_r1"] for d in randoms])
        rand_h = np.array([d["hessian_over_rho"] for d in randoms])
        stages.append(
            {
                "name": names[i],
                "index": i,
                "target_accuracy": targets[i],
                "test_accuracy": float(np.median([x["test_accuracy"] for x in seed_runs])),
                "step": int(np.median([x["step"] for x in seed_runs])),
                "seeds": [x["seed"] for x in seed_runs],
                "steps": [x["step"] for x in seed_runs],
                "gradient": _median_probe([x["gradient"] for x in seed_runs]),
                "gradient_ascent": _median_probe([x["gradient_ascent"] for x in seed_runs]),
                "gradient_runs": [x["gradient"] for x in seed_runs],
                "random": randoms,
                "random_median_loss_ratio": np.median(rand_ratio, axis=0).tolist(),
                "random_p10_loss_ratio": np.percentile(rand_ratio, 10, axis=0).tolist(),
                "random_p90_loss_ratio": np.percentile(rand_ratio, 90, axis=0).tolist(),
                "random_median_flip": np.median(rand_flip, axis=0).tolist(),
                "random_p10_flip": np.percentile(rand_flip, 10, axis=0).tolist(),
                "random_p90_flip": np.percentile(rand_flip, 90, axis=0).tolist(),
                "random_median_r1": float(np.median(rand_r1)),
                "random_p90_r1": float(np.percentile(rand_r1, 90)),
                "random_max_r1": float(rand_r1.max()),
                "random_median_hessian_over_rho": float(np.median(rand_h)),
                "random_min_hessian_over_rho": float(rand_h.min()),
                "random_max_hessian_over_rho": float(rand_h.max()),
            }
        )

    claims = _claims(config, stages)
    rows = []
    for s in stages:
        g = s["gradient"]
        rand_onsets = [d["onset_r"] for d in s["random"]]
        rows.append(
            [
                s["name"],
                sig(s["test_accuracy"]),
                s["step"],
                sig(g["rho_a"]),
                sig(float(np.median([d["rho_a"] for d in s["random"]]))),
                sig(g["loss_ratio_r1"]),
                sig(s["gradient_ascent"]["loss_ratio_r1"]),
                sig(s["random_median_r1"]),
                sig(g["flip_r1"]),
                sig(float(np.median([d["flip_r1"] for d in s["random"]]))),
                sig(g["onset_r"]),
                sig(float(np.nanmedian(rand_onsets))) if np.isfinite(rand_onsets).any() else "nan",
                sig(g["hessian_over_rho"]),
                sig(s["random_median_hessian_over_rho"]),
            ]
        )
    figures = [_plot_sweeps(r, stages, out_dir), _plot_hessian(stages, out_dir)]
    missing = [
        a for a in config.stage_accuracies if a not in [s["target_accuracy"] for s in stages]
    ]
    notes = [
        "Loss ratio, flip fraction, rho_a and curvature all use the full training set "
        f"({len(y)} samples), model in eval mode; random directions step +v, the "
        "gradient direction steps downhill (-g/||g||), as an optimizer would. The paper "
        "does not state the sign of its gradient sweep, so the uphill sweep (+g/||g||, "
        "same rho_a and curvature) is reported beside it ('ascent'), not scored.",
        "Onset r = first grid r where the loss ratio reaches 2 (NaN: not within "
        f"r <= {config.r_max:g}).",
    ]
    if missing:
        notes.append(f"test accuracy never reached {missing} within {config.max_steps} steps")
    return Results(
        title="Gradient vs random directions at three training stages (Fig. 8)",
        summary=(
            f"{config.arch} checkpoints ({len(config.seeds)} training seed(s); medians) at "
            "test accuracy "
            + ", ".join(f"{s['test_accuracy']:.1%} (step {s['step']})" for s in stages)
            + f"; gradient + {config.n_random} random unit directions; {config.n_r} values "
            f"of r in [{config.r_min:g}, {config.r_max:g}]. Median random loss ratio at "
            "r = 1: "
            + ", ".join(f"{s['random_median_r1']:.3f}" for s in stages)
            + "; gradient: "
            + ", ".join(f"{s['gradient']['loss_ratio_r1']:.3f}" for s in stages)
            + ". Hessian step / rho_a along the gradient: "
            + ", ".join(f"{s['gradient']['hessian_over_rho']:.3g}x" for s in stages)
            + "."
        ),
        claims=claims,
        tables=[
            {
                "title": "Per stage (r = 1 values interpolated on the grid)",
                "columns": [
                    "stage",
                    "test acc",
                    "step",
                    "rho_a grad",
                    "rho_a random (median)",
                    "loss ratio r=1 grad",
                    "loss ratio r=1 ascent",
                    "loss ratio r=1 random median",
                    "flip r=1 grad",
                    "flip r=1 random median",
                    "onset r grad",
                    "onset r random median",
                    "(2/kappa)/rho_a grad",
                    "(2/kappa)/rho_a random median",
                ],
                "rows": rows,
            }
        ],
        figures=figures,
        metrics={"r": r.tolist(), "stages": stages},
        notes=notes,
    )


def _hessian_ratios(x) -> list[float]:
    """(2/kappa)/rho_a of every direction (gradient runs and random) at every stage."""
    return [d["hessian_over_rho"] for s in x.stages for d in [*s["gradient_runs"], *s["random"]]]


def _growth_rule(kind: str, key: str | None) -> ClaimRule:
    """(2/kappa)/rho_a grows from ~10x to ~460x along the gradient (``key`` None) or for
    the stage summary ``key``."""

    def seq(x) -> list[float]:
        return [s["gradient"]["hessian_over_rho"] if key is None else s[key] for s in x.stages]

    def within(v, ref, x):
        return math.isfinite(v) and ref / x.c.hessian_factor <= v <= ref * x.c.hessian_factor

    def holds(v, x):
        lo_p, hi_p = x.c.paper_hessian_ratio
        grows = all(b > a for a, b in zip(v, v[1:]))
        return grows and within(v[0], lo_p, x) and within(v[-1], hi_p, x) and len(x.stages) >= 2

    return ClaimRule(
        "Hessian overestimation (2/kappa)/rho_a grows from ~10x early to ~460x late "
        f"({kind}; " + "each end within {c.hessian_factor:g}x of the paper's, growing across "
        "stages)",
        lambda x: "{:g}x -> {:g}x".format(*x.c.paper_hessian_ratio),
        seq,
        holds=holds,
        ours=lambda v, x: " -> ".join(f"{r:.3g}x" for r in v),
        note=lambda v, x: (
            "the paper does not say which loss or batch its curvature uses, nor "
            "exactly how its checkpoints were trained; the ratio scales like "
            "e^margin / |Delta|, so it is very sensitive to how confident the "
            "checkpoint is"
            + (
                "; inf = kappa <= 0 (negative curvature along the direction), where the "
                "quadratic model sets no step limit at all"
                if any(not math.isfinite(r) for r in v)
                else ""
            )
        ),
    )


def _per_stage(paper_key: str, value):
    """``value(stage)`` at each stage of the paper's list ``paper_key`` (NaN if not reached)."""

    def measure(x):
        by_index = {s["index"]: s for s in x.stages}
        n = len(getattr(x.c, paper_key))
        return [value(by_index[i]) if i in by_index else math.nan for i in range(n)]

    return measure


def _sign_note(x) -> str:
    ascent = ", ".join(f"{s['gradient_ascent']['loss_ratio_r1']:.3f}" for s in x.stages)
    return (
        "scored on the downhill step; the paper does not state its sign. Stepping uphill "
        f"(+g/||g||) gives {ascent} at r = 1"
    )


def _onsets(x) -> tuple[int, int, float]:
    """(directions doubling below r = 1, directions, median random onset)."""
    onsets = [d["onset_r"] for s in x.stages for d in [*s["gradient_runs"], *s["random"]]]
    early_fail = sum(1 for o in onsets if math.isfinite(o) and o < 1)
    rand_onsets = [d["onset_r"] for s in x.stages for d in s["random"]]
    med = float(np.nanmedian(rand_onsets)) if np.isfinite(rand_onsets).any() else math.nan
    return early_fail, len(onsets), med


def _joined(paper_key: str):
    return lambda x: ", ".join(f"{p:.2f}" for p in getattr(x.c, paper_key))


# The paper's claims (Fig. 8), in report order.
CLAIMS = (
    ClaimRule(
        "The Hessian-implied step 2/(v^T H v) exceeds rho_a in every case (all stages, "
        "gradient and random directions): smallest ratio",
        "> 1 in every case",
        lambda x: min(_hessian_ratios(x)),
        holds=lambda lowest, x: lowest > 1,
        ours=lambda lowest, x: f"{lowest:.3g}x",
    ),
    _growth_rule("gradient", None),
    _growth_rule("median random direction", "random_median_hessian_over_rho"),
    ClaimRule(
        "Median random-direction loss ratio at r = 1 (early, mid, late; each within "
        "+-{c.random_r1_tolerance:g})",
        _joined("paper_random_r1"),
        _per_stage("paper_random_r1", lambda s: s["random_median_r1"]),
        holds=lambda v, x: all(
            math.isfinite(o) and abs(o - p) <= x.c.random_r1_tolerance
            for o, p in zip(v, x.c.paper_random_r1)
        ),
        ours=lambda v, x: ", ".join(f"{o:.3f}" for o in v),
        note=lambda v, x: (
            "our random directions inflate the loss somewhat more at r = 1. Possible "
            "causes: which samples the paper's loss ratio and rho_a use (ours: the full "
            "training set, which gives the smallest rho_a and so the shortest steps), and "
            "how its random directions are drawn (ours: isotropic Gaussian over all "
            "parameters, biases included, unit global norm)"
        ),
    ),
    ClaimRule(
        "Gradient-direction loss ratio at r = 1 (early, mid, late; each within "
        "{c.gradient_r1_tolerance:.0%})",
        _joined("paper_gradient_r1"),
        _per_stage("paper_gradient_r1", lambda s: s["gradient"]["loss_ratio_r1"]),
        holds=lambda v, x: all(
            math.isfinite(o) and abs(o / p - 1) <= x.c.gradient_r1_tolerance
            for o, p in zip(v, x.c.paper_gradient_r1)
        ),
        ours=lambda v, x: ", ".join(f"{o:.3f}" for o in v),
        note=lambda v, x: _sign_note(x),
        always_note=True,
    ),
    ClaimRule(
        "The gradient is the extreme direction: its loss ratio at r = 1 exceeds the "
        "90th percentile of the random directions at every stage",
        "gradient degrades earliest",
        lambda x: [s["gradient"]["loss_ratio_r1"] > s["random_p90_r1"] for s in x.stages],
        holds=lambda extreme, x: all(extreme),
        ours=lambda extreme, x: f"{sum(extreme)}/{len(x.stages)} stages",
        note=lambda extreme, x: (
            _sign_note(x) + "; uphill exceeds the random 90th percentile at "
            f"{sum(s['gradient_ascent']['loss_ratio_r1'] > s['random_p90_r1'] for s in x.stages)}"
            f"/{len(x.stages)} stages"
        ),
        always_note=True,
    ),
    ClaimRule(
        "Transition near r ~ 1 for every direction: no direction's loss doubles below "
        "r = 1, and the random directions' median onset (loss ratio >= 2) is at r <= 10",
        "transition near r ~ 1",
        _onsets,
        holds=lambda v, x: v[0] == 0 and math.isfinite(v[2]) and v[2] <= 10,
        ours=lambda v, x: (
            f"{v[0]} of {v[1]} directions double below r = 1; median random onset r = {sig(v[2])}"
        ),
    ),
)


def _claims(config: Config, stages: list[dict]) -> list[Claim]:
    if not stages:
        return [Claim("Training reached the stage accuracies", "73%, 91%, 94%", "none", False)]
    return evaluate_claims(CLAIMS, c=config, stages=stages)


def _plot_sweeps(r, stages, out_dir) -> dict:
    n = max(1, len(stages))
    fig, axes = new_figure(2, n, figsize=(4.0 * n, 6.0))
    axes = np.asarray(axes).reshape(2, n)
    for j, s in enumerate(stages):
        top, bottom = axes[0, j], axes[1, j]
        top.fill_between(
            r,
            s["random_p10_loss_ratio"],
            s["random_p90_loss_ratio"],
            alpha=0.3,
            label="random 10-90th pct",
        )
        top.plot(r, s["random_median_loss_ratio"], label="median random")
        top.plot(r, s["gradient"]["loss_ratio"], color="red", label="gradient")
        bottom.fill_between(r, s["random_p10_flip"], s["random_p90_flip"], alpha=0.3)
        bottom.plot(r, s["random_median_flip"])
        bottom.plot(r, s["gradient"]["flip_fraction"], color="red")
        top.set_ylim(0, 10)
        bottom.set_ylim(0, 1)
        top.set_title(f"{s['name'].capitalize()} ({s['test_accuracy']:.0%} acc)")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
        bottom.set_xlabel("r = τ / ρ_a(v)")
        if j == 0:
            top.set_ylabel("loss ratio")
            bottom.set_ylabel("flip fraction")
            top.legend(fontsize=7)
    return save_figure(
        fig,
        out_dir,
        "fig8_random_directions.png",
        "Fig. 8: loss ratio and flip fraction vs r, gradient vs random directions",
    )


def _plot_hessian(stages, out_dir) -> dict:
    fig, ax = new_figure(figsize=(5, 3.6))
    for j, s in enumerate(stages):
        rand = [d["hessian_over_rho"] for d in s["random"]]
        ax.scatter(
            [j] * len(rand), rand, color="tab:blue", s=12, label="random" if j == 0 else None
        )
        ax.scatter(
            [j],
            [s["gradient"]["hessian_over_rho"]],
            color="red",
            marker="D",
            label="gradient" if j == 0 else None,
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels([f"{s['name']}\n{s['test_accuracy']:.0%}" for s in stages])
    ax.set_ylabel("(2 / vᵀHv) / ρ_a(v)")
    ax.set_title("Hessian step vs radius")
    ax.legend(fontsize=8)
    return save_figure(
        fig,
        out_dir,
        "hessian_vs_rho.png",
        "Hessian-implied step 2/(v^T H v) over rho_a(v) per stage and direction",
    )

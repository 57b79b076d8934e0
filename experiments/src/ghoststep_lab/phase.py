"""Phase transition at r = 1 across architectures (paper Fig. 1 and Fig. 7).

Protocol: train each architecture on digits to convergence (Adam), put it in eval
mode, take the steepest-descent direction v = -g/||g|| of the full training-set
loss, measure ``rho_a(v) = pi / max_x Delta a(x; v)`` over the same training
samples, and take ONE step ``theta + tau v`` with ``tau = r rho_a`` for log-spaced
r in [0.01, 100]. For every r: test accuracy retained (post/pre) and loss
inflation (post/pre test loss; the training-loss ratio is kept in the metrics).
With several seeds the curves are medians over seeds (transition points are read
off the median curves) and the lowest share retained at r < 1 is the worst seed's.

The paper: no architecture fails for r < 1; collapse appears once r >= 1; the
Linear model transitions at r ~ 1, the others carry confidence-margin slack and
transition between r = 1 and 10. "Fails" here means that the test accuracy drops
below half its pre-step value.

Run: ``ghoststep run phase --preset quick``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ghoststep import measure
from ghoststep_lab.common.data import digits
from ghoststep_lab.common.figures import new_figure, save_figure
from ghoststep_lab.common.probes import (
    descent_direction,
    first_crossing,
    line_sweep,
    log_grid,
    pretrain,
)
from ghoststep_lab.common.results import ClaimRule, Results, evaluate_claims
from ghoststep_lab.common.runner import progress_bar
from ghoststep_lab.common.training import sig

LABELS = {
    "linear": "Linear",
    "mlp": "MLP",
    "mlp_ln": "MLP+LayerNorm",
    "cnn": "CNN",
    "cnn_bn": "CNN+BatchNorm",
    "transformer": "TinyTransformer",
}


@dataclass
class Config:
    """Defaults follow Fig. 7: six architectures, r in [0.01, 100], one step."""

    architectures: tuple[str, ...] = ("linear", "mlp", "mlp_ln", "cnn", "cnn_bn", "transformer")
    steps: int = 1500  # Adam steps "to convergence"
    lr: float = 1e-3
    # The convex linear model crawls at 1e-3 (train accuracy ~95% after 1500 steps);
    # 1e-2 brings it to its optimum (train accuracy >= 99%) within the same budget.
    linear_lr: float = 1e-2
    batch_size: int = 64
    r_min: float = 0.01
    r_max: float = 100.0
    n_r: int = 33  # odd: r = 1 is on the grid
    fail_below: float = 0.5  # "fails" = test accuracy retained below this share
    keep_above: float = 0.9  # "keeps its accuracy" = retained at least this share
    seeds: tuple[int, ...] = (0, 1, 2)  # curves are medians over seeds
    data_seed: int = 0
    threads: int = 1  # intra-op torch threads while running (0: leave as is)


PRESETS = {
    "quick": {"architectures": ("linear", "mlp", "cnn"), "steps": 300, "n_r": 9, "seeds": (0,)},
    "paper": {},
}


def _probe_arch(arch: str, seed: int, config: Config, data, r: np.ndarray) -> dict:
    lr = config.linear_lr if arch == "linear" else config.lr
    net = pretrain(arch, config.steps, seed, lr=lr, batch_size=config.batch_size, data=data)
    model = net.model  # eval mode
    v = descent_direction(model, data.X_train, data.y_train)
    rho = measure(model, data.X_train, v).rho_a
    test = line_sweep(model, data.X_test, data.y_test, v, r * rho)
    trn = line_sweep(model, data.X_train, data.y_train, v, r * rho)
    return {
        "seed": seed,
        "lr": lr,
        "train_accuracy": trn.accuracy0,
        "test_accuracy": test.accuracy0,
        "test_loss": test.loss0,
        "train_loss": trn.loss0,
        "rho_a": rho,
        "accuracy_retained": test.accuracy_retained.numpy(),
        "test_loss_ratio": test.loss_ratio.numpy(),
        "train_loss_ratio": trn.loss_ratio.numpy(),
    }


def _combine(arch: str, runs: list[dict], r: np.ndarray, config: Config) -> dict:
    """Median curves over seeds; transition points read off the median curves; the
    lowest retained share at r < 1 is the worst seed's."""
    retained_all = np.array([x["accuracy_retained"] for x in runs])
    retained = np.median(retained_all, axis=0)
    test_ratio = np.median(np.array([x["test_loss_ratio"] for x in runs]), axis=0)
    train_ratio = np.median(np.array([x["train_loss_ratio"] for x in runs]), axis=0)
    scalars = ("train_accuracy", "test_accuracy", "test_loss", "train_loss", "rho_a")
    out = {"label": LABELS.get(arch, arch), "lr": runs[0]["lr"]}
    out.update({k: float(np.median([x[k] for x in runs])) for k in scalars})
    out.update(
        {
            "accuracy_retained": retained.tolist(),
            "accuracy_retained_q25": np.percentile(retained_all, 25, axis=0).tolist(),
            "accuracy_retained_q75": np.percentile(retained_all, 75, axis=0).tolist(),
            "test_loss_ratio": test_ratio.tolist(),
            "train_loss_ratio": train_ratio.tolist(),
            "fail_r": float(first_crossing(r, -retained, -config.fail_below)),
            "degrade_r": float(first_crossing(r, -retained, -config.keep_above)),
            "loss_onset_r": float(first_crossing(r, test_ratio, 2.0)),
            "min_retained_below_1": float(retained_all[:, r < 1].min()),
            "min_retained_at_or_above_1": float(retained_all[:, r >= 1].min()),
            "per_seed": [
                {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in x.items()}
                for x in runs
            ],
        }
    )
    return out


def _linear_note(f_lin: float, x) -> str:
    lin = x.per_arch["linear"]
    return (
        "'others later' is reported, not scored. "
        f"Our Linear model loses half its accuracy only at r = {sig(f_lin)}, "
        "but its loss starts to inflate right at r = 1 (ratio "
        f"{sig(_at(x.r, lin['test_loss_ratio'], 1.0))} at r = 1, doubling at "
        f"r = {sig(lin['loss_onset_r'])}; accuracy below 90% from "
        f"r = {sig(lin['degrade_r'])}). A linear model's logits are exactly "
        "linear in the step, so rho_a is the radius of the exact line loss and "
        "accuracy needs the logit gaps to close, which takes a few radii; an "
        "under-trained Linear model (train accuracy ~95%) never collapses at "
        "all, because its gradient is itself a decent classifier."
    )


def _linear_ours(f_lin: float, x) -> str:
    others = [f for a, f in x.fail_rs.items() if a != "linear"]
    if others:
        return f"Linear {sig(f_lin)}; others median {sig(float(np.nanmedian(others)))}"
    return f"Linear {sig(f_lin)}"


def _linear_transitions(f_lin: float) -> bool:
    return math.isfinite(f_lin) and 0.5 <= f_lin <= 3.0


# The paper's claims (Fig. 1, Fig. 7), on the per-architecture summaries of ``run``:
# ``worst`` is the lowest share of accuracy retained at r < 1, ``fail_rs`` the first r
# where accuracy falls below ``fail_below`` of its pre-step value.
CLAIMS = (
    ClaimRule(
        "No architecture fails (test accuracy below {c.fail_below:.0%} of its "
        "pre-step value) for any r < 1: lowest share retained at r < 1",
        "no failure for r < 1",
        lambda x: x.worst,
        holds=lambda worst, x: worst >= x.c.fail_below,
        ours=lambda worst, x: f"{worst:.3f} ({LABELS.get(x.worst_arch, x.worst_arch)})",
    ),
    ClaimRule(
        "Every network keeps its accuracy for r < 1 (retained >= {c.keep_above:.0%})",
        "keeps accuracy for r < 1 (Fig. 1)",
        lambda x: x.worst,
        holds=lambda worst, x: worst >= x.c.keep_above,
        ours=lambda worst, x: f"lowest {worst:.3f}",
    ),
    ClaimRule(
        "Collapse appears once r >= 1 in every architecture: first r where accuracy "
        "falls below {c.fail_below:.0%} (r <= {c.r_max:g})",
        "all collapse for r >= 1",
        lambda x: x.fail_rs,
        holds=lambda fail_rs, x: x.all_fail and all(f >= 1 for f in fail_rs.values()),
        ours=lambda fail_rs, x: x.fail_text,
        note=lambda fail_rs, x: (
            None if x.all_fail else "NaN = never fell below half within the r grid"
        ),
        always_note=True,
    ),
    ClaimRule(
        "Transitions cluster between r = 1 and r = 10 (scored on the first r where "
        "accuracy falls below half)",
        "1 <= r <= 10",
        lambda x: (len(x.in_band), len(x.per_arch)),
        holds=lambda v, x: v[0] == v[1],
        ours=lambda v, x: f"{v[0]}/{v[1]} architectures fail within [1, 10]",
        note=lambda v, x: (
            f"the half-accuracy points lie at r = {x.span('fail_r')}, so some fall past 10; "
            f"the transitions themselves begin inside [1, 10]: {x.onset_note}"
        ),
    ),
    ClaimRule(
        "The Linear model transitions at r ~ 1 (first r with accuracy below half "
        "within [0.5, 3]); the others retain confidence-margin slack",
        "Linear ~ 1, others later",
        lambda x: x.fail_rs["linear"] if "linear" in x.per_arch else None,
        holds=lambda f_lin, x: _linear_transitions(f_lin),
        ours=_linear_ours,
        note=lambda f_lin, x: (
            "'others later' is reported, not scored. "
            if _linear_transitions(f_lin)
            else _linear_note(f_lin, x)
        ),
        always_note=True,
    ),
)


def run(config: Config, out_dir: Path, progress: bool) -> Results:
    data = digits(config.data_seed)
    r = log_grid(config.r_min, config.r_max, config.n_r)
    seeds = [int(s) for s in config.seeds]
    jobs = [(a, s) for a in config.architectures for s in seeds]
    runs: dict[str, list[dict]] = {a: [] for a in config.architectures}
    for arch, seed in progress_bar(jobs, desc="architecture x seed", enabled=progress):
        runs[arch].append(_probe_arch(arch, seed, config, data, r))
    per_arch = {a: _combine(a, rs, r, config) for a, rs in runs.items()}

    archs = list(per_arch)
    below = {a: per_arch[a]["min_retained_below_1"] for a in archs}
    worst_arch = min(below, key=below.get)
    worst = below[worst_arch]
    fail_rs = {a: per_arch[a]["fail_r"] for a in archs}
    all_fail = all(math.isfinite(f) for f in fail_rs.values())
    in_band = [a for a, f in fail_rs.items() if math.isfinite(f) and 1 <= f <= 10]
    fail_text = ", ".join(f"{LABELS.get(a, a)} {sig(f)}" for a, f in fail_rs.items())

    def span(key: str) -> str:
        vals = [per_arch[a][key] for a in archs]
        finite = [v for v in vals if math.isfinite(v)]
        if not finite:
            return "none within the grid"
        text = f"{sig(min(finite))}-{sig(max(finite))}"
        return text if len(finite) == len(vals) else text + " (some never)"

    onset_note = (
        f"accuracy starts to drop (retained < {config.keep_above:g}) at r = "
        f"{span('degrade_r')} and the test loss doubles at r = {span('loss_onset_r')}; "
        f"r grid spacing x{r[1] / r[0]:.2f}"
    )
    claims = evaluate_claims(
        CLAIMS, c=config, r=r, per_arch=per_arch, worst=worst, worst_arch=worst_arch,
        fail_rs=fail_rs, all_fail=all_fail, in_band=in_band, fail_text=fail_text, span=span,
        onset_note=onset_note,
    )  # fmt: skip

    rows = [
        [
            per_arch[a]["label"],
            sig(per_arch[a]["train_loss"]),
            sig(per_arch[a]["train_accuracy"]),
            sig(per_arch[a]["test_accuracy"]),
            sig(per_arch[a]["rho_a"]),
            sig(per_arch[a]["min_retained_below_1"]),
            sig(per_arch[a]["degrade_r"]),
            sig(per_arch[a]["fail_r"]),
            sig(per_arch[a]["loss_onset_r"]),
            sig(_at(r, per_arch[a]["test_loss_ratio"], 1.0)),
            sig(_at(r, per_arch[a]["test_loss_ratio"], 10.0)),
        ]
        for a in archs
    ]
    figures = [_plot(r, per_arch, out_dir)]
    return Results(
        title="Phase transition at r = 1: one gradient step of length r * rho_a",
        summary=(
            f"{len(archs)} architectures trained {config.steps} Adam steps (lr {config.lr:g}, "
            f"Linear {config.linear_lr:g}; batch {config.batch_size}; {len(config.seeds)} "
            "seed(s), median curves); one step along the normalized full-batch gradient "
            f"with tau = r rho_a, rho_a = pi / max Delta a over the {len(data.y_train)} "
            f"training samples; {config.n_r} values of r in [{config.r_min:g}, "
            f"{config.r_max:g}]. Lowest test accuracy retained at any r < 1: {worst:.3f} "
            f"({LABELS.get(worst_arch, worst_arch)})."
        ),
        claims=claims,
        tables=[
            {
                "title": "Per architecture",
                "columns": [
                    "architecture",
                    "train loss",
                    "train acc",
                    "test acc",
                    "rho_a",
                    "min retained (r<1)",
                    f"first r retained < {config.keep_above:g}",
                    f"first r retained < {config.fail_below:g}",
                    "first r test-loss ratio >= 2",
                    "loss ratio at r=1",
                    "loss ratio at r=10",
                ],
                "rows": rows,
            }
        ],
        figures=figures,
        metrics={
            "r": r.tolist(),
            "lowest_retained_below_1": worst,
            "lowest_retained_below_1_arch": worst_arch,
            "fail_r": fail_rs,
            "architectures": per_arch,
        },
        notes=[
            "All probes in eval mode (BatchNorm running statistics), so the gradient, "
            "rho_a and the evaluation see the same function.",
            "Loss inflation is the test-loss ratio; train_loss_ratio is in the metrics.",
        ],
    )


def _at(r: np.ndarray, values, x: float) -> float:
    idx = int(np.argmin(np.abs(np.log(r) - math.log(x))))
    return float(values[idx])


def _plot(r, per_arch, out_dir) -> dict:
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(10, 3.8))
    for res in per_arch.values():
        (line,) = ax1.semilogx(
            r, 100 * np.asarray(res["accuracy_retained"]), marker=".", label=res["label"]
        )
        if len(res["per_seed"]) > 1:
            ax1.fill_between(
                r,
                100 * np.asarray(res["accuracy_retained_q25"]),
                100 * np.asarray(res["accuracy_retained_q75"]),
                color=line.get_color(),
                alpha=0.2,
            )
        ax2.loglog(
            r, np.asarray(res["test_loss_ratio"], dtype=float), marker=".", label=res["label"]
        )
    for ax in (ax1, ax2):
        ax.axvline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel("normalized step r = τ / ρ_a")
    ax1.axhline(50, color="grey", linewidth=0.6)
    ax1.set_ylabel("test accuracy retained (%)")
    ax1.set_title("A: accuracy retained")
    ax2.set_ylabel("loss inflation (post / pre)")
    ax2.set_title("B: loss inflation")
    ax1.legend(fontsize=7)
    return save_figure(
        fig,
        out_dir,
        "fig7_phase_transition.png",
        "Fig. 7: one gradient step at tau = r rho_a per architecture; r = 1 dashed",
    )

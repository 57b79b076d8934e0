"""Transformer bottlenecks: which radius limits the step (paper Fig. 11, Table 2, Section 6.6).

A TinyTransformer (d = 32, 2 layers, ReLU FFN; the 8 rows of a digit are 8 tokens)
trains on sklearn digits with Adam under four step-size strategies:

* ``all_radii``: the step is set to ``tau = r* rho_net`` with
  ``rho_net = min(rho_out, rho_attn, rho_ffn)``:

  - ``rho_out = pi / Delta_out``: the output-logit radius (the controller's rho_a);
  - ``rho_attn = pi / Delta_attn``: the same bound for the pre-softmax attention
    logits (max spread over layers, heads, queries, samples);
  - ``rho_ffn = Q_0.01(|h| / |h_dot|)``: distance of the FFN pre-activations to the
    ReLU kink (a conservative proxy, paper Appendix 2);

  all along Adam's update direction from forward-mode JVPs
  (:class:`~ghoststep.controller.AllRadiiController`);
* ``output_only``: the same controller with ``rho_out`` alone;
* ``fixed_1x`` / ``fixed_16x``: plain Adam at eta0 and 16 eta0 (radii monitored).

The paper: fixed 16x diverges, 1x converges slowly, the all-radii controller reaches
the lowest loss; the binding radius is the FFN early (94/100 logged points), mixed in
the middle, the output late (97/105); attention never binds.

Run: ``ghoststep run transformer`` (paper protocol, 20 runs of 1200 steps: about 12-25 min
serial on one core, 2.5 min with ``--set workers=16`` on 16 cores) or ``--preset quick``.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ghoststep.controller import AllRadiiController
from ghoststep_lab.common.figures import new_figure, plot_band, save_figure
from ghoststep_lab.common.results import Claim, ClaimRule, Results, Table, evaluate_claims
from ghoststep_lab.common.runner import parallel_map
from ghoststep_lab.common.training import controlled_run, finite_median

METHOD_LABELS = {
    "all_radii": "all-radii controller",
    "output_only": "output-only controller",
    "fixed_1x": "fixed LR 1×",
    "fixed_16x": "fixed LR 16×",
}
METHOD_COLORS = {
    "all_radii": "#d4a017",
    "output_only": "#8e44ad",
    "fixed_1x": "#2c7fb8",
    "fixed_16x": "#c0392b",
}
RADIUS_LABELS = {"ffn": "FFN", "out": "Out", "attn": "Attn"}
# Paper Table 2: binding counts per phase (FFN, Out, Attn) over 5 seeds x 61 evaluations,
# and the median radii pooled per phase (ffn, out, attn).
PAPER_TABLE2 = {
    "early": ((94, 6, 0), 100, (0.0164, 0.0307, 0.645)),
    "middle": ((48, 52, 0), 100, (0.0111, 0.0107, 0.203)),
    "late": ((8, 97, 0), 105, (0.0131, 0.00793, 0.168)),
}
PHASES = ("early", "middle", "late")
RADII = ("out", "attn", "ffn")  # the output, attention and FFN radii of AllRadiiController


@dataclass
class Config:
    """Defaults follow the paper's protocol (Fig. 11 / Table 2) where it is stated."""

    methods: tuple[str, ...] = ("all_radii", "output_only", "fixed_1x", "fixed_16x")
    base_lr: float = 1e-3  # "1x"; the paper does not state it
    high_factor: float = 16.0  # "the highest fixed rate set to 16x the lowest"
    steps: int = 1200  # Fig. 11's x-axis; 61 logged evaluations every 20 steps
    batch_size: int = 64
    controller_mode: str = "set"  # adaptive controllers set tau = r* rho (effective LR varies)
    target_r: float = 1.0
    ffn_quantile: float = 0.01
    log_every: int = 20  # binding radius logged at steps 0, 20, ..., and the last step
    eval_every: int = 20
    d_model: int = 32
    n_layers: int = 2
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    workers: int = 1  # processes (0: one per core)
    threads: int = 1  # torch threads per run (fixed: reproducible bits, no oversubscription)


PRESETS = {
    "quick": {"steps": 60, "seeds": [0], "eval_every": 10, "log_every": 5},
    "paper": {},
}


def transformer_run(method: str, seed: int, config: dict):
    """One run of ``method`` (see the module docstring); ``config`` is ``asdict(Config)``."""
    c = Config(**config)
    adaptive = method in ("all_radii", "output_only")
    use = RADII if method == "all_radii" else ("out",)
    lr = c.base_lr * (c.high_factor if method == "fixed_16x" else 1.0)
    return controlled_run(
        "transformer",
        seed=seed,
        lr=lr,
        steps=c.steps,
        batch_size=c.batch_size,
        mode=c.controller_mode if adaptive else "monitor",
        target_r=c.target_r,
        eval_every=c.eval_every,
        eval_train=True,
        controller_cls=AllRadiiController,
        controller_kwargs={"limit_by": use, "report": RADII[1:], "ffn_quantile": c.ffn_quantile},
        model_kwargs={"d_model": c.d_model, "n_layers": c.n_layers},
        method=method,
    )


def logged_steps(steps: int, every: int) -> list[int]:
    """Step indices where the binding radius is logged: 0, every, 2 every, ..., and the last."""
    out = list(range(0, steps, every))
    if out[-1] != steps - 1:
        out.append(steps - 1)
    return out


def run(config: Config, out_dir: Path, progress: bool) -> Results:
    import dataclasses

    cfg = dataclasses.asdict(config)
    jobs = [dict(method=m, seed=s, config=cfg) for m in config.methods for s in config.seeds]
    records = parallel_map(
        transformer_run,
        jobs,
        workers=config.workers,
        threads=config.threads,
        progress=progress,
        desc="transformer runs",
    )
    groups: dict[str, list] = {}
    for job, rec in zip(jobs, records):
        groups.setdefault(job["method"], []).append(rec)

    logged = logged_steps(config.steps, config.log_every)
    third = len(logged) // 3  # thirds, the last one takes the remainder (paper: 20/20/21)
    phases = [logged[:third], logged[third : 2 * third], logged[2 * third :]]
    finals = {}
    for m, recs in groups.items():
        losses = [rec.train_eval_loss[-1] for rec in recs]
        finals[m] = {
            "train_loss": finite_median(losses),
            "train_loss_per_seed": losses,
            "nonfinite": sum(1 for v in losses if not math.isfinite(v)),
            "initial_loss": finite_median(rec.train_eval_loss[0] for rec in recs),
            "best_loss": finite_median(np.nanmin(rec.train_eval_loss) for rec in recs),
            "test_acc": finite_median(rec.test_acc[-1] for rec in recs),
            "lr_median": finite_median(v for rec in recs for v in rec.lr_applied),
        }
    binding = {}
    if "all_radii" in groups:
        binding = _binding(groups["all_radii"], phases)

    claims = _claims(config, finals, binding, groups.get("all_radii", []), logged)
    tables = [_final_table(config, finals)]
    if binding:
        tables.append(_table2(binding, len(groups["all_radii"])))
    figures = [_plot_training(config, groups, out_dir)]
    if "all_radii" in groups:
        figures.append(_plot_radii(config, groups["all_radii"], out_dir))

    order = sorted(
        finals, key=lambda m: (not math.isfinite(finals[m]["train_loss"]), finals[m]["train_loss"])
    )
    text = (
        f"TinyTransformer (d = {config.d_model}, {config.n_layers} layers) on digits, "
        f"{config.steps} Adam steps. Final training loss (median over "
        f"{len(config.seeds)} seed(s)): "
        + ", ".join(f"{METHOD_LABELS[m]} {finals[m]['train_loss']:.3g}" for m in order)
        + ". "
        "The adaptive controllers set every step to r* = "
        f"{config.target_r:g} times their radius ({config.controller_mode} mode)."
    )
    if binding:
        text += (
            " Binding radius of the all-radii controller, early / middle / late: "
            + "; ".join(
                f"{ph}: "
                + ", ".join(
                    f"{RADIUS_LABELS[k]} {binding[ph]['counts'][k]}" for k in ("ffn", "out", "attn")
                )
                + f" of {binding[ph]['n']}"
                for ph in PHASES
            )
            + "."
        )
    metrics = {
        "finals": finals,
        "binding": binding,
        "logged_steps": logged,
        "runs": {
            m: {
                "eval_steps": recs[0].eval_steps,
                "train_loss": [rec.train_eval_loss for rec in recs],
                "test_acc": [rec.test_acc for rec in recs],
                "effective_lr": [[rec.lr_applied[s] for s in logged] for rec in recs],
                "radii": {k: [[rec.radii[k][s] for s in logged] for rec in recs] for k in RADII},
                "binding": [[rec.binding[s] for s in logged] for rec in recs],
                "seconds": [round(rec.seconds, 3) for rec in recs],
            }
            for m, recs in groups.items()
        },
    }
    notes = [
        f"The paper does not state the base LR, optimizer, batch size or whether its "
        f"adaptive controllers clip or set the step; we use Adam, eta0 = {config.base_lr:g}, "
        f"batch {config.batch_size}, and {config.controller_mode} mode with r* = "
        f"{config.target_r:g} (its 'effective LR' panel varies by orders of magnitude, "
        "which a set-controller does). Nothing was tuned to match.",
        "Radii are in parameter-space distance along v = p / ||p||; rho_ffn is the "
        f"{config.ffn_quantile:g}-quantile of |h| / |h_dot| pooled over layers, tokens, "
        "units and the minibatch. Training loss = full training set, eval mode.",
        "Fixed-LR runs are plain Adam (controller in monitor mode); their radii are "
        "recorded for diagnosis only.",
    ]
    return Results(
        title="Tiny transformer: all-radii vs output-only controller vs fixed LR",
        summary=text,
        claims=claims,
        tables=tables,
        figures=figures,
        metrics=metrics,
        notes=notes,
    )


def _binding(recs: list, phases: list[list[int]]) -> dict:
    out = {}
    for name, steps in zip(PHASES, phases):
        counts = Counter(rec.binding[s] for rec in recs for s in steps)
        out[name] = {
            "counts": {k: counts.get(k, 0) for k in ("ffn", "out", "attn")},
            "n": len(steps) * len(recs),
            "median_radii": {
                k: finite_median(rec.radii[k][s] for rec in recs for s in steps)
                for k in ("ffn", "out", "attn")
            },
            "steps": [int(steps[0]), int(steps[-1])],
        }
    return out


def _diverged(f: dict) -> bool:
    return f["nonfinite"] > 0 or not f["train_loss"] < f["initial_loss"]


def _binding_note(binding) -> str:
    """Why the binding pattern differs: compare our median radii with the paper's."""
    ratios = []
    for ph in ("early", "late"):
        ours = binding[ph]["median_radii"]
        paper = dict(zip(("ffn", "out", "attn"), PAPER_TABLE2[ph][2]))
        ratios.append(
            ", ".join(f"rho_{k} {ours[k] / paper[k]:.2g}x" for k in ("ffn", "out", "attn"))
        )
    return (
        "our median radii relative to the paper's Table 2 -- early: "
        + ratios[0]
        + "; late: "
        + ratios[1]
        + ". Where rho_out is several times the paper's while "
        "rho_ffn is not, rho_ffn stays the minimum. Candidate causes (untested): the "
        "sample set rho_out is measured on (ours: each 64-sample minibatch; a larger set "
        "can only give a smaller rho_out) and transformer details the paper does not give "
        "(tokenization, pooling, head). We did not tune anything to match"
    )


def _lowest_loss(x) -> str | None:
    """The method with the lowest final training loss, when all-radii ran beside others."""
    finals = x.finals
    if not (finals.get("all_radii") and len(finals) > 1):
        return None
    loss = {
        m: f["train_loss"] if math.isfinite(f["train_loss"]) else math.inf
        for m, f in finals.items()
    }
    return min(finals, key=loss.get)


def _fixed_1x_vs_all(x) -> tuple[dict, dict] | None:
    f1, fa = x.finals.get("fixed_1x"), x.finals.get("all_radii")
    return (f1, fa) if f1 and fa else None


def _binding_phase(phase: str):
    return lambda x: x.binding[phase] if x.binding else None


def _median_radii(k: str):
    """(ours, paper) median rho_k per phase."""

    def measure(x):
        if not x.binding:
            return None
        ours = [x.binding[ph]["median_radii"][k] for ph in PHASES]
        paper = [PAPER_TABLE2[ph][2][("ffn", "out", "attn").index(k)] for ph in PHASES]
        return ours, paper

    return measure


def _median_radii_rule(k: str) -> ClaimRule:
    return ClaimRule(
        f"Median rho_{k} per phase (early / middle / late) within 2x of Table 2",
        lambda x: " / ".join(f"{v:g}" for v in _median_radii(k)(x)[1]),
        _median_radii(k),
        holds=lambda v, x: all(0.5 <= o / p <= 2.0 for o, p in zip(*v)),
        ours=lambda v, x: " / ".join(f"{o:.3g}" for o in v[0]),
        note=lambda v, x: (
            "radii depend on model details and on the sample set "
            "they are measured on; see the binding claims"
        ),
    )


def _attention_binds(x) -> tuple[int, int] | None:
    if not x.binding:
        return None
    return (
        sum(x.binding[p]["counts"]["attn"] for p in PHASES),
        sum(x.binding[p]["n"] for p in PHASES),
    )


def _first_last(x) -> tuple[Counter, Counter] | None:
    if not x.binding:
        return None
    first = Counter(rec.binding[x.logged[0]] for rec in x.all_recs)
    last = Counter(rec.binding[x.logged[-1]] for rec in x.all_recs)
    return first, last


def _mixed(mid: dict) -> bool:
    return min(mid["counts"]["ffn"], mid["counts"]["out"]) >= 0.2 * mid["n"]


# The paper's claims (Fig. 11, Table 2), in report order. The binding claims share one
# explanation: in full on the first that fails, then a pointer to it (``x.why``).
CLAIMS = (
    ClaimRule(
        "The all-radii controller reaches the lowest final training loss",
        "all-radii lowest",
        _lowest_loss,
        holds=lambda best, x: best == "all_radii",
        ours=lambda best, x: ", ".join(
            f"{METHOD_LABELS[m]} {f['train_loss']:.3g}" for m, f in x.finals.items()
        ),
        note=lambda best, x: (
            f"in our runs {METHOD_LABELS[best]} ends lowest. The all-radii steps are "
            f"short (median effective LR {x.finals['all_radii']['lr_median']:.2g}, the min of "
            f"three radii) so it is slower over {x.c.steps} steps; the paper's optimizer, base "
            "LR and step rule are not stated"
        ),
    ),
    ClaimRule(
        "Fixed LR {c.high_factor:g}x diverges (final training loss not below the initial loss)",
        "diverges",
        lambda x: x.finals.get("fixed_16x") or None,
        holds=lambda f, x: _diverged(f),
        ours=lambda f, x: (
            f"final {f['train_loss']:.3g} vs initial {f['initial_loss']:.3g} "
            f"(best along the run {f['best_loss']:.3g})"
        ),
        note=lambda f, x: (
            f"Adam at {x.c.base_lr * x.c.high_factor:g} does not diverge here (its "
            "loss is noisier and ends above its best); the paper's base LR and optimizer "
            "are not stated, a larger base LR would diverge sooner. Not tuned"
        ),
    ),
    ClaimRule(
        "Fixed LR 1x converges, but more slowly than the all-radii controller (higher "
        "final training loss, not diverged)",
        "converges slowly",
        _fixed_1x_vs_all,
        holds=lambda v, x: (not _diverged(v[0])) and v[0]["train_loss"] > v[1]["train_loss"],
        ours=lambda v, x: f"1x {v[0]['train_loss']:.3g} vs all-radii {v[1]['train_loss']:.3g}",
        note=lambda v, x: (
            f"Adam at {x.c.base_lr:g} converges faster than the all-radii controller "
            f"here; its steps are {x.c.base_lr / v[1]['lr_median']:.2g}x longer than "
            "the all-radii controller's median effective LR"
        ),
    ),
    ClaimRule(
        "Early training is FFN-limited (rho_ffn binds in most early logged steps)",
        "94/100",
        _binding_phase("early"),
        holds=lambda e, x: e["counts"]["ffn"] / e["n"] > 0.5,
        ours=lambda e, x: f"{e['counts']['ffn']}/{e['n']}",
        note=lambda e, x: x.why(),
    ),
    ClaimRule(
        "The middle third mixes FFN and output bottlenecks (each binds at least 20%)",
        "48/100 FFN, 52/100 Out",
        _binding_phase("middle"),
        holds=lambda mid, x: _mixed(mid),
        ours=lambda m, x: f"{m['counts']['ffn']}/{m['n']} FFN, {m['counts']['out']}/{m['n']} Out",
        note=lambda mid, x: x.why(),
    ),
    ClaimRule(
        "Late training is output-limited (rho_out binds in most late logged steps)",
        "97/105",
        _binding_phase("late"),
        holds=lambda late, x: late["counts"]["out"] / late["n"] > 0.5,
        ours=lambda late, x: f"{late['counts']['out']}/{late['n']}",
        note=lambda late, x: x.why(),
    ),
    *(_median_radii_rule(k) for k in ("ffn", "out", "attn")),
    ClaimRule(
        "The attention radius never binds",
        "0/305",
        _attention_binds,
        holds=lambda v, x: v[0] == 0,
        ours=lambda v, x: f"{v[0]}/{v[1]}",
    ),
    ClaimRule(
        "Every seed starts FFN-limited and ends output-limited",
        "every seed",
        _first_last,
        holds=lambda v, x: set(v[0]) == {"ffn"} and set(v[1]) == {"out"},
        ours=lambda v, x: f"first: {dict(v[0])}; last: {dict(v[1])}",
        note=lambda v, x: x.why(),
    ),
)


def _claims(config, finals, binding, all_recs, logged) -> list[Claim]:
    said = []

    def why() -> str:  # the full explanation once, then a pointer to it
        if said:
            return "same cause as noted above for the binding pattern"
        said.append(True)
        return _binding_note(binding)

    return evaluate_claims(
        CLAIMS, c=config, finals=finals, binding=binding, all_recs=all_recs, logged=logged, why=why
    )


def _final_table(config, finals) -> Table:
    rows = []
    for m, f in finals.items():
        rows.append(
            [
                METHOD_LABELS[m],
                f"{f['initial_loss']:.3g}",
                f"{f['best_loss']:.3g}",
                f"{f['train_loss']:.3g}",
                f"{f['test_acc']:.1%}",
                f"{f['lr_median']:.3g}",
                "yes" if _diverged(f) else "no",
            ]
        )
    return Table(
        title="Final training loss and test accuracy (median over seeds)",
        columns=[
            "method",
            "initial loss",
            "best loss",
            "final loss",
            "final test acc",
            "median effective LR",
            "diverged",
        ],
        rows=rows,
    )


def _table2(binding, n_seeds) -> Table:
    rows = []
    for ph in PHASES:
        b = binding[ph]
        paper_counts, paper_n, paper_radii = PAPER_TABLE2[ph]
        rows.append(
            [
                ph,
                f"{b['steps'][0]}-{b['steps'][1]}",
                f"{b['counts']['ffn']}/{b['n']} ({paper_counts[0]}/{paper_n})",
                f"{b['counts']['out']}/{b['n']} ({paper_counts[1]}/{paper_n})",
                f"{b['counts']['attn']}/{b['n']} ({paper_counts[2]}/{paper_n})",
                f"{b['median_radii']['ffn']:.3g} ({paper_radii[0]:g})",
                f"{b['median_radii']['out']:.3g} ({paper_radii[1]:g})",
                f"{b['median_radii']['attn']:.3g} ({paper_radii[2]:g})",
            ]
        )
    return Table(
        title=f"Table 2: which radius binds in the all-radii run, ours (paper), {n_seeds} seed(s)",
        columns=[
            "phase",
            "steps",
            "FFN",
            "Out",
            "Attn",
            "med. rho_ffn",
            "med. rho_out",
            "med. rho_attn",
        ],
        rows=rows,
    )


def _plot_training(config, groups, out_dir) -> dict:
    fig, (ax_loss, ax_acc, ax_lr) = new_figure(1, 3, figsize=(13, 3.6))
    for m, recs in groups.items():
        color = METHOD_COLORS[m]
        steps = recs[0].eval_steps
        plot_band(ax_loss, steps, [r.train_eval_loss for r in recs], METHOD_LABELS[m], color)
        plot_band(ax_acc, steps, [r.test_acc for r in recs], METHOD_LABELS[m], color)
        plot_band(
            ax_lr, np.arange(config.steps), [r.lr_applied for r in recs], METHOD_LABELS[m], color
        )
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss (full train set)")
    ax_acc.set_title("test accuracy")
    ax_acc.set_ylim(0, 1)
    ax_lr.set_yscale("log")
    ax_lr.set_title("effective learning rate (LR × scale)")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("step")
    ax_loss.legend(fontsize=7)
    return save_figure(
        fig,
        out_dir,
        "fig11_transformer.png",
        "Fig. 11: adaptive vs fixed learning rates (median and IQR over seeds)",
    )


def _plot_radii(config, recs, out_dir) -> dict:
    fig, (ax, ax_b) = new_figure(1, 2, figsize=(10, 3.6))
    steps = np.arange(config.steps)
    colors = {"out": "#d4a017", "attn": "#2c7fb8", "ffn": "#27ae60"}
    for k in RADII:
        plot_band(ax, steps, [r.radii[k] for r in recs], f"ρ_{k}", colors[k])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("radius (parameter distance)")
    ax.set_title("all-radii run: the three radii")
    ax.legend(fontsize=8)
    logged = logged_steps(config.steps, config.log_every)
    for k in RADII:
        share = [np.mean([r.binding[s] == k for r in recs]) for s in logged]
        ax_b.plot(logged, share, label=RADIUS_LABELS[k], color=colors[k])
    ax_b.set_ylim(-0.05, 1.05)
    ax_b.set_xlabel("step")
    ax_b.set_ylabel("share of seeds")
    ax_b.set_title("which radius binds (logged steps)")
    ax_b.legend(fontsize=8)
    return save_figure(
        fig,
        out_dir,
        "radii_binding.png",
        "All-radii controller: rho_out, rho_attn, rho_ffn over training and the binding radius",
    )

"""The lmstability experiment: LR sensitivity, qk-layernorm, the quick preset."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from ghoststep_lab import lmjudge, lmpilot
from ghoststep_lab import lmstability as ls
from ghoststep_lab.common.lmrecipes import (
    HeadRadiusClip,
    QKClip,
    head_max_logits,
    hidden_matrices,
    muon_adamw,
)
from ghoststep_lab.common.runner import run_experiment


def test_lr_sensitivity_and_stable_range():
    curve = {1e-3: 5.0, 3e-3: 4.0, 1e-2: 4.05, 3e-2: 4.5, 1e-1: 4.08, 3e-1: 6.0}
    out = ls.lr_sensitivity(curve)
    assert out["best"] == 4.0 and out["best_lr"] == 3e-3
    assert out["sensitivity"] == pytest.approx(sum(curve.values()) / 6 - 4.0)
    # widest contiguous run within 0.1 of the best: 3e-3..1e-2 (1e-1 alone is narrower)
    assert ls.stable_range(curve, 0.1) == (3e-3, 1e-2)
    assert ls.stable_range({1e-3: 1.0}, 0.1) == (1e-3, 1e-3)
    diverged = {"final_val": math.nan, "initial_val": 7.6}
    assert ls.capped_loss(diverged) == 7.6
    assert ls.capped_loss({"final_val": 9.0, "initial_val": 7.6}) == 7.6


def test_qk_layernorm_bounds_attention_logits():
    cfg = ls.Config(vocab_size=50, d_model=16, n_layers=1, n_heads=2, seq_len=8)
    torch.manual_seed(0)
    plain, normed = ls.build_lm(cfg, False), ls.build_lm(cfg, True)
    assert isinstance(normed.blocks[0].attn, ls.QKNormAttention)
    with torch.no_grad():  # blow up the query / key weights: only the plain model follows
        for m in (plain, normed):
            m.blocks[0].attn.qkv.weight.mul_(100.0)
    x = torch.randint(0, 50, (2, 8))
    big = [
        ls.max_attention_logit(m(x, return_internals=True)[1]["attention_logits"])
        for m in (plain, normed)
    ]
    d_head = cfg.d_model // cfg.n_heads
    assert big[1] <= math.sqrt(d_head) + 1e-4  # |q.k| <= |q||k| = d_head with unit gains
    assert big[0] > 10 * big[1]
    scores = [torch.tensor([[0.0, -math.inf], [3.0, -5.0]])]
    assert ls.max_attention_logit(scores) == 5.0


@pytest.mark.slow
def test_lmstability_quick_preset(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = run_experiment(
            "lmstability",
            "quick",
            out=tmp_path / "run",
            progress=False,
            overrides={"cache_dir": str(tmp_path / "cache")},
        )
    res = out.results
    for name in (
        "lmstability_lr_curves.png",
        "lmstability_attention.png",
        "lmstability_binding.png",
        "lmstability_output_logits.png",
    ):
        assert (tmp_path / "run" / name).exists()
    n_claims = len(ls.CLAIMS) + len(lmjudge.JUDGED_CLAIMS) + len(lmjudge.EARLY_WARNING_CLAIMS)
    assert len(res["claims"]) == n_claims
    assert (tmp_path / "run" / "lmstability_early_warning.png").exists()
    assert res["tables"][0]["title"].startswith("Judging")
    assert res["tables"][1]["title"].startswith("Early warning")
    runs = res["metrics"]["runs"]
    cfg = ls.Config(**{**ls.Config().__dict__, **ls.PRESETS["quick"]})
    assert len(runs) == len(ls.METHODS) * len(cfg.lrs) * len(cfg.seeds)
    for rec in runs:
        assert rec["initial_val"] > 0 and rec["tokens_per_s"] > 0
        assert rec["log"] and all("max_attn" in e and "log_z" in e for e in rec["log"])
        if rec["method"] in ("adamw", "muon"):  # monitored: r along every applied update
            assert len(rec["controller"]) == cfg.steps
            assert all(row["scale"] == 1.0 for row in rec["controller"])
        assert len(rec["grad_norms"]) == cfg.steps
        if rec["method"] in ("ctrl_out", "ctrl_attn", "muon_ctrl", *ls.HEAD_CLIP):
            # clip mode: the applied step stays inside the radius that limits it
            assert all(row["r_after"] <= 1.0 + 1e-6 for row in rec["controller"])
    attn = [row for r in runs if r["method"] == "ctrl_attn" for row in r["controller"]]
    assert attn and all(set(row["radii"]) == {"out", "attn"} for row in attn)
    assert res["tables"][2]["title"].startswith("Post hoc")
    table = res["tables"][3]
    assert [row[0] for row in table["rows"]] == [ls.METHOD_LABELS[m] for m in ls.METHODS]


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_attention_controller_radii_equal_a_second_jvp(qk_layernorm):
    """The ``ctrl_attn`` controller reads the attention radius from its own JVP; on the
    experiment's model (plain and qk-layernorm) it equals ``internal_radii``'s second
    JVP along the same update, and so do the steps."""
    from ghoststep.controller import AllRadiiController, RadiusController, internal_radii

    cfg = ls.Config(vocab_size=300, d_model=16, n_layers=2, n_heads=2, seq_len=16)

    def run(make):
        torch.manual_seed(0)
        model = ls.build_lm(cfg, qk_layernorm)
        opt = make(model, torch.optim.AdamW(model.parameters(), lr=0.3, betas=(0.9, 0.95)))
        g = torch.Generator().manual_seed(1)
        radii = []
        for _ in range(3):
            tokens = torch.randint(0, cfg.vocab_size, (4, cfg.seq_len + 1), generator=g)
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), tokens[:, 1:].flatten()
            ).backward()
            opt.step()
            opt.zero_grad()
            radii.append(opt.last.radii)
        return radii, list(model.parameters())

    kw = dict(mode="clip", method="jvp", class_dim=-1, limit_by=("out", "attn"))
    one, p1 = run(lambda m, o: AllRadiiController(o, m, **kw))
    two, p2 = run(
        lambda m, o: RadiusController(
            o, m, extra_radii=lambda mod, x, u: internal_radii(mod, x, u), **kw
        )
    )
    for a, b in zip(one, two, strict=True):
        assert set(a) == {"out", "attn"}
        assert a["attn"] == pytest.approx(b["attn"], rel=1e-6)
        assert a["out"] == pytest.approx(b["out"], rel=1e-6)
    for p, q in zip(p1, p2, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_run_cache_resumes(tmp_path):
    """A run found in ``run_cache`` is loaded, not rerun (the paper preset in parts)."""
    cfg = ls.Config(**{**ls.PRESETS["quick"], "cache_dir": str(tmp_path / "cache")})
    cfg = dataclasses.replace(cfg, run_cache=str(tmp_path / "runs"))
    data = ls.prepare_data(cfg)
    args = ("adamw", 1e-3, 0, dataclasses.asdict(cfg), data["train"], data["val"])
    first = ls.stability_run(*args)
    again = ls.stability_run(*args)
    assert len(list((tmp_path / "runs").glob("*/adamw-monitored-lr0.001-seed0.json"))) == 1
    other = dataclasses.replace(cfg, steps=cfg.steps + 1)  # other settings: another key
    assert ls._cache_file(other, "adamw", 1e-3, 0) != ls._cache_file(cfg, "adamw", 1e-3, 0)
    assert again["final_val"] == first["final_val"] and again["seconds"] == first["seconds"]


def test_muon_split_and_qkclip():
    cfg = ls.Config(vocab_size=50, d_model=16, n_layers=2, n_heads=2, seq_len=8)
    torch.manual_seed(0)
    model = ls.build_lm(cfg, False)
    hidden, rest = hidden_matrices(model)
    assert all(p.ndim == 2 for p in hidden) and len(hidden) == 8  # qkv, out, ff_in, ff_out
    assert any(p is model.tok_emb.weight for p in rest)
    assert len(hidden) + len(rest) == len(list(model.parameters()))
    muon, adamw = muon_adamw(model, 1e-2, 0.0)
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    with torch.no_grad():  # head 1 of layer 0 far above tau, the rest below
        model.blocks[0].attn.qkv.weight[8:16].mul_(30.0)
        model.blocks[0].attn.qkv.weight[24:32].mul_(30.0)
    x = torch.randint(0, 50, (2, 8))
    model.record = True
    model(x)
    before = [m.clone() for m in head_max_logits(model.last_attention_logits)]
    tau = 0.5 * float(before[0][1])
    assert float(before[0][0]) < tau and all(float(m.max()) < tau for m in before[1:])
    clip = QKClip(tau)
    clip(model)
    assert clip.clipped == 1
    model(x)
    after = head_max_logits(model.last_attention_logits)
    assert float(after[0][1]) == pytest.approx(tau, rel=1e-4)  # logits scale by gamma
    assert torch.equal(after[0][0], before[0][0])  # the other head of the layer: untouched


def test_head_radius_clip_shortens_only_the_binding_heads_qk_rows():
    """Per-head radii against float64 central differences of the attention logits along
    the unit direction Delta / ||Delta|| (distances, like rho_a); the heads whose
    normalized step ||Delta|| / rho_h exceeds r* get only their query / key rows of the
    step shortened, by r* / (||Delta|| / rho_h); every other entry is applied unchanged."""
    cfg = ls.Config(vocab_size=50, d_model=16, n_layers=2, n_heads=2, seq_len=8)
    torch.manual_seed(0)
    model = ls.build_lm(cfg, False).double()
    x = torch.randint(0, 50, (3, 8))
    params = list(model.parameters())
    qkv = model.blocks[1].attn.qkv
    old = [p.detach().clone() for p in params]
    step = [torch.randn_like(p) * 0.05 for p in params]
    with torch.no_grad():  # head 0 of layer 1: a much larger query / key step
        step[next(i for i, p in enumerate(params) if p is qkv.weight)][0:8] *= 40.0
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in step))
    assert not 0.5 < norm < 2.0  # a radius off by a factor ||Delta|| would show

    def scores_at(t):  # at old + t Delta / ||Delta||
        with torch.no_grad():
            for p, o, d in zip(params, old, step):
                p.copy_(o + t * d / norm)
            return model(x, return_internals=True)[1]["attention_logits"]

    h = 1e-5
    up, down, at = scores_at(h), scores_at(-h), scores_at(0.0)
    reference = []  # rho_h, a distance along the unit direction
    for s_up, s_down, s in zip(up, down, at):
        masked = s == -math.inf
        tangent = ((s_up - s_down) / (2 * h)).masked_fill(masked, 0.0)
        hi = tangent.masked_fill(masked, -math.inf).amax(-1)
        lo = tangent.masked_fill(masked, math.inf).amin(-1)
        reference.append(math.pi / (hi - lo).amax(dim=(0, 2)))
    r_step = [norm / rho for rho in reference]  # each head's normalized step
    target_r = 0.5 * float(r_step[1][0])  # head (1, 0) binds, by a factor of 2
    assert all(float(r) < target_r for r in (r_step[0][0], r_step[0][1], r_step[1][1]))

    clip = HeadRadiusClip(target_r)
    clip.snapshot(model)
    with torch.no_grad():
        for p, o, d in zip(params, old, step):
            p.copy_(o + d)
    clip.clip(model, x)
    for got, want in zip(clip.last_rho, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    assert clip.shortened == 1
    gamma = target_r * float(clip.last_rho[1][0]) / norm  # the clip's own, to the last bit
    assert gamma == pytest.approx(0.5, rel=1e-6)
    for p, o, d in zip(params, old, step):
        expected = o + d
        if p is qkv.weight or p is qkv.bias:
            for rows in (slice(0, 8), slice(16, 24)):  # head 0's query rows, key rows
                expected[rows] = o[rows] + gamma * d[rows]
        torch.testing.assert_close(p.detach(), expected, rtol=0.0, atol=1e-12)
    with pytest.raises(RuntimeError, match="snapshot"):
        clip.clip(model, x)


def test_judging_and_early_warning_helpers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 5))
    lo, hi = lmjudge.paired_interval(a - 1.0, a, np.mean, 500, 0.95)
    assert lo == pytest.approx(-1.0) and hi == pytest.approx(-1.0)  # paired: noise cancels
    lo, hi = lmjudge.paired_interval(a + rng.normal(size=(4, 5)), a, np.mean, 500, 0.95)
    assert lo < hi
    assert lmjudge._verdict("win", "no loss") == "win"
    assert lmjudge._verdict("win", "loss") == "trade-off"
    assert lmjudge._verdict("tie", "loss") == "loss"
    assert lmjudge._verdict("tie", "win") == "tie"
    losses = [5.0, 4.0, 3.0, 3.0, 3.0, 3.5, 3.6, 3.6]
    assert lmjudge.degrade_step(losses, 2, 0.5) == 6  # mean(3.5, 3.6) >= 3.0 + 0.5
    assert lmjudge.degrade_step([3.0, 2.0, math.nan], 1, 0.5) == 2
    assert lmjudge.degrade_step([3.0, 2.0, 1.0], 1, 0.5) is None
    z = lmjudge.zscores([1.0, 1.1, 0.9, 1.0, 5.0], 0.97, 3)
    assert all(math.isnan(v) for v in z[:3]) and z[4] > 10
    assert lmjudge.first_crossing([0, 5, 10], [2.0, 0.5, 3.0], 1.0, 3) == 10


def test_pilot_quick(tmp_path, capsys):
    code = lmpilot.main(["--quick", "--cache", str(tmp_path / "runs"),
                         "--cache-dir", str(tmp_path / "cache"), "--candidates",
                         "+ 4 layers"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "Regime found:" in out and "Confirm (+ 4 layers" in out

"""The lm experiment: offline stdlib corpus, cached BPE tokenizers, the quick preset."""

from __future__ import annotations

import math
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ghoststep.radius import exact_radius, rho_bound
from ghoststep_lab import lm
from ghoststep_lab.common import text
from ghoststep_lab.common.runner import run_experiment


def _fake_stdlib(root: Path, n: int = 12) -> Path:
    for i in range(n):
        sub = root / ("pkg" if i % 3 == 0 else "") / f"mod_{i:02d}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_text(f"def f_{i}(x):\n    return x * {i} + len('{'ab' * i}')\n" * (i + 3))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third.py").write_text("import os\n")
    (root / "latin.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8: skipped
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_split_by_path_hash_is_stable_and_about_the_fraction():
    paths = [f"dir/file_{i}.py" for i in range(2000)]
    splits = [text.split_of(p, 0.1) for p in paths]
    assert splits == [text.split_of(p, 0.1) for p in paths]
    assert 0.07 < splits.count("val") / len(paths) < 0.13
    with pytest.raises(ValueError, match="val_fraction"):
        text.split_of("a.py", 1.0)


def test_corpus_deterministic_split_by_file_cached(tmp_path, no_network):
    root = _fake_stdlib(tmp_path / "lib")
    a = text.build_corpus(tmp_path / "c1", root=root, val_fraction=0.3)
    b = text.build_corpus(tmp_path / "c2", root=root, val_fraction=0.3)
    assert a.files == b.files
    assert (a.folder / "train.txt").read_bytes() == (b.folder / "train.txt").read_bytes()
    train, val = set(a.files["train"]), set(a.files["val"])
    assert train and val and not train & val  # every file wholly in one split
    assert all(text.split_of(p, 0.3) == "val" for p in val)
    everything = sorted(train | val)
    assert "site-packages/third.py" not in everything and "latin.py" not in everything
    assert len(everything) == 12
    # a file's text is in exactly its own split
    assert len(a.documents("train")) == len(train) and len(a.documents("val")) == len(val)
    one = sorted(val)[0]
    assert (root / one).read_text() in a.documents("val")
    assert (root / one).read_text() not in a.documents("train")
    # the cache is read back, not rebuilt (removing the library shows it)
    for p in root.rglob("*.py"):
        p.unlink()
    assert text.build_corpus(tmp_path / "c1", root=root, val_fraction=0.3).files == a.files


def test_tokenizer_trained_on_train_split_deterministic_cached(tmp_path, no_network):
    root = _fake_stdlib(tmp_path / "lib")
    corpus = text.build_corpus(tmp_path / "c", root=root, val_fraction=0.3)
    tok = text.train_tokenizer(corpus, 300)
    assert tok.get_vocab_size() <= 300
    again = text.train_tokenizer(text.build_corpus(tmp_path / "d", root=root, val_fraction=0.3),
                                 300)  # fmt: skip
    assert tok.to_str() == again.to_str()
    assert text.train_tokenizer(corpus, 300).to_str() == tok.to_str()  # from the cache
    byte = text.train_tokenizer(corpus, 256)
    assert byte.get_vocab_size() == 256  # the byte alphabet, no merges
    doc = corpus.documents("val")[0]
    ids = byte.encode(doc).ids
    assert len(ids) == len(doc.encode("utf-8"))
    assert byte.decode(ids) == doc and tok.decode(tok.encode(doc).ids) == doc
    train_ids = text.encode_split(corpus, tok, "train")
    assert train_ids.max() < 300 and np.array_equal(
        train_ids, text.encode_split(corpus, tok, "train")
    )
    with pytest.raises(ValueError, match="256"):
        text.train_tokenizer(corpus, 100)


def test_frequency_rank():
    ids = np.array([3, 3, 3, 1, 1, 0])
    assert text.token_frequency_rank(ids, 5).tolist() == [2, 1, 3, 0, 4]


def test_schedule_and_spikes():
    f = [lm.lr_factor_at(s, 100, 10, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[9:], f[10:]))
    losses = [5.0] * 10 + [7.0] + [5.0] * 5 + [float("nan")]
    assert lm.count_spikes(losses, 5, 1.25) == 2
    assert lm.count_spikes([5.0 - 0.01 * i for i in range(50)], 5, 1.25) == 0


def test_soft_cap_bounds_logits():
    model = torch.nn.Linear(3, 4)
    with torch.no_grad():
        model.weight.fill_(100.0)
    out = lm.SoftCapped(model, 30.0)(torch.ones(2, 3))
    assert out.abs().max() <= 30.0 and out.abs().max() > 29.0


def test_exact_radius_large_vocab_certified_and_matches_full_starts(monkeypatch):
    from ghoststep.radius import _ghosts as ghosts

    g = torch.Generator().manual_seed(1)
    z = 3 * torch.randn(2, 700, generator=g, dtype=torch.float64)
    a = torch.randn(2, 700, generator=g, dtype=torch.float64)
    z[:, :4] += 8
    reduced = exact_radius(z, a)  # 700 > _EDGE_CLASSES: reduced starts
    monkeypatch.setattr(ghosts, "_EDGE_CLASSES", 10**6)
    full = exact_radius(z, a)
    assert torch.isfinite(reduced).all()
    assert torch.allclose(reduced, full, rtol=1e-9)
    assert (reduced >= rho_bound(a)).all()


@pytest.mark.slow
def test_lm_quick_preset(tmp_path, no_network):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = run_experiment("lm", "quick", out=tmp_path / "lm", progress=False,
                             overrides={"cache_dir": str(tmp_path / "cache")})  # fmt: skip
    res = out.results
    assert (tmp_path / "lm" / "lm_r_vs_vocab.png").exists()
    assert len(res["claims"]) == 10
    per_v = res["metrics"]["per_vocab"]
    assert set(per_v) == {"256", "300"}
    for s in per_v.values():
        assert s["exact_certified"] >= 1 and s["exact_ratio_min"] >= 1 - 1e-6  # rho* >= rho_a
        assert 0 < s["r_median"] < math.inf
    runs = res["metrics"]["runs"]
    assert {(r["method"], r["lr_factor"]) for r in runs} >= {("adamw", 30.0), ("softcap", 1.0)}
    monitor = [r for r in runs if r["method"] == "monitor"]
    for rec in monitor:  # r is ||p|| / rho_a of the applied update; rho_q >= rho_a
        for m in rec["monitor"]:
            assert m["r"] == pytest.approx(m["tau"] / m["rho_a"], rel=1e-9)
            assert m["q_over_max"] >= 1.0
        for e in rec["exact"]:  # the exact sample's rho_a (step units) is 1 / r there
            step = rec["monitor"][e["step"]]
            assert e["rho_a"][0] == pytest.approx(1.0 / step["r"], rel=1e-3)

"""Data loaders: digits split (stratified, deterministic), CIFAR-10 pickle reader."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ghoststep_lab.common.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    fake_cifar10,
    load_cifar10,
    load_digits_split,
    minibatches,
    sample_batch,
)


def test_digits_split_shapes_and_scaling():
    X_tr, y_tr, X_te, y_te = load_digits_split(seed=0)
    assert X_tr.shape == (1437, 64) and X_te.shape == (360, 64)
    assert X_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(X_tr.min()) >= 0.0 and float(X_tr.max()) <= 1.0
    assert float(X_tr.max()) == 1.0  # features divided by 16, the maximum pixel value


def test_digits_split_is_stratified():
    split = load_digits_split(seed=3)
    all_counts = torch.bincount(torch.cat([split.y_train, split.y_test]), minlength=10)
    test_counts = torch.bincount(split.y_test, minlength=10)
    # each class keeps its share in the test set up to rounding
    expected = all_counts.double() * 0.2
    assert torch.all((test_counts.double() - expected).abs() <= 1.0)


def test_digits_split_deterministic_and_seed_dependent():
    a, b = load_digits_split(seed=0), load_digits_split(seed=0)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = load_digits_split(seed=1)
    assert not torch.equal(a.y_test, c.y_test)


def _write_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, size=n)]
    with open(path, "wb") as fh:
        pickle.dump(
            {b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"f"] * n}, fh
        )
    return data, labels


@pytest.mark.parametrize("nested", [False, True])
def test_load_cifar10_reads_pickle_batches(tmp_path, nested):
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    folder.mkdir(exist_ok=True)
    written = [_write_batch(folder / f"data_batch_{i}", 3, i) for i in range(1, 6)]
    test_data, test_labels = _write_batch(folder / "test_batch", 4, 99)

    X, y = load_cifar10(tmp_path, train=True)
    assert X.shape == (15, 3, 32, 32) and X.dtype == torch.float32
    assert y.tolist() == sum((labels for _, labels in written), [])

    Xt, yt = load_cifar10(tmp_path, train=False)
    assert Xt.shape == (4, 3, 32, 32) and yt.tolist() == test_labels
    # pixel (channel 1, row 2, col 5) of image 0: CIFAR stores R plane, G plane, B plane
    raw = test_data[0, 1024 + 2 * 32 + 5] / 255.0
    expected = (raw - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    assert float(Xt[0, 1, 2, 5]) == pytest.approx(expected, abs=1e-5)


def test_load_cifar10_missing_files_names_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch|test_batch"):
        load_cifar10(tmp_path, train=False)
    with pytest.raises(FileNotFoundError, match="data_batch_5"):
        load_cifar10(tmp_path, train=True)


def test_fake_cifar10_shapes_and_determinism():
    X, y = fake_cifar10(50, seed=1)
    X2, y2 = fake_cifar10(50, seed=1)
    assert X.shape == (50, 3, 32, 32) and y.shape == (50,)
    assert torch.equal(X, X2) and torch.equal(y, y2)
    assert set(y.tolist()) == set(range(10))


def test_minibatches_cover_epoch_and_are_seeded():
    X = torch.arange(10).float().unsqueeze(1)
    y = torch.arange(10)
    batches = list(minibatches(X, y, 4, seed=0))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == list(range(10))
    again = list(minibatches(X, y, 4, seed=0))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert [len(b[1]) for b in minibatches(X, y, 4, seed=0, drop_last=True)] == [4, 4]
    xb, yb = sample_batch(X, y, 3, torch.Generator().manual_seed(0))
    assert torch.equal(xb.squeeze(1).long(), yb)
    with pytest.raises(ValueError):
        next(minibatches(X, y, 0))

"""Data sets for the experiments: sklearn digits (offline), a synthetic token language
(generated), and CIFAR-10 (from disk).

Nothing here downloads anything. Digits ships inside scikit-learn; the language is a
seeded random Markov chain; CIFAR-10 must
already be on disk in its standard python-pickle format (``data_batch_1`` ..
``data_batch_5``, ``test_batch``), e.g. extracted from ``cifar-10-python.tar.gz``.

Example:
    >>> from ghoststep_lab.common.data import load_digits_split, minibatches
    >>> X_train, y_train, X_test, y_test = load_digits_split(seed=0)
    >>> X_train.shape, X_test.shape
    (torch.Size([1437, 64]), torch.Size([360, 64]))
    >>> xb, yb = next(minibatches(X_train, y_train, batch_size=32, seed=0))
    >>> xb.shape
    torch.Size([32, 64])
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10_TEST_FILES",
    "Split",
    "load_digits_split",
    "digits",
    "markov_language",
    "load_cifar10",
    "fake_cifar10",
    "normalize_cifar",
    "minibatches",
    "sample_batch",
]

# Standard per-channel statistics of the CIFAR-10 training set (pixels in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)


class Split(NamedTuple):
    """Train/test tensors; unpacks like a plain 4-tuple."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, test_size: float = 0.2) -> Split:
    """sklearn digits (1797 8x8 images, 10 classes), features/16, stratified split.

    Args:
        seed: ``random_state`` of ``train_test_split``; the same seed gives the same split.
        test_size: fraction held out for testing (paper: 0.2).

    Returns:
        ``Split(X_train, y_train, X_test, y_test)``: float32 ``(N, 64)`` features in [0, 1]
        and int64 ``(N,)`` labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=test_size, stratify=y, random_state=seed
    )
    return Split(
        torch.from_numpy(X_tr),
        torch.from_numpy(y_tr),
        torch.from_numpy(X_te),
        torch.from_numpy(y_te),
    )


@functools.lru_cache(maxsize=4)
def _cached_digits(seed: int) -> Split:
    return load_digits_split(seed)


def digits(seed: int = 0) -> Split:
    """:func:`load_digits_split` cached per ``seed``: every run of a process shares one
    copy, so treat the tensors as read-only."""
    return _cached_digits(int(seed))


def _markov_tokens(rng: np.random.Generator, table: np.ndarray, n: int, length: int):
    vocab, order = table.shape[-1], table.ndim - 1
    seqs = np.empty((n, length), dtype=np.int64)
    seqs[:, :order] = rng.integers(0, vocab, size=(n, order))
    cdf = np.cumsum(table, axis=-1)
    for t in range(order, length):
        rows = cdf[tuple(seqs[:, t - order + i] for i in range(order))]  # (n, vocab)
        u = rng.random((n, 1))
        seqs[:, t] = np.minimum((rows < u).sum(axis=1), vocab - 1)
    return torch.from_numpy(seqs)


@functools.lru_cache(maxsize=4)
def markov_language(
    seed: int = 0,
    vocab: int = 32,
    order: int = 2,
    seq_len: int = 32,
    n_train: int = 2048,
    n_test: int = 256,
    concentration: float = 0.1,
) -> Split:
    """A synthetic language for the TinyLM: token sequences of a random Markov chain.

    Each context of the ``order`` previous tokens has its own next-token distribution,
    drawn once from a symmetric Dirichlet(``concentration``) (small: few likely
    successors, so the language is learnable and has a loss floor well below
    log(vocab)). The first ``order`` tokens of a sequence are uniform. Cached per
    argument set: treat the tensors as read-only.

    Returns:
        ``Split``: ``X`` int64 ``(N, seq_len)`` input tokens and ``y`` int64
        ``(N, seq_len)`` the next tokens (``y[:, t] = sequence[t + 1]``).
    """
    if order < 1 or vocab < 2 or seq_len <= order or concentration <= 0:
        raise ValueError("need order >= 1, vocab >= 2, seq_len > order, concentration > 0")
    rng = np.random.default_rng(seed)
    table = rng.dirichlet(np.full(vocab, concentration), size=(vocab,) * order)
    train = _markov_tokens(rng, table, n_train, seq_len + 1)
    test = _markov_tokens(rng, table, n_test, seq_len + 1)
    return Split(train[:, :-1], train[:, 1:], test[:, :-1], test[:, 1:])


def _find_cifar_dir(data_dir: str | Path, names: tuple[str, ...]) -> Path:
    base = Path(data_dir).expanduser()
    candidates = [base, base / "cifar-10-batches-py"]
    for cand in candidates:
        if all((cand / name).is_file() for name in names):
            return cand
    expected = ", ".join(names)
    looked = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"CIFAR-10 batches not found: expected the python-pickle files {expected} in {looked}. "
        "Extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) there; "
        "ghoststep never downloads data."
    )


def normalize_cifar(images_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``(N, 3072)`` or ``(N, 3, 32, 32)`` uint8 pixels -> normalized float32 ``(N, 3, 32, 32)``."""
    x = torch.as_tensor(np.asarray(images_uint8)).reshape(-1, 3, 32, 32).to(torch.float32) / 255.0
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_cifar10(data_dir: str | Path, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 from its standard python-pickle batches.

    Args:
        data_dir: folder holding ``data_batch_1..5`` and ``test_batch``, or its parent
            (the files inside ``data_dir/cifar-10-batches-py``).
        train: the five training batches (50 000 images) if True, else ``test_batch``.

    Returns:
        ``(images, labels)``: float32 ``(N, 3, 32, 32)`` normalized with the standard
        CIFAR-10 channel mean/std, and int64 ``(N,)`` labels.

    Raises:
        FileNotFoundError: naming the expected files when they are missing.
    """
    names = CIFAR10_TRAIN_FILES if train else CIFAR10_TEST_FILES
    folder = _find_cifar_dir(data_dir, names)
    chunks, labels = [], []
    for name in names:
        with open(folder / name, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labs = batch.get(b"labels", batch.get("labels"))
        if data is None or labs is None:
            raise ValueError(f"{folder / name}: not a CIFAR-10 batch (no b'data'/b'labels')")
        chunks.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3072))
        labels.append(np.asarray(labs, dtype=np.int64))
    images = normalize_cifar(np.concatenate(chunks))
    return images, torch.from_numpy(np.concatenate(labels))


def fake_cifar10(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random CIFAR-shaped data for smoke tests: normalized ``(n, 3, 32, 32)`` and labels.

    Labels are balanced over the 10 classes (before shuffling) so accuracy at chance is 10%.
    """
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    return normalize_cifar(pixels.numpy()), labels


def minibatches(
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(xb, yb)`` minibatches, shuffled by a seeded generator.

    Pass either ``seed`` (fresh generator) or ``generator`` (continue a stream across
    epochs); neither gives the global RNG's order.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = X.shape[0]
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield X[idx], y[idx]


def sample_batch(
    X: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random minibatch without replacement (the whole set if ``batch_size >= N``)."""
    n = X.shape[0]
    if batch_size >= n:
        return X, y
    idx = torch.randperm(n, generator=generator)[:batch_size]
    return X[idx], y[idx]

"""Offline text for language-model experiments: the Python standard library's own source.

Every Python installation ships its standard library as ``.py`` files (found with
``sysconfig.get_paths()["stdlib"]``): real, varied text, present on every machine, no
download. :func:`build_corpus` reads them in sorted order (``site-packages`` and
undecodable files left out), splits them by file into train / validation with a hash
of the relative path (a file is wholly in one split, and the split of a file does not
depend on which other files exist), and caches both splits. :func:`train_tokenizer`
trains a byte-level BPE tokenizer (Hugging Face ``tokenizers``) on the training split
and caches it as JSON; :func:`encode_split` caches the token ids as ``.npy``.

Nothing here opens a network connection.

Example:
    >>> from ghoststep_lab.common.text import build_corpus, train_tokenizer, encode_split
    >>> corpus = build_corpus("/tmp/gs-cache", max_files=40)            # doctest: +SKIP
    >>> tok = train_tokenizer(corpus, 512)                              # doctest: +SKIP
    >>> ids = encode_split(corpus, tok, "train")  # (n_tokens,) uint16  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_CACHE",
    "Corpus",
    "stdlib_files",
    "split_of",
    "build_corpus",
    "train_tokenizer",
    "encode_split",
    "token_frequency_rank",
]

DEFAULT_CACHE = Path.home() / ".cache" / "ghoststep" / "lm"
FILE_SEPARATOR = "\n\n"  # between concatenated files (no special tokens: V stays as asked)


def _say(message: str) -> None:
    print(f"[ghoststep lm] {message}", file=sys.stderr, flush=True)


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files under the standard library ``root`` (default: this Python's),
    sorted by relative path, ``site-packages`` / ``dist-packages`` left out."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library folder {root} does not exist")
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if p.is_file() and not skip & set(p.parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(relative_path: str, val_fraction: float) -> str:
    """``"val"`` or ``"train"``: the first 8 bytes of sha256(path) as a number in [0, 1)
    below ``val_fraction`` go to validation. Depends on the path alone."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction else "train"


@dataclass(frozen=True)
class Corpus:
    """A built corpus on disk: ``folder`` holds ``train.txt``, ``val.txt``, ``manifest.json``."""

    folder: Path
    files: dict[str, list[str]]  # split -> relative paths, in corpus order

    def text(self, split: str) -> str:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return (self.folder / f"{split}.txt").read_text(encoding="utf-8")

    def documents(self, split: str) -> list[str]:
        """The split's files' texts, in corpus order."""
        return self.text(split).split("\x00")


def _corpus_key(root: Path, max_files: int, val_fraction: float) -> str:
    ident = f"{root.resolve()}|{sys.version_info[:3]}|{max_files}|{val_fraction!r}"
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def build_corpus(
    cache_dir: str | Path | None = None,
    *,
    root: str | Path | None = None,
    max_files: int = 0,
    val_fraction: float = 0.1,
) -> Corpus:
    """Read, split and cache the standard-library corpus (or load it from the cache).

    Args:
        cache_dir: cache folder (default ``~/.cache/ghoststep/lm``).
        root: the library folder (default: this Python's standard library).
        max_files: keep the first ``max_files`` files in sorted order (0: all).
        val_fraction: expected share of files in the validation split.
    Returns:
        :class:`Corpus`; files that are not UTF-8 are skipped (listed in the manifest).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    folder = (
        Path(cache_dir or DEFAULT_CACHE) / f"corpus-{_corpus_key(root, max_files, val_fraction)}"
    )
    manifest = folder / "manifest.json"
    if manifest.exists():
        return Corpus(folder, json.loads(manifest.read_text())["files"])
    files = stdlib_files(root)
    if max_files:
        files = files[:max_files]
    _say(f"building the corpus from {len(files)} files under {root} into {folder}")
    texts: dict[str, list[str]] = {"train": [], "val": []}
    names: dict[str, list[str]] = {"train": [], "val": []}
    skipped = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped.append(rel)
            continue
        split = split_of(rel, val_fraction)
        texts[split].append(text.replace("\x00", ""))
        names[split].append(rel)
    if not names["train"] or not names["val"]:
        raise ValueError(f"{len(files)} files give an empty split; use more files")
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):  # documents separated by NUL in the cache file
        (folder / f"{split}.txt").write_text("\x00".join(texts[split]), encoding="utf-8")
    info = {"root": str(root), "python": sys.version, "val_fraction": val_fraction,
            "files": names, "skipped": skipped}  # fmt: skip
    manifest.write_text(json.dumps(info, indent=1))  # written last: marks a complete build
    return Corpus(folder, names)


def _tokenizer_path(corpus: Corpus, vocab_size: int, max_chars: int) -> Path:
    return corpus.folder / f"bpe-{vocab_size}-{max_chars}.json"


def train_tokenizer(corpus: Corpus, vocab_size: int, *, max_chars: int = 0):
    """Byte-level BPE tokenizer with at most ``vocab_size`` tokens, trained on the
    training split (its first ``max_chars`` characters, whole files; 0: all), cached.

    ``vocab_size = 256`` is the byte alphabet alone (no merges). Returns a
    ``tokenizers.Tokenizer``; its vocabulary can be smaller than asked when the text
    runs out of pairs to merge.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
    path = _tokenizer_path(corpus, vocab_size, max_chars)
    if path.exists():
        return Tokenizer.from_file(str(path))
    docs = corpus.documents("train")
    if max_chars:
        kept, total = [], 0
        for doc in docs:
            if total >= max_chars:
                break
            kept.append(doc)
            total += len(doc)
        docs = kept
    _say(f"training a {vocab_size}-token BPE tokenizer on {sum(map(len, docs))} characters")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok


def encode_split(corpus: Corpus, tokenizer, split: str, tag: str | None = None) -> np.ndarray:
    """Token ids of a whole split, files joined by a blank line: (n_tokens,) int64.

    Cached as ``<split>-<tag>.npy`` (``tag`` defaults to a hash of the tokenizer).
    """
    tag = tag or hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:12]
    path = corpus.folder / f"{split}-{tag}.npy"
    if path.exists():
        return np.load(path).astype(np.int64)
    _say(f"tokenizing the {split} split ({tokenizer.get_vocab_size()} tokens)")
    docs = corpus.documents(split)
    sep = tokenizer.encode(FILE_SEPARATOR).ids
    ids: list[int] = []
    for enc in tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.extend(sep)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    arr = np.asarray(ids, dtype=dtype)
    np.save(path, arr)
    return arr.astype(np.int64)


def token_frequency_rank(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """Rank of every token id by its count in ``ids``: (vocab_size,) int64, 0 = most
    frequent; ties (and unseen ids, all at the end) broken by id."""
    counts = np.bincount(ids, minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))
    rank = np.empty(vocab_size, dtype=np.int64)
    rank[order] = np.arange(vocab_size)
    return rank

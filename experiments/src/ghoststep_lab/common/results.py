"""What an experiment returns: typed :class:`Results` and their strict-JSON form.

An experiment's ``run`` returns a :class:`Results` (or the equivalent plain dict, as
read back from ``results.json``); :func:`validate_results` turns either into a
:class:`Results`, listing every way a dict breaks the schema in one
:class:`ResultsError`. ``Results.to_dict`` gives the ``results.json`` layout::

    {"title": str, "summary": str, "claims": [{"claim", "paper", "ours", "reproduced",
     "note"?}], "figures": [{"file", "caption"?}], "tables": [{"title", "columns",
     "rows"}], "metrics": {...}, "notes": [str], "meta": {...}, "config": {...}}

Claims are declared as data: a tuple of :class:`ClaimRule` (the claim's text, the
paper's value, what we measure, when it counts as reproduced, how ours is shown, the
note when it is not) evaluated by :func:`evaluate_claims`.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

__all__ = [
    "CONFIG_FILE",
    "RESULTS_FILE",
    "REPORT_FILE",
    "ResultsError",
    "Claim",
    "ClaimRule",
    "evaluate_claims",
    "Figure",
    "Table",
    "Results",
    "validate_results",
    "results_problems",
    "to_jsonable",
    "write_json",
    "results_file",
    "read_json",
]

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"

Scalar = str | float  # a table cell or claim value: ints are floats here (PEP 484)


class ResultsError(ValueError):
    """``run`` returned results that break the schema."""


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (str, int, float)) and not isinstance(x, bool)


@dataclass
class Claim:
    """One row of the claims table: the paper's value beside ours.

    ``note`` says how or why ours differs (required in spirit when not reproduced).
    ``reproduced`` accepts numpy booleans (``np.float64 >= x``) and stores a ``bool``.
    """

    claim: str
    paper: Scalar
    ours: Scalar
    reproduced: bool
    note: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.reproduced, np.bool_):
            self.reproduced = bool(self.reproduced)
        self.note = self.note or None  # "" and None both mean: no note

    def problems(self) -> list[str]:
        out = []
        if not (isinstance(self.claim, str) and self.claim.strip()):
            out.append("claim must be a non-empty string")
        out += [
            f"{k} must be a string or a number"
            for k in ("paper", "ours")
            if not _is_scalar(getattr(self, k))
        ]
        if not isinstance(self.reproduced, bool):
            out.append("reproduced must be a bool")
        if not isinstance(self.note, (str, type(None))):
            out.append("note must be a string")
        return out


@dataclass(frozen=True)
class ClaimRule:
    """One claim declared as data; :func:`evaluate_claims` turns it into a :class:`Claim`.

    The callables take the measured value ``v`` (what ``measure`` returned) and the
    context ``x`` (a namespace of the keywords given to :func:`evaluate_claims`):

    Attributes:
        text: the claim, a ``str.format`` template over the context's names
            (``"... >= {c.unharmed_acc:.0%}"``), or ``x -> str``.
        paper: the paper's value (a string or a number), or ``x -> value``.
        measure: ``x -> v``; ``None`` means the runs the claim needs are missing and
            the claim is left out.
        holds: ``(v, x) -> bool``: reproduced.
        ours: ``(v, x) -> str | float``: our value as shown.
        note: ``(v, x) -> str | None``, the note of a claim that is not reproduced
            (or of every claim with ``always_note``).
        always_note: attach ``note`` whatever the outcome.

    Example:
        >>> rule = ClaimRule(
        ...     "accuracy >= {target:.0%}", "90%", lambda x: x.acc,
        ...     holds=lambda v, x: v >= x.target, ours=lambda v, x: f"{v:.1%}",
        ... )
        >>> evaluate_claims([rule], acc=0.95, target=0.9)[0].reproduced
        True
    """

    text: str | Callable[[Any], str]
    paper: Scalar | Callable[[Any], Scalar]
    measure: Callable[[Any], Any]
    holds: Callable[[Any, Any], bool]
    ours: Callable[[Any, Any], Scalar]
    note: Callable[[Any, Any], str | None] | None = None
    always_note: bool = False


def evaluate_claims(
    rules: Iterable[ClaimRule], *, untested: str | None = None, **context: Any
) -> list[Claim]:
    """The :class:`Claim` of every rule whose measurement is there, in the rules' order.

    ``context``: the names the rules read (``x.name``) and their texts format.
    ``untested``: a reason the claims are not tested (e.g. a smoke test on fake data):
    every claim is then not reproduced, with this note.
    """
    x = _Context(**context)
    claims = []
    for rule in rules:
        v = rule.measure(x)
        if v is None:
            continue
        ok = rule.holds(v, x)
        note = rule.note(v, x) if rule.note is not None and (rule.always_note or not ok) else None
        paper = rule.paper(x) if callable(rule.paper) else rule.paper
        if untested:
            ok, note = False, untested
        text = rule.text(x) if callable(rule.text) else rule.text.format(**context)
        claims.append(Claim(text, paper, rule.ours(v, x), ok, note))
    return claims


class _Context:
    def __init__(self, **names: Any) -> None:
        self.__dict__.update(names)


@dataclass
class Figure:
    """A PNG in the run folder (``file`` relative to it) and its caption."""

    file: str
    caption: str = ""

    def problems(self) -> list[str]:
        return [] if isinstance(self.file, str) else ["file must be a string"]


@dataclass
class Table:
    """A report table: ``rows`` is a list of rows, each one cell per column."""

    columns: list[str]
    rows: list[list[Any]]
    title: str = "Table"

    def problems(self) -> list[str]:
        if isinstance(self.columns, list) and isinstance(self.rows, list):
            return []
        return ["must have 'columns' and 'rows' lists"]


@dataclass
class Results:
    """An experiment's outcome; ``meta`` and ``config`` are filled in by the runner."""

    claims: list[Claim]
    title: str | None = None
    summary: str | None = None
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def n_reproduced(self) -> int:
        return sum(c.reproduced for c in self.claims)

    def to_dict(self) -> dict:
        """The ``results.json`` layout as a dict (None title/summary/note left out; values
        as given: :func:`write_json` makes them strict JSON)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        out["claims"] = [{k: v for k, v in c.items() if v is not None} for c in out["claims"]]
        out["figures"] = [{k: v for k, v in f.items() if v} for f in out["figures"]]
        return out


# ----------------------------------------------------------------------------- parsing


def _parse_item(cls: type, data: Any, where: str, problems: list[str]):
    """``cls(**data)`` for a dict (or ``data`` itself if already a ``cls``); the
    dataclass's own ``problems()`` and missing keys are appended to ``problems``."""
    if isinstance(data, Mapping):
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in data]
        problems += [f"{where} missing key {k!r}" for k in missing]
        if missing:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        data = cls(**{k: v for k, v in data.items() if k in names})
    if not isinstance(data, cls):
        problems.append(f"{where} must be a dict")
        return None
    problems += [
        f"{where}: {p}" if p.startswith("must") else f"{where}.{p}" for p in data.problems()
    ]
    return data


def _origin(hint: Any) -> type:
    """The runtime class of a field annotation (``list[Claim]`` -> list, ``str | None`` -> str)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) not in (list, dict) and args:  # a union
        return _origin(args[0])
    return typing.get_origin(hint) or hint


_ITEMS = {"claims": Claim, "figures": Figure, "tables": Table}


def _parse(data: Any) -> tuple[Results | None, list[str]]:
    if isinstance(data, Results):
        data = dataclasses.asdict(data)
    if not isinstance(data, Mapping):
        return None, [f"results must be a dict, got {type(data).__name__}"]
    problems: list[str] = []
    if "claims" not in data:
        problems.append("missing required key 'claims'")
    values = {}
    for name, hint in typing.get_type_hints(Results).items():
        if data.get(name) is None:
            continue
        value = data[name]
        if not isinstance(value, _origin(hint)):
            article = "a list" if _origin(hint) is list else f"a {_origin(hint).__name__}"
            problems.append(f"{name!r} must be {article}")
            continue
        if name in _ITEMS:
            # a figure may be given by its file name alone
            value = [{"file": v} if name == "figures" and isinstance(v, str) else v for v in value]
            value = [
                _parse_item(_ITEMS[name], v, f"{name}[{i}]", problems) for i, v in enumerate(value)
            ]
        if name == "notes":
            problems += [
                f"notes[{i}] must be a string"
                for i, n in enumerate(value)
                if not isinstance(n, str)
            ]
        values[name] = value
    if problems:
        return None, problems
    results = Results(**values)
    try:
        json.dumps(to_jsonable(results.to_dict()), allow_nan=False)
    except (TypeError, ValueError) as exc:
        return None, [f"results are not JSON-serializable: {exc}"]
    return results, []


def results_problems(results: Any) -> list[str]:
    """Every way ``results`` (a :class:`Results` or dict) breaks the schema; [] when valid."""
    return _parse(results)[1]


def validate_results(results: Any) -> Results:
    """``results`` as :class:`Results`; raise :class:`ResultsError` listing every problem."""
    parsed, problems = _parse(results)
    if problems:
        raise ResultsError("invalid experiment results:\n  " + "\n  ".join(problems))
    return parsed


# ----------------------------------------------------------------------------- JSON


def _json_leaf(x: Any) -> Any:
    if isinstance(x, (torch.Tensor, np.ndarray, np.generic)):
        return to_jsonable(x.tolist())  # nested lists of Python scalars
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return to_jsonable(dataclasses.asdict(x))
    return x


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON copy: tensors/arrays to lists, paths to str, non-finite floats to str."""
    return tree_map(_json_leaf, obj)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (see :func:`to_jsonable` for conversions)."""
    path = Path(path)
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def read_json(path: str | Path) -> Any:
    """JSON from ``path``; a ``.gz`` path is read through gzip."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    return json.loads(path.read_text(encoding="utf-8"))


def results_file(run_dir: str | Path) -> Path | None:
    """A run folder's ``results.json``, or its gzip ``results.json.gz`` (how the
    largest stored runs are kept); None if it has neither."""
    for name in (RESULTS_FILE, RESULTS_FILE + ".gz"):
        path = Path(run_dir) / name
        if path.is_file():
            return path
    return None

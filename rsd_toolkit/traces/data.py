"""Problems in: a hub dataset name (online users) or a local JSONL / JSON / Parquet / CSV file."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

from ..checks import InputError, InputWarning, text_lines
from .answers import last_boxed

QUESTION_FIELDS = ("question", "problem", "prompt", "input")
ANSWER_FIELDS = ("solution", "answer", "final_answer", "target", "output")  # s1K-1.1 first, then common schemas


class DataError(InputError):
    """The dataset cannot be used as given; the message names the file, line or field."""


@dataclass
class Problem:
    index: int  # position in the (unsharded) dataset: fixes order and seeds
    id: str
    question: str
    answer: str  # reference final answer (a solution's last \boxed{} when it has one)


def read_jsonl(path: str) -> list[dict]:
    """The objects of a JSONL file; a last line cut off mid-write (no newline, not JSON) is skipped with an
    InputWarning, any other bad line is a DataError naming it."""
    rows = []
    for n, line, complete in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if not complete:
                warnings.warn(f"{path} line {n}: the last line is cut off (a run still writing, or killed "
                              "mid-write); it is ignored", InputWarning, stacklevel=2)  # fmt: skip
                break
            raise DataError(f"{path} line {n}: invalid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def as_text(value, where: str) -> str:
    """A field that must hold text: numbers become text, anything else (lists, objects, null) is a DataError."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    what = "empty (null)" if value is None else f"a {type(value).__name__}"
    raise DataError(f"{where} is {what}, expected text")


def load_rows(source: str, split: str = "train", name: str | None = None) -> list[dict]:
    """Rows of a local file (by extension), a fetched benchmark (``asset:math500``) or a hub dataset (``name``: its
    config, e.g. gsm8k's "main")."""
    if source.startswith("asset:"):
        from ..assets import BENCHMARKS, AssetError, asset_path

        if source[len("asset:") :] not in BENCHMARKS:
            raise DataError(f"{source} is not a problem set; problem assets: {', '.join('asset:' + b for b in BENCHMARKS)}")
        try:
            source = str(asset_path(source[len("asset:") :]))
        except AssetError as e:
            raise DataError(str(e)) from None
    if not os.path.exists(source) and os.path.splitext(source)[1].lower() in (".jsonl", ".json", ".parquet", ".csv"):
        raise DataError(f"{source}: no such file")
    if os.path.isdir(source):
        raise DataError(f"{source}: is a folder; pass a .jsonl/.json/.parquet/.csv file or a hub dataset name")
    if os.path.exists(source):
        ext = os.path.splitext(source)[1].lower()
        if ext == ".jsonl":
            return read_jsonl(source)
        builder = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(ext)
        if builder is None:
            raise DataError(f"{source}: unknown file type {ext!r}; use .jsonl, .json, .parquet or .csv")
        from datasets import load_dataset

        try:
            return list(load_dataset(builder, data_files=source, split="train"))
        except Exception as e:  # datasets wraps parse errors in many types
            raise DataError(f"{source}: cannot read as {builder}: {str(e).splitlines()[0]}") from None
    from datasets import load_dataset

    try:
        return list(load_dataset(source, name, split=split))
    except Exception as e:
        what = f"split {split!r}" + (f", config {name!r}" if name else "")
        raise DataError(f"dataset {source!r} ({what}) could not be loaded: {str(e).splitlines()[0]}") from None


def _pick(row: dict, wanted: str | None, defaults: tuple[str, ...], what: str, source: str) -> str:
    if wanted:
        if wanted not in row:
            raise DataError(f"{source}: no field {wanted!r} for the {what}; fields: {', '.join(row)}")
        return wanted
    for name in defaults:
        if name in row:
            return name
    raise DataError(f"{source}: no {what} field (tried {', '.join(defaults)}); pass --{what}-field, fields: {', '.join(row)}")


def load_first_rows(source: str, split: str = "train", limit: int | None = None, name: str | None = None) -> list[dict]:
    """``load_rows`` cut to ``limit``; an empty dataset or a bad limit is a one-line error."""
    rows = load_rows(source, split, name)
    if not rows:
        raise DataError(f"{source}: the dataset is empty")
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be >= 1; got {limit}")
        rows = rows[:limit]
    return rows


def load_problems(
    source: str,
    split: str = "train",
    question_field: str | None = None,
    answer_field: str | None = None,
    limit: int | None = None,
    name: str | None = None,
) -> list[Problem]:
    rows = load_first_rows(source, split, limit, name)
    q = _pick(rows[0], question_field, QUESTION_FIELDS, "question", source)
    a = _pick(rows[0], answer_field, ANSWER_FIELDS, "answer", source)
    problems = []
    for i, row in enumerate(rows):
        if row.get(q) in (None, "") or row.get(a) in (None, ""):
            raise DataError(f"{source}: row {i + 1} has an empty {q!r} or {a!r}")
        question = as_text(row[q], f"{source}: row {i + 1}, field {q!r},")
        answer = as_text(row[a], f"{source}: row {i + 1}, field {a!r},")
        pid = str(row["id"]) if row.get("id") not in (None, "") else str(i)
        problems.append(Problem(i, pid, question, last_boxed(answer) or answer.strip()))
    seen: dict[str, int] = {}
    for p in problems:
        if p.id in seen:
            raise DataError(f"{source}: rows {seen[p.id] + 1} and {p.index + 1} share the id {p.id!r}; ids must be unique")
        seen[p.id] = p.index
    return problems

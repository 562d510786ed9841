"""Building blocks of `rsd generate`: answer checking, problem loading, the resumable trace file."""

from __future__ import annotations

import json

import pytest

from rsd_toolkit.traces.answers import answers_match, extract_answer, last_boxed
from rsd_toolkit.traces.data import DataError, load_problems
from rsd_toolkit.checks import InputError
from rsd_toolkit.traces.store import TraceFile, TraceFileError, read_records


@pytest.mark.parametrize(
    "text,answer",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("first \\boxed{3}, corrected: \\boxed{4}", "4"),
        ("nested \\boxed{\\sqrt{\\frac{a}{b}}} done", "\\sqrt{\\frac{a}{b}}"),
        ("no box here", None),
        ("unclosed \\boxed{12", None),
    ],
)
def test_last_boxed(text, answer):
    assert last_boxed(text) == answer


@pytest.mark.parametrize(
    "predicted,reference,same",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("0.50", "\\frac{1}{2}", True),
        ("[1, 3)", "[1,3)", True),
        ("\\left[1, 3\\right)", "[1, 3)", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("0.33", "\\frac{1}{3}", False),
        ("(1, 3)", "[1, 3)", False),
        (None, "1", False),
    ],
)
def test_answers_match_is_mathematical(predicted, reference, same):
    assert answers_match(predicted, reference) is same


def test_extract_answer_uses_extra_patterns_after_boxed():
    assert extract_answer("#### 42", (r"####\s*(\S+)",)) == "42"
    assert extract_answer("\\boxed{7} #### 42", (r"####\s*(\S+)",)) == "7"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_problems_from_jsonl_with_s1k_and_common_fields(tmp_path):
    s1k = write_jsonl(tmp_path / "s1k.jsonl", [{"question": "1+1?", "solution": "We add. \\boxed{2}"}])
    assert [(p.question, p.answer) for p in load_problems(s1k)] == [("1+1?", "2")]
    common = write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "problem": "2+2?", "answer": "4"}, {"id": "b", "problem": "3+3?", "answer": "6"}])
    assert [(p.id, p.answer) for p in load_problems(common, limit=1)] == [("a", "4")]


def test_problem_errors_name_the_line_and_fields(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{"question": "b", "answer": \n')
    with pytest.raises(DataError, match="bad.jsonl line 2: invalid JSON"):
        load_problems(str(bad))
    with pytest.raises(DataError, match="the dataset is empty"):
        load_problems(write_jsonl(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match="share the id 'a'"):
        load_problems(write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "question": "q", "answer": "1"}] * 2))
    with pytest.raises(DataError, match="--limit must be >= 1"):
        load_problems(write_jsonl(tmp_path / "one.jsonl", [{"question": "q", "answer": "1"}]), limit=0)
    with pytest.raises(DataError, match="no answer field .*fields: question, note"):
        load_problems(write_jsonl(tmp_path / "noans.jsonl", [{"question": "q", "note": "n"}]))


def test_trace_file_resumes_drops_a_cut_line_and_refuses_other_settings(tmp_path):
    path = str(tmp_path / "traces.jsonl")
    f = TraceFile(path, {"pth": 0.01})
    f.append({"id": "p1", "text": "a"})
    f.append({"id": "p2", "text": "b"})
    f.close()
    with open(path, "a") as out:
        out.write('{"id": "p3", "te')  # killed mid-write
    with TraceFile(path, {"pth": 0.01}) as again:
        assert again.done("p1") and again.done("p2") and not again.done("p3")
    assert [r["id"] for r in read_records(path)] == ["p1", "p2"]
    with pytest.raises(TraceFileError, match=r"other settings \(pth 0.01 → 0.03\); .* kept as .*traces.jsonl.bak-1\)"):
        TraceFile(path, {"pth": 0.03})
    with pytest.raises(InputError, match="folder .* does not exist"):
        TraceFile(str(tmp_path / "no" / "such" / "dir.jsonl"), {"pth": 0.01})
    forced = TraceFile(path, {"pth": 0.03}, force=True)
    assert not forced.done("p1") and (tmp_path / "traces.jsonl.bak-1").exists()

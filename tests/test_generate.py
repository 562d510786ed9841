"""`rsd generate` / `rsd merge`: rejection sampling, filters, UPFT, resumability under SIGKILL, errors."""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import tiny_lm
from rsd_toolkit.cli import cli
from rsd_toolkit.config import GenerateOptions, RSDConfig
from rsd_toolkit.engine import RSDEngine, TokenRecord, Trace
from rsd_toolkit.traces.data import Problem
from rsd_toolkit.traces.pipeline import choose
from rsd_toolkit.traces.store import read_records

MATH = [
    {"id": f"p{i}", "problem": q, "answer": a}
    for i, (q, a) in enumerate(
        [("What is 1/2 + 0?", "\\frac{1}{2}"), ("What is 2 + 3?", "5"), ("What is 10 / 4?", "2.5"),
         ("Solve x + 1 = 3.", "2"), ("What is 3 * 3?", "9"), ("What is 7 - 7?", "0"),
         ("Half of 9?", "\\frac{9}{2}"), ("What is 2^5?", "32")]  # fmt: skip
    )
]


@pytest.fixture(scope="module")
def engine():
    lm = tiny_lm("asset:qwen2", "llama", hidden=32, seed=5)
    return RSDEngine(lm, lm, RSDConfig(max_new_tokens=8))


def fake_trace(engine, text: str, finish="eos", accepted=9, decisions=10) -> Trace:
    ids = engine.student.vocab.encode(text) + ([engine.student.primary_stop] if finish == "eos" else [])
    records = [TokenRecord(i, "teacher", 0.5) for i in ids]
    return Trace(0, text, ids, records, finish, accepted, decisions, 0.01, "PROMPT")


def test_keeps_the_shortest_correct_trace(engine):
    problem = Problem(0, "p0", "What is 1/2?", "\\frac{1}{2}")
    traces = [
        fake_trace(engine, "It is \\boxed{0.5} because one half is a half."),
        fake_trace(engine, "So \\boxed{0.5}."),
        fake_trace(engine, "\\boxed{1/3}"),  # shorter but wrong
    ]
    rec = choose(problem, traces, engine, GenerateOptions(attempts=3))
    assert (rec["kind"], rec["correct"], rec["text"], rec["correct_attempts"]) == ("full", True, "So \\boxed{0.5}.", 2)
    assert rec["rejected"]["wrong_answer"] == 1 and rec["prompt"] == "PROMPT"


def test_an_answer_without_box_is_no_answer_not_wrong(engine):
    problem = Problem(0, "p0", "What is 20 - 8?", "12")
    traces = [fake_trace(engine, " 20 minus 8 equals 12"), fake_trace(engine, "\\boxed{13}")]
    rec = choose(problem, traces, engine, GenerateOptions(attempts=2))
    assert rec["rejected"]["no_answer"] == 1 and rec["rejected"]["wrong_answer"] == 1 and rec["predicted"] is None


def test_generate_instruction_is_appended_and_recorded():
    from rsd_toolkit.traces.answers import BOXED_INSTRUCTION
    from rsd_toolkit.traces.pipeline import run_config, with_instruction

    problems = [Problem(0, "p0", "What is 2+2?", "4")]
    on, off = GenerateOptions(), GenerateOptions(instruction=False)
    assert with_instruction(problems, on)[0].question == f"What is 2+2?\n\n{BOXED_INSTRUCTION}"
    assert with_instruction(problems, off)[0].question == "What is 2+2?"
    assert run_config("t", "s", "identical", RSDConfig(), on, {})["generate"]["instruction"] == BOXED_INSTRUCTION
    assert run_config("t", "s", "identical", RSDConfig(), off, {})["generate"]["instruction"] is None


def test_filters_reject_correct_traces_without_eos_or_with_many_fallbacks(engine):
    problem = Problem(0, "p0", "q", "5")
    traces = [fake_trace(engine, "\\boxed{5}", finish="length"), fake_trace(engine, "\\boxed{5}", accepted=2, decisions=10)]
    rec = choose(problem, traces, engine, GenerateOptions(attempts=2, upft_tokens=3))
    assert rec["kind"] == "upft_prefix" and not rec["correct"]
    assert rec["rejected"] == {"no_eos": 1, "fallback_rate": 1, "no_answer": 0, "wrong_answer": 0}
    assert rec["ids"] == traces[0].ids[:3] and rec["text"] == engine.student.vocab.text_of(traces[0].ids[:3])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small random model with the real qwen2 tokenizer, saved as a folder the CLI can load."""
    lm = tiny_lm("asset:qwen2", "llama", hidden=32, seed=5)
    d = tmp_path_factory.mktemp("tiny_model")
    lm.model.save_pretrained(str(d))
    lm.tokenizer.save_pretrained(str(d))
    return str(d)


@pytest.fixture()
def math_file(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH))
    return str(path)


def generate_args(model_dir, dataset, out, *extra):
    return ["generate", "--teacher", model_dir, "--student", model_dir, "--dataset", dataset, "--out", out,
            "--attempts", "2", "--batch-size", "2", "--max-new-tokens", "6", "--device", "cpu", *extra]  # fmt: skip
# batch 2 x attempts 2: each engine call covers 4 problems, so a run writes its file in two steps


def test_generate_writes_one_record_per_problem_and_parquet(model_dir, math_file, tmp_path):
    out = str(tmp_path / "traces.jsonl")
    result = CliRunner().invoke(cli, generate_args(model_dir, math_file, out, "--format", "parquet", "--token-stats"))
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert [r["id"] for r in records] == [r["id"] for r in MATH]
    assert all(r["kind"] == "upft_prefix" and len(r["ids"]) <= 6 and r["records"] for r in records)  # random model
    assert records[0]["run"]["rsd"]["pth"] == 0.01 and records[0]["run"]["generate"]["attempts"] == 2
    from datasets import Dataset

    assert Dataset.from_parquet(str(tmp_path / "traces.parquet")).num_rows == len(MATH)
    again = CliRunner().invoke(cli, generate_args(model_dir, math_file, out, "--token-stats"))
    assert again.exit_code == 0 and len(read_records(out)) == len(MATH)  # nothing to do, nothing duplicated
    other = CliRunner().invoke(cli, generate_args(model_dir, math_file, out, "--pth", "0.03"))
    message = " ".join(other.output.split())
    assert other.exit_code == 2 and "generate.token_stats true → false; rsd.pth 0.01 → 0.03" in message, message
    assert "kept as " + out + ".bak-1" in message
    forced = CliRunner().invoke(cli, generate_args(model_dir, math_file, out, "--pth", "0.03", "--force", "--limit", "2"))
    assert forced.exit_code == 0 and len(read_records(out)) == 2 and os.path.exists(out + ".bak-1")


def test_generate_freezes_what_it_loaded(model_dir, math_file, tmp_path):
    """The models and tokenizers leave the cyclic GC's sight once loaded (a full collection otherwise scans
    them, about once per 45k bridged pushes: benchmarks/bench_bridges.py, gc_effect)."""
    gc.unfreeze()
    try:
        r = CliRunner().invoke(cli, generate_args(model_dir, math_file, str(tmp_path / "t.jsonl"), "--limit", "1"))
        assert r.exit_code == 0, r.output
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_killed_runs_resume_to_exactly_the_expected_problems(model_dir, math_file, tmp_path):
    out = str(tmp_path / "traces.jsonl")
    cmd = [sys.executable, "-m", "rsd_toolkit.cli", *generate_args(model_dir, math_file, out)]
    rng = random.Random(0)
    for _ in range(3):  # SIGKILL at a random moment after work has started
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(out) and os.path.getsize(out) > 0:
                time.sleep(rng.uniform(0.0, 1.5))
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in read_records(out)]
    assert sorted(ids) == sorted(r["id"] for r in MATH) and len(ids) == len(set(ids))
    with open(out, encoding="utf-8") as f:
        assert all(json.loads(line) for line in f)  # every line complete


def test_sigint_saves_finished_problems_and_exits_130(model_dir, tmp_path):
    out = str(tmp_path / "traces.jsonl")
    many = tmp_path / "many.jsonl"  # 64 problems: the run is still going when the interrupt arrives
    many.write_text("".join(json.dumps({**r, "id": f"{r['id']}-{k}"}) + "\n" for k in range(8) for r in MATH))
    cmd = [sys.executable, "-m", "rsd_toolkit.cli", *generate_args(model_dir, str(many), out)]
    # A runner started in the background (`cmd &`) ignores SIGINT, and its children inherit that: restore the
    # default so the CLI sees the interrupt as a user's Ctrl-C would.
    restore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=restore_sigint)
    while proc.poll() is None and not (os.path.exists(out) and os.path.getsize(out) > 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert proc.returncode == 130 and "rerun the same command to continue" in err
    assert len(read_records(out)) >= 1


def test_merge_joins_shards_in_problem_order(model_dir, math_file, tmp_path):
    out = str(tmp_path / "traces.jsonl")
    for shard in ("0/2", "1/2"):
        r = CliRunner().invoke(cli, generate_args(model_dir, math_file, out, "--shard", shard, "--limit", "4"))
        assert r.exit_code == 0, r.output
    parts = [str(tmp_path / f"traces.shard{i}-of-2.jsonl") for i in (0, 1)]
    assert [rec["id"] for rec in read_records(parts[0])] == ["p0", "p2"]
    merged = str(tmp_path / "all.jsonl")
    r = CliRunner().invoke(cli, ["merge", merged, *parts])
    assert r.exit_code == 0, r.output
    assert [rec["id"] for rec in read_records(merged)] == ["p0", "p1", "p2", "p3"]


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n', "line 2: invalid JSON"),
        ("", "the dataset is empty"),
        ('{"problem": "a", "note": "1"}\n', "no answer field"),
    ],
)
def test_bad_datasets_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    r = CliRunner().invoke(cli, ["generate", "--teacher", "x", "--student", "y", "--dataset", str(path), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_generate_help_has_an_example():
    r = CliRunner().invoke(cli, ["generate", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--pth" in r.output and "--upft-tokens" in r.output


def test_launcher_environment_picks_the_shard(monkeypatch):
    from rsd_toolkit.cli.generate import parse_shard, shard_path

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert parse_shard(None) == (3, 8) and parse_shard("1/2") == (1, 2)
    assert shard_path("out/traces.jsonl", 3, 8) == "out/traces.shard3-of-8.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_shard(None) == (0, 1) and shard_path("t.jsonl", 0, 1) == "t.jsonl"


@pytest.mark.parametrize("ext", ["csv", "parquet", "json"])
def test_problems_from_csv_parquet_and_json(tmp_path, ext):
    from datasets import Dataset

    from rsd_toolkit.traces.data import load_problems

    path = str(tmp_path / f"math.{ext}")
    ds = Dataset.from_list([{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}])
    {"csv": ds.to_csv, "parquet": ds.to_parquet, "json": ds.to_json}[ext](path)
    assert [(p.question, p.answer) for p in load_problems(path)] == [("1+1?", "2"), ("2+2?", "4")]


def test_a_problem_is_written_as_soon_as_its_last_attempt_finishes(engine, tmp_path):
    """Records reach the file while the engine is still decoding the other problems, not at the end of the call;
    the engine keeps no trace it handed over (``keep=False``)."""
    from rsd_toolkit.traces.pipeline import generate_traces
    from rsd_toolkit.traces.store import TraceFile, read_records

    problems = [Problem(i, f"p{i}", f"What is {i} + 1?", str(i + 1)) for i in range(3)]
    path = str(tmp_path / "t.jsonl")
    lines_when_a_trace_finished = []
    real_generate = engine.generate

    returned = []

    def spying_generate(prompts, seeds, batch_size, progress, keep):
        def on_trace(trace):
            progress(trace)
            lines_when_a_trace_finished.append((trace.index, sum(1 for _ in open(path))))

        returned.append(real_generate(prompts, seeds=seeds, batch_size=batch_size, progress=on_trace, keep=keep))
        return returned[-1]

    engine.generate = spying_generate
    try:
        with TraceFile(path, {}) as store:
            generate_traces(engine, problems, store, GenerateOptions(attempts=2, batch_size=8))
    finally:
        del engine.generate
    assert len(lines_when_a_trace_finished) == 6  # one call: all six attempts decode together
    assert len(returned) == 1 and list(returned[0]) == [None] * 6
    finished = set()
    for index, lines in lines_when_a_trace_finished:  # on disk right after each problem's 2nd attempt
        finished.add(index)
        assert lines == sum({2 * p, 2 * p + 1} <= finished for p in range(3))
    assert [r["id"] for r in read_records(path)] == ["p0", "p1", "p2"]

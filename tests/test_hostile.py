"""Hostile input, one class at a time: every bad input is one line on stderr with exit code 2, no traceback,
and (where it matters) before any model loads and without losing finished work.

The table below is the regression net of the bad-input pass: values that are not numbers, bytes that are
not UTF-8, outputs that are folders or in missing folders, options checked too late, models and tokenizers
that are not what they claim, malformed files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
from click.testing import CliRunner

from conftest import tiny_lm
from rsd_toolkit.cli import cli

PROBLEMS = [{"id": f"p{i}", "problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs, made once: a tiny model folder, data files, trace files, broken models."""
    d = tmp_path_factory.mktemp("hostile")
    lm = tiny_lm("asset:qwen2", "llama", hidden=32, layers=1, seed=3)
    model = d / "model"
    lm.model.save_pretrained(str(model))
    lm.tokenizer.save_pretrained(str(model))
    f = {"model": str(model), "dir": str(d / "a_folder")}
    os.mkdir(f["dir"])
    f["problems"] = write_jsonl(d / "problems.jsonl", PROBLEMS)
    (d / "latin1.jsonl").write_bytes(b'{"problem": "caf\xe9", "answer": "1"}\n')
    f["latin1"] = str(d / "latin1.jsonl")
    (d / "badjson.jsonl").write_text('{"problem": "q", "answer": "1"}\n{"problem": oops}\n')
    f["badjson"] = str(d / "badjson.jsonl")
    f["array_line"] = write_jsonl(d / "array.jsonl", [[1, 2]])
    f["list_question"] = write_jsonl(d / "listq.jsonl", [{"problem": ["a", "b"], "answer": "1"}])
    f["null_answer"] = write_jsonl(d / "nullans.jsonl", [{"problem": "q", "answer": None}])
    f["no_fields"] = write_jsonl(d / "nofields.jsonl", [{"x": 1}])
    (d / "empty.jsonl").write_text("")
    f["empty"] = str(d / "empty.jsonl")
    (d / "data.txt").write_text("hello")
    f["txt"] = str(d / "data.txt")
    trace = {"id": "p0", "index": 0, "question": "What is 1 + 1?", "text": "2", "ids": [], "kind": "full",
             "run": {"dataset": {"shard": [0, 2]}}}  # fmt: skip
    f["traces"] = write_jsonl(d / "traces.jsonl", [trace])
    f["null_text"] = write_jsonl(d / "nulltext.jsonl", [{**trace, "text": None}])
    f["list_question_trace"] = write_jsonl(d / "listqtrace.jsonl", [{**trace, "question": [1]}])
    f["bad_kind"] = write_jsonl(d / "badkind.jsonl", [{**trace, "kind": "weird"}])
    f["no_text"] = write_jsonl(d / "notext.jsonl", [{"id": "a", "question": "q"}])
    (d / "latin1_traces.jsonl").write_bytes(b'{"id": "a", "question": "q", "text": "caf\xe9", "kind": "full"}\n')
    f["latin1_traces"] = str(d / "latin1_traces.jsonl")
    f["unrelated"] = str(d / "notes.txt")
    (d / "notes.txt").write_text("my notes\n")
    f["mc_numbers"] = write_jsonl(d / "mc.jsonl", [{"q": "2+2?", "a": "4"}, {"q": "3+3?", "a": "6"}])
    (d / "results.json").write_text("{not json")
    f["bad_results"] = str(d / "results.json")
    # models that are not what they claim
    truncated = d / "truncated"
    shutil.copytree(model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    f["truncated"] = str(truncated)
    bad_config = d / "bad_config"
    shutil.copytree(model, bad_config)
    (bad_config / "config.json").write_text("{ this is not json")
    f["bad_config"] = str(bad_config)
    no_eos = d / "no_eos"
    shutil.copytree(model, no_eos)
    cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    for name in ("generation_config.json", "chat_template.jinja"):  # no EOS anywhere, no template to end a turn
        if (no_eos / name).exists():
            (no_eos / name).unlink()
    f["no_eos"] = str(no_eos)
    (d / "random.gguf").write_bytes(os.urandom(4096))
    f["random_gguf"] = str(d / "random.gguf")
    (d / "random.model").write_bytes(os.urandom(4096))
    f["random_spm"] = str(d / "random.model")
    (d / "not_tokenizer.json").write_text(json.dumps({"hello": "world"}))
    f["not_tokenizer"] = str(d / "not_tokenizer.json")
    f["out_dir"] = str(d / "outputs")
    os.mkdir(f["out_dir"])
    f["missing_folder_out"] = str(d / "no" / "such" / "folder" / "out.jsonl")
    return f


def gen(f, *extra):
    return ["generate", "--teacher", f["model"], "--student", f["model"], "--dataset", f["problems"],
            "--out", os.path.join(f["out_dir"], "t.jsonl"), "--attempts", "1", "--max-new-tokens", "4", *extra]  # fmt: skip


def sft(f, *extra):
    return ["sft", "--student", f["model"], "--traces", f["traces"], "--out", os.path.join(f["out_dir"], "sft"), *extra]


def ev(f, *extra):
    return ["eval", "--model", f["model"], "--benchmark", f["problems"], "--max-new-tokens", "4", *extra]


def sur(f, *extra):
    return ["surprisal", "--student", f["model"], f["traces"], *extra]


def sur_at(f, traces):
    return ["surprisal", "--student", f["model"], traces]


def cmp_(f, *extra):
    return ["compare", "--student", f["model"], f["traces"], *extra]


def swp(f, *extra):
    return ["sweep", "--teacher", f["model"], "--student", f["model"], "--dataset", f["problems"], "--limit", "1", *extra]


def merge(f, *extra):
    return ["merge", os.path.join(f["out_dir"], "merged.jsonl"), *extra]


# (command builder, extra args (with {name} placeholders for files), fragment of the one-line error)
CASES = [
    # ---- values that are not numbers, or out of range
    *[(gen, [opt, v], frag) for opt, v, frag in [
        ("--temperature", "nan", "not a finite number"), ("--temperature", "inf", "not a finite number"),
        ("--temperature", "-1", "temperature must be >= 0"), ("--top-p", "0", "top_p must be in (0, 1]"),
        ("--top-p", "1.5", "top_p must be in (0, 1]"), ("--top-p", "nan", "not a finite number"),
        ("--pth", "nan", "not a finite number"), ("--pth", "-0.1", "pth must be in (0, 1]"),
        ("--pth", "2", "pth must be in (0, 1]"), ("--max-new-tokens", "0", "max_new_tokens must be >= 1"),
        ("--k", "0", "k must be >= 1"), ("--teacher-draws", "0", "teacher_draws must be >= 1"),
        ("--attempts", "0", "attempts must be >= 1"), ("--batch-size", "0", "batch_size must be >= 1"),
        ("--upft-tokens", "0", "upft_tokens must be >= 1"), ("--max-fallback-rate", "1.5", "max_fallback_rate must be in [0, 1]"),
        ("--max-fallback-rate", "nan", "not a finite number"), ("--limit", "0", "0 is not in the range"),
        ("--seed", "-1", "seed must be >= 0"), ("--temperature", "abc", "'abc' is not a number"),
        ("--max-new-tokens", "1e9x", "is not a valid integer"),
    ]],  # fmt: skip
    *[(sft, [opt, v], frag) for opt, v, frag in [
        ("--learning-rate", "nan", "not a finite number"), ("--learning-rate", "0", "learning_rate must be > 0"),
        ("--learning-rate", "inf", "not a finite number"), ("--epochs", "0", "epochs must be > 0"),
        ("--epochs", "nan", "not a finite number"), ("--warmup-ratio", "1", "warmup_ratio must be in [0, 1)"),
        ("--max-length", "1", "max_length must be >= 2"), ("--batch-size", "0", "batch_size must be >= 1"),
        ("--lora-dropout", "1.5", "lora_dropout must be in [0, 1)"), ("--weight-decay", "-1", "weight_decay must be >= 0"),
        ("--max-steps", "0", "max_steps must be >= 1 or -1"), ("--save-total-limit", "0", "save_total_limit must be >= 1"),
        ("--dtype", "float64", "'float64' is not one of"),
    ]],  # fmt: skip
    *[(ev, [opt, v], frag) for opt, v, frag in [
        ("--samples", "0", "samples must be >= 1"), ("--temperature", "nan", "not a finite number"),
        ("--top-p", "0", "top_p must be in (0, 1]"), ("--limit", "-1", "limit (0 = all) must be >= 0"),
        ("--max-new-tokens", "0", "max_new_tokens must be >= 1"), ("--batch-size", "0", "batch_size must be >= 1"),
        ("--dtype", "int8", "'int8' is not one of"),
    ]],  # fmt: skip
    *[(sur, [opt, v], frag) for opt, v, frag in [
        ("--pth", "nan", "not a finite number"), ("--pth", "0", "--pth must be in (0, 1]"),
        ("--batch-size", "0", "0 is not in the range"), ("--top", "-1", "-1 is not in the range"),
        ("--show", "-1", "-1 is not in the range"), ("--limit", "0", "0 is not in the range"),
    ]],  # fmt: skip
    (cmp_, ["--batch-size", "0"], "0 is not in the range"),
    (cmp_, ["--pth", "inf"], "not a finite number"),
    (cmp_, ["--label", "a", "--label", "b"], "2 --label for 1 trace sets"),
    *[(swp, [opt, v], frag) for opt, v, frag in [
        ("--pths", "0.1,nan", "--pths values must be in (0, 1]"), ("--pths", "x", "expected comma-separated numbers"),
        ("--pths", ",", "--pths is empty"), ("--report-pth", "nan", "not a finite number"),
        ("--attempts", "0", "0 is not in the range"), ("--temperature", "nan", "not a finite number"),
        ("--batch-size", "0", "0 is not in the range"),
    ]],  # fmt: skip
    (lambda f, *e: ["demo", *e], ["--problems", "0"], "0 is not in the range"),
    (lambda f, *e: ["demo", *e], ["--max-new-tokens", "100000"], "100000 is not in the range"),
    # ---- regexes, devices, shards
    (gen, ["--answer-pattern", "(["], "is not a valid regular expression"),
    (gen, ["--answer-pattern", "a{2,1}"], "is not a valid regular expression"),
    (gen, ["--device", "tpu9"], "not a device name"),
    (gen, ["--device", "cuda"], "no cuda device is available here"),
    (gen, ["--device", "cuda:7"], "no cuda device is available here"),
    (gen, ["--device", "mps"], "no mps device is available here"),
    (ev, ["--device", "gpu"], "not a device name"),
    (sur, ["--device", "cuda:0"], "no cuda device is available here"),
    (gen, ["--shard", "3/2"], "need 0 <= I < N"),
    (gen, ["--shard", "a/b"], "expected I/N"),
    # ---- data files that are not what they claim
    (gen, ["--dataset", "{latin1}"], "line 1: not UTF-8 (byte 0xe9"),
    (gen, ["--dataset", "{badjson}"], "line 2: invalid JSON"),
    (gen, ["--dataset", "{array_line}"], "line 1: expected a JSON object"),
    (gen, ["--dataset", "{list_question}"], "field 'problem', is a list, expected text"),
    (gen, ["--dataset", "{null_answer}"], "row 1 has an empty 'problem' or 'answer'"),
    (gen, ["--dataset", "{no_fields}"], "no question field"),
    (gen, ["--dataset", "{empty}"], "the dataset is empty"),
    (gen, ["--dataset", "{txt}"], "unknown file type '.txt'"),
    (gen, ["--dataset", "{dir}"], "is a folder"),
    (gen, ["--dataset", "missing.jsonl"], "missing.jsonl: no such file"),
    (gen, ["--question-field", "nope"], "no field 'nope' for the question"),
    (ev, ["--benchmark", "{latin1}"], "not UTF-8"),
    (lambda f, *e: ["eval", "--model", f["model"], *e], ["--benchmark", "{mc_numbers}", "--kind", "mc", "--question-field",
     "q", "--answer-field", "a"], "--kind mc needs option letters as answers"),
    (ev, ["--benchmark", "aime23"], "unknown benchmark 'aime23'"),
    (ev, ["--compare", "{bad_results}"], "not JSON"),
    (ev, ["--compare", "{dir}"], "is a folder, expected a file"),
    (ev, ["--compare", "missing.json"], "no such results file"),
    (sur_at, ["{latin1_traces}"], "line 1: not UTF-8"),
    (sur_at, ["{dir}"], "is a folder"),
    (sur_at, ["{no_text}"], "no text field"),
    (sur, ["--text-field", "nope"], "no field 'nope'"),
    (sur, ["--prompt-field", "nope"], "no field 'nope' for the prompt"),
    (sur_at, ["{list_question_trace}"], "field 'question', is a list, expected text"),
    (sur, ["--plot", "x.bmpx"], "unknown image type"),
    (sur, ["--plot", "{missing_folder_out}.png"], "does not exist"),
    (lambda f, *e: ["compare", "--student", f["model"], *e], ["{latin1_traces}"], "not UTF-8"),
    (sft, ["--traces", "{null_text}"], "'text' is null, expected text"),
    (sft, ["--traces", "{list_question_trace}"], "'question' is a list"),
    (sft, ["--traces", "{bad_kind}"], "unknown kind 'weird'"),
    (sft, ["--traces", "{latin1_traces}"], "not UTF-8"),
    (sft, ["--traces", "{empty}"], "the trace file is empty"),
    (sft, ["--traces", "{dir}"], "is a folder"),
    (sft, ["--traces", "missing.jsonl"], "no such trace file"),
    (sft, ["--traces", "{problems}"], "no question, text, kind"),
    (sft, ["--think-markers", "onlyone"], "think markers must be 'START,END'"),
    # ---- outputs that are folders, in missing folders, or other files
    (gen, ["--out", "{dir}"], "is a folder, expected a file name"),
    (gen, ["--out", "{missing_folder_out}"], "does not exist; create the folder"),
    (gen, ["--out", "{latin1}"], "not UTF-8"),
    (gen, ["--out", "{unrelated}"], "not a trace record"),
    (ev, ["--out", "{dir}"], "is a folder, expected a file name"),
    (ev, ["--out", "{missing_folder_out}"], "does not exist"),
    (sft, ["--out", "{unrelated}"], "is a file, expected a folder"),
    (sft, ["--out", "{unrelated}/sub"], "is a file"),
    (lambda f, *e: ["merge", *e], ["{dir}", "{traces}"], "is a folder, expected a file name"),
    (lambda f, *e: ["merge", *e], ["{missing_folder_out}", "{traces}"], "does not exist"),
    (lambda f, *e: ["merge", *e], ["{traces}", "{traces}"], "also one of the shard files"),
    (lambda f, *e: ["merge", *e], ["{unrelated}", "{traces}", "--partial"], "not a merge of this run"),
    (merge, ["missing.jsonl"], "no such file"),
    (merge, ["{dir}"], "is a folder"),
    (merge, ["{latin1_traces}"], "not UTF-8"),
    (merge, ["{badjson}"], "invalid JSON"),
    (merge, ["{problems}"], "a record without id"),
    (merge, ["{traces}"], "no records from shard(s) 1 of 2"),
    # ---- models and tokenizers that are not what they claim
    (ev, ["--model", "{truncated}"], "cannot load model"),
    (ev, ["--model", "{bad_config}"], "is not a valid JSON file"),
    (gen, ["--student", "{no_eos}"], "has no EOS token (tokenizer or generation config)"),
    (ev, ["--model", "{random_gguf}"], "cannot read model"),
    (ev, ["--model", "{dir}"], "folder has no tokenizer"),
    (ev, ["--model", "asset:qwen2"], "holds a tokenizer only, no weights"),
    (ev, ["--model", "asset:nope"], "unknown asset 'nope'"),
    (ev, ["--model", "./missing-model"], "no such file or folder"),
    (lambda f, *e: ["compat", *e], ["{random_gguf}", "asset:qwen2"], "could not read tokenizer"),
    (lambda f, *e: ["compat", *e], ["{random_spm}", "asset:qwen2"], "could not read tokenizer"),
    (lambda f, *e: ["compat", *e], ["{not_tokenizer}", "asset:qwen2"], "could not read tokenizer"),
    (lambda f, *e: ["compat", *e], ["{dir}", "asset:qwen2"], "folder has no tokenizer"),
    (lambda f, *e: ["compat", *e], ["asset:qwen2", "asset:qwen2", "--text", "{latin1}"], "not UTF-8"),
    (lambda f, *e: ["compat", *e], ["asset:qwen2", "asset:qwen2", "--text", "{dir}"], "is a folder"),
    (lambda f, *e: ["compat", *e], ["asset:qwen2", "asset:qwen2", "--text", "{empty}"], "file is empty"),
    (lambda f, *e: ["compat", *e], ["./nope.json", "asset:qwen2"], "no such file or folder"),
]


def _fill(args: list[str], f: dict) -> list[str]:
    return [re.sub(r"\{([a-z_0-9]+)\}", lambda m: f[m.group(1)], a) for a in args]


@pytest.mark.parametrize("build,extra,fragment", CASES, ids=[f"{i}-{' '.join(c[1])[:40]}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_with_exit_code_2(build, extra, fragment, files, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = build(files, *_fill(extra, files))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, (args, r.output, r.exception)
    assert "Traceback" not in r.output and isinstance(r.exception, SystemExit), r.output
    errors = [line for line in r.output.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1, r.output
    assert fragment in " ".join(r.output.split()), r.output


def test_the_table_covers_100_inputs():
    assert len(CASES) >= 100


def _cli(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "rsd_toolkit.cli", *args], capture_output=True, text=True, env=env, **kw)


def test_real_entry_point_usage_and_input_errors_are_one_unwrapped_line(files):
    """Through the real entry (not a test runner), with pipes for stdout/stderr: no wrapping at 80 columns."""
    long_out = os.path.join(files["out_dir"], "a-rather-long-file-name-so-that-the-message-passes-eighty-columns", "x.jsonl")
    r = _cli(*gen(files, "--out", long_out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr, r.stderr
    r = _cli("generate", "--teacher", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Missing option" in r.stderr and "--help" in r.stderr


def test_nan_never_reaches_a_trace_file(tmp_path):
    from rsd_toolkit.traces.store import TraceFile

    with TraceFile(str(tmp_path / "t.jsonl"), {}) as store, pytest.raises(ValueError, match="Out of range float"):
        store.append({"id": "a", "acceptance_rate": float("nan")})


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_stale_lock_does_not_block(files, tmp_path):
    from rsd_toolkit.traces.store import OutputLock

    out = str(tmp_path / "t.jsonl")
    args = gen(files, "--out", out)
    with OutputLock(out):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2 and f"is being written by pid {os.getpid()} on" in " ".join(r.output.split())
    assert not os.path.exists(out + ".lock")  # released and removed
    # a killed run leaves its lock file behind; the kernel released the lock itself, so the resume runs
    holder = subprocess.run([sys.executable, "-c", f"from rsd_toolkit.traces.store import OutputLock; "
                             f"l = OutputLock({out!r}); import os; os._exit(0)"], check=True)  # fmt: skip
    assert holder.returncode == 0 and os.path.exists(out + ".lock")
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert sum(1 for _ in open(out)) == len(PROBLEMS)


def test_problems_longer_than_the_context_are_skipped_counted_and_named(files, tmp_path):
    short = tmp_path / "short_model"
    shutil.copytree(files["model"], short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 48
    (short / "config.json").write_text(json.dumps(cfg))
    data = write_jsonl(tmp_path / "p.jsonl", [PROBLEMS[0], {"id": "huge", "problem": "word " * 500, "answer": "1"}])
    out = str(tmp_path / "t.jsonl")
    r = CliRunner().invoke(cli, ["generate", "--teacher", str(short), "--student", str(short), "--dataset", data,
                                 "--out", out, "--attempts", "1", "--max-new-tokens", "4"])  # fmt: skip
    text = " ".join(r.output.split())
    assert r.exit_code == 0, r.output
    assert "warning: 1 problem(s) skipped" in text and "huge by" in text and "exceeds the model's context" in text
    assert [json.loads(line)["id"] for line in open(out)] == ["p0"]
    only_huge = write_jsonl(tmp_path / "h.jsonl", [{"id": "huge", "problem": "word " * 500, "answer": "1"}])
    r = CliRunner().invoke(cli, ["generate", "--teacher", str(short), "--student", str(short), "--dataset", only_huge,
                                 "--out", str(tmp_path / "h-out.jsonl"), "--max-new-tokens", "4"])  # fmt: skip
    assert r.exit_code == 2 and "no problem fits the models' context" in r.output
    # scoring: a trace longer than the student's context is skipped and counted, not scored at garbage positions
    traces = write_jsonl(tmp_path / "tr.jsonl", [{"id": "a", "question": "q", "text": "ok"},
                                                 {"id": "b", "question": "q", "text": "word " * 500}])  # fmt: skip
    r = CliRunner().invoke(cli, ["surprisal", "--student", str(short), traces, "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{") :])
    assert rep["skipped_too_long"] == 1 and rep["summary"]["traces"] == 1


def test_silent_surprises_now_speak(files, tmp_path):
    """A missing shard, a cut-off trace file, multiple-choice answers that are partly not letters."""
    r = CliRunner().invoke(cli, merge(files, files["traces"], "--partial"))
    assert r.exit_code == 0 and "warning: no records from shard(s) 1 of 2: the merge is partial" in " ".join(r.output.split())
    from rsd_toolkit.sft import read_traces

    cut = tmp_path / "cut.jsonl"
    cut.write_text(open(files["traces"]).read() + '{"id": "p1", "quest')
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert len(read_traces(str(cut))) == 1
    assert any("last line is cut off" in str(w.message) for w in seen)
    from rsd_toolkit.evaluation import load_benchmark, resolve_benchmark

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"q": "a?", "a": "B"}, {"q": "b?", "a": "42"}])
    with pytest.warns(UserWarning, match="1 of 2 answers are not option letters"):
        load_benchmark(resolve_benchmark(mixed, "q", "a", kind="mc"))


def test_merge_refuses_an_unrelated_file_and_keeps_it_with_force(files, tmp_path):
    target = tmp_path / "notes.jsonl"
    target.write_text("precious\n")
    r = CliRunner().invoke(cli, ["merge", str(target), files["traces"], "--partial"])
    assert r.exit_code == 2 and target.read_text() == "precious\n"
    r = CliRunner().invoke(cli, ["merge", str(target), files["traces"], "--partial", "--force"])
    assert r.exit_code == 0 and (tmp_path / "notes.jsonl.bak-1").read_text() == "precious\n"
    again = CliRunner().invoke(cli, ["merge", str(target), files["traces"], "--partial"])  # same run: replaced quietly
    assert again.exit_code == 0 and not (tmp_path / "notes.jsonl.bak-2").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_cache_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = CliRunner().invoke(cli, ["assets", "fetch"], env={"RSD_CACHE": str(blocker)})
    assert r.exit_code == 2 and "cannot create the cache folder" in r.output and "set RSD_CACHE" in r.output


def test_sft_into_a_folder_whose_parents_do_not_exist_yet(files, tmp_path):
    """--out a/b/c: the folders are made and the lock lives inside OUT; a second writer there is refused."""
    from rsd_toolkit.traces.store import OutputLock

    out = tmp_path / "a" / "b" / "c"
    args = ["sft", "--student", files["model"], "--traces", files["traces"], "--out", str(out), "--max-steps", "1",
            "--batch-size", "1", "--save-steps", "1"]  # fmt: skip
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert (out / "config.json").exists() and not (out / "rsd_sft.lock").exists()
    with OutputLock(str(out / "rsd_sft")):
        r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "is being written by pid" in " ".join(r.output.split())

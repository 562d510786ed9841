"""`rsd replicate`: the whole experiment on tiny models with real tokenizers, resume after kill -9, one-line errors.

The tiny config: a random Qwen2-architecture teacher over the real qwen2 tokenizer and a random Llama student over
the real GPT-2 tokenizer (a bridged pair, as in the CPU config), 14 problems of which levels 1-2 capped at 8 train
(2 of them validation), 4 benchmark problems, a two-value learning-rate grid. A run takes ~30 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import tiny_lm
from rsd_toolkit.cli import cli
from rsd_toolkit.replicate import STAGES, ReplicateConfig, load_config, overlap, split_validation
from rsd_toolkit.traces.data import Problem
from rsd_toolkit.traces.store import read_records

TRAIN = [{"id": f"t{i}", "problem": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "level": 1 + i % 3} for i in range(14)]
HELD_OUT = [{"id": f"e{i}", "problem": f"What is {i} * 3?", "answer": str(3 * i)} for i in range(4)]


def toml(config: dict) -> str:
    """A TOML text of a config dict: scalars, then [tables], then [[benchmarks]] (JSON strings and numbers are TOML)."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in config.items() if not isinstance(v, (dict, list))]
    for k, v in config.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]", *(f"{kk} = {json.dumps(vv)}" for kk, vv in v.items())]
    for table in config.get("benchmarks", []):
        lines += ["", "[[benchmarks]]", *(f"{kk} = {json.dumps(vv)}" for kk, vv in table.items())]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, config dict): saved tiny models, problem files and the tiny config (as a dict, written as TOML)."""
    d = tmp_path_factory.mktemp("replicate")
    for name, tokenizer, arch in (("teacher", "asset:qwen2", "qwen2"), ("student", "asset:gpt-2", "llama")):
        lm = tiny_lm(tokenizer, arch, hidden=32, layers=1, seed=1)
        lm.model.save_pretrained(str(d / name))
        lm.tokenizer.save_pretrained(str(d / name))
    for name, rows in (("train.jsonl", TRAIN), ("held_out.jsonl", HELD_OUT)):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "teacher": str(d / "teacher"), "student": str(d / "student"), "validation": 0.25, "device": "cpu",
        "dtype": "float32", "out": str(d / "run"),
        "train": {"source": str(d / "train.jsonl"), "levels": [1, 2], "limit": 8},
        "rsd": {"max_new_tokens": 6},
        "generate": {"attempts": 2, "batch_size": 8, "upft_tokens": 4},
        "sft": {"epochs": 2, "batch_size": 2, "per_device_batch_size": 2, "max_length": 128, "bf16": False,
                "warmup_ratio": 0.0, "logging_steps": 1},
        "tune": {"learning_rate": [1e-4, 3e-2]},
        "eval": {"samples": 2, "max_new_tokens": 6, "batch_size": 8},
        "benchmarks": [{"name": "toy", "source": str(d / "held_out.jsonl")}],
    }  # fmt: skip
    return d, config


def write(d, config: dict, name: str = "tiny.toml") -> str:
    path = d / name
    path.write_text(toml(config))
    return str(path)


def cli_run(*args: str):
    return CliRunner().invoke(cli, ["replicate", *args])


def done_stages(out) -> set[str]:
    return {s for s in STAGES if os.path.exists(os.path.join(out, s, "done.json"))}


def one_line_error(result, *fragments: str) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(tiny):
    """The tiny run, killed with SIGKILL while it fine-tunes, then resumed to the end (both as real processes with
    stdout/stderr in files): (folder, config, out, summary of the resumed run, the log of both runs)."""
    d, config = tiny
    path = write(d, config)
    out = config["out"]
    env = {**os.environ, "RSD_PROGRESS_SECONDS": "0"}
    cmd = [sys.executable, "-m", "rsd_toolkit.cli", "replicate", path]
    with open(d / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not os.path.exists(os.path.join(out, "tune", "learning_rate=0.0001")):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = done_stages(out)
    with open(d / "second.log", "w") as log, open(d / "summary.json", "w") as stdout:
        subprocess.run([*cmd, "--json"], stdout=stdout, stderr=log, env=env, check=True, timeout=600)
    summary = json.loads((d / "summary.json").read_text())
    return d, config, out, summary, before, (d / "first.log").read_text() + (d / "second.log").read_text()


def test_a_run_killed_mid_stage_resumes_with_the_finished_stages_skipped(run):
    d, config, out, summary, before, log = run
    assert {"data", "traces-teacher", "traces-rsd", "scores"} <= before and "report" not in before  # killed in tune
    assert summary["skipped"] == [s for s in STAGES if s in before]
    assert summary["ran"] == [s for s in STAGES if s not in before]
    # progress in a log: plain timestamped lines, no terminal escapes
    assert re.search(r"^\d\d:\d\d:\d\d replicate  stage 1/8 data: started$", log, flags=re.M)
    assert re.search(r"^\d\d:\d\d:\d\d traces rsd  \d+/8 problems", log, flags=re.M)
    assert re.search(r"^\d\d:\d\d:\d\d replicate  stage 8/8 report: done in 0:\d\d:\d\d$", log, flags=re.M)
    assert "\x1b[" not in log


def test_every_stage_writes_its_outputs(run):
    d, config, out, summary, _, _ = run
    # data: levels 1-2 of the 14 problems, capped at 8, split by id hash; the benchmark unchanged
    train = [json.loads(x) for x in open(os.path.join(out, "data", "train.jsonl"))]
    val = [json.loads(x) for x in open(os.path.join(out, "data", "validation.jsonl"))]
    eligible = {r["id"] for r in TRAIN if r["level"] in (1, 2)}
    ids = [r["id"] for r in train + val]
    assert len(ids) == 8 == len(set(ids)) and set(ids) <= eligible and train and val
    counts = json.loads(open(os.path.join(out, "data", "done.json")).read())["summary"]
    assert (counts["train"], counts["validation"], counts["benchmarks"]["toy"]["problems"]) == (len(train), len(val), 4)
    assert [json.loads(x)["id"] for x in open(os.path.join(out, "data", "toy.jsonl"))] == [r["id"] for r in HELD_OUT]
    # traces: one record per problem and arm, split into the training and validation files
    for arm in ("teacher", "rsd"):
        records = read_records(os.path.join(out, f"traces-{arm}", f"{arm}.jsonl"))
        assert sorted(r["id"] for r in records) == sorted(ids)
        assert {r["run"]["rsd"]["mode"] for r in records} == {arm}
        assert [r["id"] for r in read_records(os.path.join(out, f"traces-{arm}", f"{arm}.train.jsonl"))] == [r["id"] for r in train]
        assert [r["id"] for r in read_records(os.path.join(out, f"traces-{arm}", f"{arm}.validation.jsonl"))] == [r["id"] for r in val]
    # scores: the paper's statistics per arm, and the per-token surprisal behind the histogram
    import numpy as np

    scores = json.loads(open(os.path.join(out, "scores", "done.json")).read())["summary"]
    for arm in ("teacher", "rsd"):
        s = scores["arms"][arm]
        values = np.load(os.path.join(out, "scores", f"{arm}.surprisal.npy"))
        assert s["tokens"] == values.size > 0 and s["sub_pth"] == int((values > -np.log(0.01)).sum())
        assert sum(b["count"] for b in s["histogram"]) == s["tokens"] and 0 < s["validation"]["tokens"] < s["tokens"]
    # tune: both cells, both arms, saved models without checkpoints; the lower criterion chosen; sft points at it
    tune = summary["tune"]
    assert [row["name"] for row in tune["grid"]] == ["learning_rate=0.0001", "learning_rate=0.03"]
    for row in tune["grid"]:
        for arm in ("teacher", "rsd"):
            folder = row["models"][arm]
            assert os.path.exists(os.path.join(folder, "model.safetensors")) and os.path.exists(os.path.join(folder, "config.json"))
            assert not [n for n in os.listdir(folder) if n.startswith("checkpoint-")]
    first, second = tune["grid"]
    assert first["rsd_validation_loss"] != second["rsd_validation_loss"]  # the grid's settings trained differently
    best = {arm: min(r[f"{arm}_validation_loss"] for r in tune["grid"]) for arm in ("teacher", "rsd")}
    for row in tune["grid"]:
        assert row["criterion"] == pytest.approx(sum(row[f"{a}_validation_loss"] / best[a] for a in best) / 2)
    chosen = min(tune["grid"], key=lambda r: r["criterion"])
    assert tune["chosen"] == chosen["cell"] and summary["sft"]["models"] == chosen["models"]
    assert summary["sft"]["hyperparameters"]["learning_rate"] == chosen["cell"]["learning_rate"]
    # eval: three students, rsd eval's results format, 4 problems x 2 samples each
    for student in ("base", "teacher", "rsd"):
        results = json.loads(open(os.path.join(out, "eval", f"{student}.json")).read())
        toy = results["benchmarks"]["toy"]
        assert toy["summary"]["problems"] == 4 and all(len(p["correct"]) == 2 for p in toy["problems"])
    assert json.loads(open(os.path.join(out, "eval", "base.json")).read())["model"] == config["student"]
    # report: md + json + two PNGs, the accuracy with intervals for every student, stage times
    rep = json.loads(open(os.path.join(out, "report", "report.json")).read())
    toy = rep["accuracy"]["toy"]
    assert set(toy) == {"base", "teacher", "rsd"}
    for row in toy.values():
        assert 0 <= row["ci95"][0] <= row["pass@1"] <= row["ci95"][1] <= 1 and row["problems"] == 4
    assert toy["rsd"]["change"] == pytest.approx(toy["rsd"]["pass@1"] - toy["base"]["pass@1"])
    versus = rep["rsd_vs_teacher"]["toy"]  # the experiment's question: RSD-SFT against teacher-SFT, paired
    assert versus["change"] == pytest.approx(toy["rsd"]["pass@1"] - toy["teacher"]["pass@1"])
    assert versus["change_ci95"][0] <= versus["change"] <= versus["change_ci95"][1]
    assert set(rep["stages"]) == set(STAGES[:-1]) and all(t["seconds"] >= 0 for t in rep["stages"].values())
    assert rep["stages"]["traces-rsd"]["tokens"] > 0 and rep["stages"]["traces-rsd"]["tokens_per_second"] > 0
    md = open(os.path.join(out, "report", "report.md")).read()
    for text in ("## Trace sets under the base student", "| teacher |", "| rsd |", "SFT on RSD traces", "## Stages",
                 "| traces-teacher |", "![accuracy.png](accuracy.png)", "(chosen)",
                 "toy: SFT on RSD traces − SFT on teacher traces = **"):
        assert text in md, text
    for png in ("accuracy.png", "surprisal.png"):
        assert open(os.path.join(out, "report", png), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert summary["accuracy"] == rep["accuracy"]


def mtimes(out) -> dict[str, float]:
    return {s: os.stat(os.path.join(out, s, "done.json")).st_mtime_ns for s in STAGES}


def test_a_rerun_skips_every_stage_and_a_deleted_stage_alone_reruns(run):
    import shutil

    d, config, out, _, _, _ = run
    path = str(d / "tiny.toml")
    old = mtimes(out)
    r = cli_run(path, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["ran"] == [] and summary["skipped"] == list(STAGES) and mtimes(out) == old
    assert "stage 4/8 scores: done before, skipped" in r.stderr
    scores = json.loads(open(os.path.join(out, "scores", "done.json")).read())["summary"]
    shutil.rmtree(os.path.join(out, "scores"))
    r = cli_run(path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ran"] == ["scores"]
    assert json.loads(open(os.path.join(out, "scores", "done.json")).read())["summary"] == scores  # the same numbers
    assert {s: t for s, t in mtimes(out).items() if s != "scores"} == {s: t for s, t in old.items() if s != "scores"}


def test_half_written_outputs_are_not_counted_as_done(run):
    d, config, out, _, _, _ = run
    path = str(d / "tiny.toml")
    traces = os.path.join(out, "traces-rsd", "rsd.jsonl")
    whole = open(traces, "rb").read()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[1]
    open(traces, "wb").write(whole[: len(whole) - len(last) // 2 - 1])  # a writer killed mid-line…
    os.unlink(os.path.join(out, "traces-rsd", "done.json"))  # …before the stage was marked done
    done = os.path.join(out, "eval", "done.json")
    text = open(done).read()
    open(done, "w").write(text[: len(text) // 2])  # a done marker cut short is no marker
    r = cli_run(path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["ran"] == ["traces-rsd", "eval"]
    after = open(traces, "rb").read()
    assert sorted(after.splitlines()) == sorted(whole.splitlines())  # the cut problem regenerated, the same trace
    assert "loading base student" not in r.stderr  # every student's results were complete: none re-evaluated


def test_changed_settings_are_refused_and_force_redoes_only_what_they_touch(run):
    d, config, out, _, _, _ = run
    changed = {**config, "eval": {**config["eval"], "samples": 3}}
    path = write(d, changed, "changed.toml")
    r = cli_run(path)
    one_line_error(r, "was made with other settings (eval.samples 2 → 3)", "--force", "(eval, report)")
    r = cli_run(path, "--force", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["ran"] == ["eval", "report"]
    assert all(row["samples"] == 3 for row in summary["accuracy"]["toy"].values())


def test_fixed_hyperparameters_without_validation_train_in_the_sft_stage(tiny, tmp_path):
    """The paper-gpu shape: no validation split, no grid: the sft stage trains both students itself."""
    _, config = tiny
    fixed = {k: v for k, v in config.items() if k != "tune"}
    fixed.update(validation=0.0, out=str(tmp_path / "run"), eval={**config["eval"], "samples": 1})
    r = cli_run(write(tmp_path, fixed), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["ran"] == list(STAGES) and summary["tune"]["tuned"] is False
    out = fixed["out"]
    assert open(os.path.join(out, "data", "validation.jsonl")).read() == ""
    assert len(read_records(os.path.join(out, "traces-rsd", "rsd.train.jsonl"))) == 8  # every problem trains
    for arm in ("teacher", "rsd"):
        folder = summary["sft"]["models"][arm]
        assert folder == os.path.join(out, "sft", arm) and os.path.exists(os.path.join(folder, "model.safetensors"))
        assert not [n for n in os.listdir(folder) if n.startswith("checkpoint-")]
        assert summary["sft"]["runs"][arm]["global_step"] == 8  # 8 examples / batch 2 x 2 epochs
    assert summary["sft"]["hyperparameters"]["learning_rate"] == 1e-5
    assert "Fixed by the config (no tuning)." in open(os.path.join(out, "report", "report.md")).read()


# -------------------------------------------------------------------------------------------- bad input
def no_model_may_load(monkeypatch):
    import rsd_toolkit.models as models

    def refuse(*a, **kw):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_lm", refuse)


@pytest.mark.parametrize(
    "change,fragments",
    [
        (lambda c: c.update(epochs=3), ("unknown key 'epochs'; known keys: teacher, student",)),
        (lambda c: c["sft"].update(lr=1e-5), ("unknown key 'lr' in [sft]; known keys in [sft]: learning_rate",)),
        (lambda c: c["benchmarks"][0].update(level=[1]), ("unknown key 'level' in [[benchmarks]] #1", "levels")),
        (lambda c: c.update(validation="0.1"), ("validation must be a number; got '0.1'",)),
        (lambda c: c["sft"].update(learning_rate=-1.0), ("[sft] learning_rate must be > 0; got -1",)),
        (lambda c: c["rsd"].update(mode="teacher"), ("[rsd] mode: the two arms set it",)),
        (lambda c: c["tune"].update(dtype=["float32"]), ("[tune] dtype: not an SFT field a grid may vary",)),
        (lambda c: c.update(validation=0.0), ("[tune] needs a validation split",)),
        (lambda c: c["train"].update(source="/nonexistent/train.jsonl"), ("/nonexistent/train.jsonl: no such file",)),
        (lambda c: c["benchmarks"][0].update(source="asset:math-tran"), ("asset:math-tran is not a problem set", "asset:math500")),
        (lambda c: c["train"].update(levels=[7]), ("no problem of", "passes the filters", "widen them")),
        (lambda c: c["eval"].update(max_new_tokens=5000), ("benchmark 'toy': no problem fits the student's context (4096",
                                                           "[eval] max_new_tokens = 5000; lower it")),
        (lambda c: c["rsd"].update(draft_tokens=4), ("speculative RSD needs a same-tokenizer pair and this one is bridged",)),
        (lambda c: c.update(student=c["student"] + "-missing"), ("-missing",)),
    ],
)
def test_bad_input_is_one_line_before_any_model_loads(tiny, tmp_path, monkeypatch, change, fragments):
    _, config = tiny
    config = json.loads(json.dumps(config))
    config["out"] = str(tmp_path / "out")
    change(config)
    no_model_may_load(monkeypatch)
    one_line_error(cli_run(write(tmp_path, config)), *fragments)
    assert not os.path.exists(tmp_path / "out")  # nothing written


def test_train_benchmark_overlap_is_refused_by_id_and_by_normalised_question(tiny, tmp_path, monkeypatch):
    d, config = tiny
    no_model_may_load(monkeypatch)
    train_level_1 = next(r for r in TRAIN if r["level"] == 1)
    rows = [*HELD_OUT, {"id": "other", "problem": "  " + train_level_1["problem"].upper().replace(" ", "\n "), "answer": "1"}]
    (tmp_path / "leaky.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    leaky = {**config, "out": str(tmp_path / "out"), "benchmarks": [{"name": "toy", "source": str(tmp_path / "leaky.jsonl")}]}
    one_line_error(cli_run(write(tmp_path, leaky)), "1 problem(s) of benchmark 'toy' are also training problems (other (by question))",
                   "exclude_overlap = true")  # fmt: skip
    same_id = [*HELD_OUT, {"id": train_level_1["id"], "problem": "Something else entirely?", "answer": "1"}]
    (tmp_path / "same_id.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same_id))
    by_id = {**leaky, "benchmarks": [{"name": "toy", "source": str(tmp_path / "same_id.jsonl")}]}
    one_line_error(cli_run(write(tmp_path, by_id)), f"({train_level_1['id']} (by id))")
    r = cli_run(write(tmp_path, {**leaky, "exclude_overlap": True}), "--check")  # the fix the message names
    assert r.exit_code == 0 and "(1 dropped: in a benchmark)" in r.output and "to run: data, traces-teacher" in r.output


def test_missing_config_and_unknown_type_are_one_line(tmp_path):
    one_line_error(cli_run(str(tmp_path / "nope.toml")), "CONFIG", "nope.toml: no such file")
    (tmp_path / "c.yaml").write_text("teacher: x\n")
    one_line_error(cli_run(str(tmp_path / "c.yaml")), "unknown config type '.yaml'; use a .toml or .json file")
    (tmp_path / "c.toml").write_text("teacher = \n")
    one_line_error(cli_run(str(tmp_path / "c.toml")), "c.toml: not valid TOML")


def test_json_config_and_the_library_agree_with_the_toml(tiny, tmp_path):
    _, config = tiny
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert load_config(str(tmp_path / "c.json")) == load_config(write(tmp_path, config))
    assert ReplicateConfig.from_dict(config).sft.learning_rate == 1e-5  # [sft] default; [tune] varies it


def test_the_validation_split_is_stable_and_disjoint_and_overlap_normalises_text():
    problems = [Problem(i, f"id{i}", f"Q{i}", "1") for i in range(200)]
    train, val = split_validation(problems, 0.1)
    assert {p.id for p in train}.isdisjoint(p.id for p in val) and len(train) + len(val) == 200
    assert 8 <= len(val) <= 35  # about a tenth
    again_train, again_val = split_validation(list(reversed(problems[:150])), 0.1)  # order and the others do not matter
    assert {p.id for p in again_val} == {p.id for p in val if int(p.id[2:]) < 150}
    found = overlap([Problem(0, "a", "What is  2+2?", "4")], [Problem(0, "b", "what is 2+2?\n", "4"), Problem(1, "a", "x", "1")])
    assert [(p.id, how) for p, how in found] == [("b", "question"), ("a", "id")]


def test_the_shipped_configs_load_and_document_their_sizes():
    root = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")
    cpu = load_config(os.path.join(root, "cpu.toml"))
    assert (cpu.teacher, cpu.student) == ("asset:qwen-coder-0.5b", "asset:smollm2")
    assert cpu.train.source == "asset:math-train" and cpu.train.limit >= 500 and cpu.tune
    assert all(b.limit == 0 or b.limit >= 500 for b in cpu.benchmarks)
    gpu = load_config(os.path.join(root, "paper-gpu.toml"))
    assert (gpu.generate.attempts, gpu.sft.epochs, gpu.sft.learning_rate, gpu.sft.warmup_ratio, gpu.sft.batch_size) == (16, 15, 1e-5, 0.05, 16)
    assert gpu.sft.bf16 and gpu.train.source == "simplescaling/s1K-1.1" and gpu.student == "Qwen/Qwen3-0.6B" and not gpu.tune


def test_intervals_wilson_and_paired_bootstrap():
    from rsd_toolkit.evaluation import paired_bootstrap, wilson

    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # not [0, 0]: nothing solved is not certainty
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(2, 10)[0] < wilson(2.5, 10)[0] < wilson(3, 10)[0]  # fractional successes (pass@1 over k samples)
    assert wilson(25, 100)[1] - wilson(25, 100)[0] < wilson(2.5, 10)[1] - wilson(2.5, 10)[0]  # narrower with n
    base = [0.0, 1.0, 0.5, 1.0, 0.0, 0.5, 1.0, 0.0] * 5
    same = paired_bootstrap(base, base)
    assert same["change"] == 0 and same["change_ci95"] == [0.0, 0.0] and same["relative"] == 0
    shifted = paired_bootstrap(base, [x + 0.1 for x in base])  # the same shift on every problem: no spread at all
    assert shifted["change"] == pytest.approx(0.1) and shifted["change_ci95"] == pytest.approx([0.1, 0.1])
    assert shifted["relative"] == pytest.approx(0.1 / (sum(base) / len(base)))
    noisy = paired_bootstrap(base, [1.0 - x for x in base])
    low, high = noisy["change_ci95"]
    assert low < noisy["change"] < high and noisy["relative_ci95"][0] < noisy["relative"] < noisy["relative_ci95"][1]
    rare = paired_bootstrap([0.0] * 39 + [1.0], [0.0] * 40)  # the base is 0 in over 2.5 % of the resamples
    assert rare["relative"] == -1.0 and rare["relative_ci95"] is None
    assert paired_bootstrap([], [])["change"] is None

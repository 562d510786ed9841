"""`rsd eval`: answer extraction on real examples, pass@1 over k, --compare arithmetic, GPQA options, errors."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from click.testing import CliRunner

from conftest import tiny_lm
from rsd_toolkit.cli import cli
from rsd_toolkit.evaluation import (
    BENCHMARKS,
    EvalConfig,
    EvalError,
    compare,
    evaluate,
    load_benchmark,
    prompt_for,
    resolve_benchmark,
    score,
)
from rsd_toolkit.traces.answers import extract_choice, extract_for, gsm8k_reference, match_for
from rsd_toolkit.traces.data import Problem

GSM8K_SOLUTION = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                  "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18")  # fmt: skip


@pytest.mark.parametrize(
    "kind,output,reference,correct",
    [
        ("math", "Thus the probability is \\boxed{\\frac{3}{4}}.", "0.75", True),  # fraction vs decimal
        ("math", "\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", True),
        ("math", "\\boxed{0.333}", "\\frac{1}{3}", False),  # a rounded decimal is not the fraction
        ("math", "first \\boxed{2.5}, no wait: \\boxed{2.50}", "\\frac{5}{2}", True),  # the last box counts
        ("math", "\\boxed{(-\\infty, 2]}", "(-\\infty,2]", True),  # intervals
        ("math", "\\boxed{[0, 1)}", "(0,1)", False),
        ("math", "\\boxed{x \\in [2, 5)}", "[2,5)", True),
        ("math", "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # MATH-500
        ("math", "The answer is \\boxed{033}.", "33", True),  # AIME's three digits
        ("math", "no final answer", "33", False),
        ("gsm8k", "9 * 2 = 18 dollars.\n#### 18", gsm8k_reference(GSM8K_SOLUTION), True),
        ("gsm8k", "So she pays $1,080 in total.", "1080", True),  # last number, thousands comma
        ("gsm8k", "\\boxed{70,000}", "70000", True),
        ("gsm8k", "#### 17", "18", False),
        ("mc", "Therefore \\boxed{C}", "C", True),
        ("mc", "\\boxed{\\text{(D)}}", "D", True),
        ("mc", "\\boxed{B) 42 eV}", "B", True),
        ("mc", "After all that, the answer is (B).", "B", True),
        ("mc", "**Answer:** A", "B", False),
        ("mc", "the answer is a number we cannot pin down", "A", False),  # a lower-case word is not a letter
    ],
)
def test_answer_extraction_and_math_verify_on_real_examples(kind, output, reference, correct):
    assert match_for(kind, extract_for(kind, output), reference) is correct


def test_gsm8k_and_letter_extraction_values():
    assert gsm8k_reference(GSM8K_SOLUTION) == "18" and gsm8k_reference("#### 1,072") == "1072"
    assert gsm8k_reference("no marker") is None
    assert extract_for("gsm8k", "It costs $12.50, so #### 25") == "25" and extract_for("gsm8k", "none") is None
    assert extract_choice("\\boxed{E}") is None and extract_choice("\\boxed{E}", letters="ABCDE") == "E"
    assert extract_choice("Answer: C, though A was tempting") == "C"


def outputs(texts: list[str]) -> list[dict]:
    return [{"text": t, "finish_reason": "eos", "n_tokens": 10} for t in texts]


def test_pass_at_1_is_averaged_over_k_samples():
    problems = [Problem(0, "a", "q0", "1"), Problem(1, "b", "q1", "2"), Problem(2, "c", "q2", "3")]
    right, wrong = "\\boxed{%s}", "\\boxed{99}"
    texts = [right % 1] * 4 + [right % 2, wrong, right % 2, wrong] + [wrong] * 4  # 4/4, 2/4, 0/4
    result = score(problems, "math", outputs(texts), samples=4)
    assert [r["pass@1"] for r in result["problems"]] == [1.0, 0.5, 0.0]
    s = result["summary"]
    assert s["pass@1"] == pytest.approx(0.5) and s["samples"] == 4 and s["problems"] == 3
    assert s["per_sample"] == pytest.approx([2 / 3, 1 / 3, 2 / 3, 1 / 3])
    assert s["std"] == pytest.approx(math.sqrt(4 * (1 / 6) ** 2 / 3))
    assert result["problems"][1]["predicted"] == ["2", "99", "2", "99"]
    with pytest.raises(ValueError, match="11 outputs for 3 problems x 4 samples"):
        score(problems, "math", outputs(texts[:11]), samples=4)


def test_compare_gives_the_relative_change_against_the_baseline():
    def results(**p):
        return {"benchmarks": {k: {"summary": {"pass@1": v}} for k, v in p.items()}}

    c = compare(results(aime24=0.318, math500=0.62, gsm8k=0.5), results(aime24=0.4, math500=0.5, gpqa_diamond=0.3))
    assert set(c) == {"aime24", "math500"}  # only benchmarks in both files
    assert c["aime24"]["relative"] == pytest.approx(-0.205) and c["aime24"]["change"] == pytest.approx(-0.082)
    assert c["math500"]["relative"] == pytest.approx(0.24) and c["math500"]["baseline"] == 0.5
    assert compare(results(aime24=0.2), results(aime24=0.0))["aime24"]["relative"] is None  # no ratio to 0
    with pytest.raises(EvalError, match="no benchmark in common: results have gsm8k, the baseline has aime24"):
        compare(results(gsm8k=0.5), results(aime24=0.5))


def test_gpqa_options_are_shuffled_once_per_problem_and_the_letter_points_at_the_right_one(tmp_path):
    rows = [{"Record ID": f"rec{i}", "Question": f"Which particle {i}?", "Correct Answer": f"right {i}",
             "Incorrect Answer 1": f"wrong {i}a", "Incorrect Answer 2": f"wrong {i}b", "Incorrect Answer 3": f"wrong {i}c"}
            for i in range(8)]  # fmt: skip
    path = tmp_path / "gpqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = dataclasses.replace(BENCHMARKS["gpqa_diamond"], source=str(path), config=None)
    problems = load_benchmark(bench)
    for i, p in enumerate(problems):
        lines = p.question.splitlines()
        assert lines[0] == f"Which particle {i}?" and p.id == f"rec{i}"
        options = {line[0]: line[3:] for line in lines[2:]}
        assert sorted(options) == ["A", "B", "C", "D"] and options[p.answer] == f"right {i}"
    assert len({p.answer for p in problems}) > 1  # the right option is not always first
    assert [p.question for p in load_benchmark(bench, limit=3)] == [p.question for p in problems[:3]]  # stable
    prompt = prompt_for(problems[0], "mc", EvalConfig())
    assert prompt.startswith(problems[0].question) and "letter of the correct option within \\boxed{}" in prompt


def test_builtin_benchmarks_map_to_public_datasets():
    assert {b: (BENCHMARKS[b].source, BENCHMARKS[b].kind) for b in BENCHMARKS} == {
        "aime24": ("HuggingFaceH4/aime_2024", "math"), "aime25": ("yentinglin/aime_2025", "math"),
        "math500": ("HuggingFaceH4/MATH-500", "math"), "gpqa_diamond": ("Idavidrein/gpqa", "mc"),
        "gsm8k": ("openai/gsm8k", "gsm8k"),
    }  # fmt: skip
    assert resolve_benchmark("gsm8k").config == "main" and resolve_benchmark("math500", split="train").split == "train"


def test_gsm8k_references_are_the_number_after_the_marks(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "Eggs?", "answer": GSM8K_SOLUTION}) + "\n")
    (p,) = load_benchmark(resolve_benchmark(str(path), kind="gsm8k"))
    assert (p.question, p.answer) == ("Eggs?", "18")


def test_evaluate_scores_engine_outputs_per_problem(monkeypatch):
    import rsd_toolkit.evaluation as ev

    seen = {}

    def fake(model, prompts, seeds, config, progress=None):
        seen.update(prompts=prompts, seeds=seeds)
        return outputs(["\\boxed{A}", "\\boxed{B}", "\\boxed{B}", "\\boxed{B}"])

    monkeypatch.setattr(ev, "generate_hf", fake)
    bench = ev.Benchmark("mini", "x.jsonl", "train", None, None, "mc")
    problems = [Problem(0, "p", "Q0?", "A"), Problem(1, "q", "Q1?", "B")]
    result = evaluate(None, bench, problems, EvalConfig(samples=2))
    assert result["summary"]["pass@1"] == pytest.approx(0.75) and result["benchmark"]["kind"] == "mc"
    assert seen["prompts"][0] == seen["prompts"][1] and seen["prompts"][0].startswith("Q0?\n\nPlease reason")
    assert len(set(seen["seeds"])) == 4  # each (problem, sample) has its own seed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    lm = tiny_lm("asset:qwen2", "llama", hidden=32, layers=1, seed=7)
    d = tmp_path_factory.mktemp("eval_model")
    lm.model.save_pretrained(str(d))
    lm.tokenizer.save_pretrained(str(d))
    return str(d)


def eval_args(model_dir, bench, *extra):
    return ["eval", "--model", model_dir, "--benchmark", bench, "--question-field", "q", "--answer-field", "a",
            "--max-new-tokens", "6", "--device", "cpu", *extra]  # fmt: skip


def test_eval_end_to_end_samples_from_the_engine_writes_records_and_compares(model_dir, tmp_path):
    path = tmp_path / "local.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "q": f"What is {i} + 1?", "a": str(i + 1)}) + "\n" for i in range(4)))
    out = str(tmp_path / "r.json")
    r = CliRunner().invoke(cli, eval_args(model_dir, str(path), "--samples", "3", "--batch-size", "4", "--out", out))
    assert r.exit_code == 0, r.output
    assert "rsd eval · local" in r.output and "pass@1" in r.output
    res = json.loads(open(out).read())
    assert res["config"]["samples"] == 3 and res["config"]["temperature"] == 0.7
    local = res["benchmarks"]["local"]
    assert [p["id"] for p in local["problems"]] == ["p0", "p1", "p2", "p3"]
    assert all(len(p["texts"]) == 3 and len(p["correct"]) == 3 and p["reference"] == str(i + 1)
               for i, p in enumerate(local["problems"]))  # fmt: skip
    assert len({t for p in local["problems"] for t in p["texts"]}) > 4  # samples differ (T = 0.7, own seeds)
    assert local["summary"]["pass@1"] == sum(p["pass@1"] for p in local["problems"]) / 4
    from rsd_toolkit.engine import RSDEngine
    from rsd_toolkit.models import load_lm
    from rsd_toolkit.traces.pipeline import attempt_seed

    config = EvalConfig(samples=3, max_new_tokens=6)  # the same samples straight from the engine, teacher-only mode
    problems = load_benchmark(resolve_benchmark(str(path), "q", "a"))
    engine = RSDEngine(load_lm(model_dir, device="cpu"), None, config.rsd_config())
    traces = engine.generate([prompt_for(p, "math", config) for p in problems for _ in range(3)],
                             seeds=[attempt_seed(p.id, j) for p in problems for j in range(3)], batch_size=4)  # fmt: skip
    assert [t.text for t in traces] == [t for p in local["problems"] for t in p["texts"]]
    baseline = tmp_path / "base.json"
    baseline.write_text(json.dumps({"benchmarks": {"local": {"summary": {"pass@1": 0.5}}}}))
    rc = CliRunner().invoke(cli, eval_args(model_dir, str(path), "--samples", "1", "--compare", str(baseline), "--json"))
    assert rc.exit_code == 0, rc.output
    payload = json.loads(rc.output[rc.output.index("{\n") :])
    c = payload["compare"]["local"]
    assert c["baseline"] == 0.5 and c["relative"] == pytest.approx((c["pass@1"] - 0.5) / 0.5)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--benchmark", "aime23"], "unknown benchmark 'aime23'; known: aime24, aime25, gpqa_diamond, gsm8k, math500"),
        (["--benchmark", "missing.jsonl"], "missing.jsonl: no such file"),
        (["--benchmark", "aime24", "--compare", "nope.json"], "nope.json: no such results file"),
        (["--benchmark", "aime24", "--samples", "0"], "samples must be >= 1"),
    ],
)
def test_bad_eval_input_is_a_one_line_error(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["eval", "--model", "not-loaded", *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()) and "Traceback" not in r.output


def test_vllm_backend_without_vllm_says_how_to_install(monkeypatch, tmp_path):
    import rsd_toolkit.evaluation as ev

    monkeypatch.setattr(ev, "vllm_available", lambda: False)
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    r = CliRunner().invoke(cli, ["eval", "--model", "m", "--benchmark", str(path), "--backend", "vllm"])
    assert r.exit_code == 2 and "pip install vllm" in r.output


def test_eval_help_has_an_example():
    r = CliRunner().invoke(cli, ["eval", "--help"])
    assert r.exit_code == 0 and "Example" in r.output and "--samples" in r.output and "--compare" in r.output

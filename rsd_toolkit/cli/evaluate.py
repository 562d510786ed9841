"""``rsd eval``: pass@1 over k samples on built-in benchmarks or local files, and change against a baseline."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
import warnings

import click
from rich.table import Table

from ..checks import InputWarning
from ..evaluation import BENCHMARKS, EvalConfig
from ..traces.answers import ANSWER_KINDS
from .common import console, err_console, print_table
from .options import dataclass_options, model_options, output_file_option, pick
from .progress import Tracker


@click.command("eval", short_help="pass@1 over k samples on benchmarks; change vs a baseline.")
@click.option("--model", required=True, help="Model to evaluate: hub id, folder, .gguf file or asset:smollm2.")
@click.option("--benchmark", "benchmarks", required=True, multiple=True,
              help=f"{', '.join(sorted(BENCHMARKS))}, a local .jsonl/.json/.parquet/.csv file, or NAME=FILE (the name "
                   "results are stored and compared under). Repeatable.")
@output_file_option("--out", default=None, help="Write per-problem records and summaries to this JSON file.")
@click.option("--compare", "baseline", default=None, help="A results file of `rsd eval`: print the relative change against it.")
@click.option("--split", default=None, help="Dataset split (default: the benchmark's; train for local files).")
@click.option("--question-field", default=None, help="Question field of a local file (default: question, problem, prompt…).")
@click.option("--answer-field", default=None, help="Answer field of a local file (default: solution, answer…).")
@click.option("--kind", type=click.Choice(ANSWER_KINDS), default="math", show_default=True,
              help="Answer kind of a local file: math (\\boxed{} + math-verify), gsm8k (#### N), mc (option letter).")
@model_options(device_map="device-map")
@click.option("--json", "as_json", is_flag=True, help="Print the summaries (and comparison) as JSON on stdout.")
@dataclass_options(EvalConfig)
def evaluate(**kw) -> None:
    """Evaluate a model: k samples per problem with its chat template, pass@1 averaged over k.

    Math answers are the last \\boxed{} checked by math-verify; GSM8K references are the number after
    ####; GPQA-Diamond options are shuffled (once per problem) and the answer is a letter.

    \b
    Example: offline: the model of `rsd sft --help` against SmolLM2
      echo '{"problem": "What is 2 + 3?", "answer": "5"}' > p.jsonl
      rsd eval --model asset:smollm2 --benchmark toy=p.jsonl --out base.json
      rsd eval --model smollm2-rsd --benchmark toy=p.jsonl --compare base.json
    Hub benchmarks:
      rsd eval --model Qwen/Qwen3-0.6B --benchmark aime24 \\
          --benchmark math500 --samples 8 --out base.json
      rsd eval --model qwen3-0.6b-rsd --benchmark aime24 \\
          --benchmark math500 --samples 8 --compare base.json
    """
    from ..evaluation import comparable, compare, evaluate as run, load_benchmark, read_results, resolve_benchmark
    from ..traces.store import OutputLock, write_atomic

    config = EvalConfig(**pick(EvalConfig, kw))
    benches = [resolve_benchmark(b, kw["question_field"], kw["answer_field"], kw["split"], kw["kind"])
               for b in kw["benchmarks"]]  # fmt: skip
    baseline = read_results(kw["baseline"]) if kw["baseline"] else None
    if baseline is not None:  # before the first model loads, not after the whole evaluation
        common = comparable([b.name for b in benches], baseline, kw["baseline"])
        missing = [b.name for b in benches if b.name not in common]
        if missing:
            warnings.warn(f"--compare {kw['baseline']} has no {', '.join(missing)}: compared on {', '.join(common)} only",
                          InputWarning, stacklevel=1)  # fmt: skip
    problems = {b.name: load_benchmark(b, config.limit) for b in benches}
    lock = OutputLock(kw["out"]) if kw["out"] else contextlib.nullcontext()
    with lock:  # checked and held before the model loads: results are never computed for a path we cannot write
        model = _load_model(kw, config)
        results = {"model": kw["model"], "config": dataclasses.asdict(config), "benchmarks": {}}
        for b in benches:
            with Tracker(f"eval {b.name}", len(problems[b.name]) * config.samples, "samples") as progress:
                t0 = time.perf_counter()
                result = run(model, b, problems[b.name], config,
                             progress=lambda t, p=progress: p.advance(1, tokens=len(getattr(t, "ids", ()) or ())))  # fmt: skip
                result["summary"]["seconds"] = time.perf_counter() - t0
                results["benchmarks"][b.name] = result
                if kw["out"]:  # after each benchmark: a crash keeps the finished ones
                    write_atomic(kw["out"], json.dumps(results, indent=1, ensure_ascii=False))
    comparison = compare(results, baseline) if baseline else None
    if kw["as_json"]:
        payload = {"model": kw["model"], "summaries": {k: v["summary"] for k, v in results["benchmarks"].items()}}
        if comparison is not None:
            payload["compare"] = comparison
        click.echo(json.dumps(payload, indent=2))
        return
    for name, result in results["benchmarks"].items():
        _table(name, kw["model"], result["summary"])
    if comparison is not None:
        _compare_table(comparison, kw["baseline"])
    if kw["out"]:
        console.print(f"wrote {kw['out']}")


def _load_model(kw: dict, config: EvalConfig):
    if config.backend == "vllm":
        from ..evaluation import load_vllm

        return load_vllm(kw["model"], config, kw["trust_remote_code"])
    from ..models import load_lm
    from .generate import default_device

    device = None if kw["device_map"] else (kw["device"] or default_device())
    err_console.print(f"loading {kw['model']} on {kw['device_map'] or device}…")
    return load_lm(kw["model"], dtype=kw["dtype"], device=device, device_map=kw["device_map"],
                   trust_remote_code=kw["trust_remote_code"])  # fmt: skip


def _table(name: str, model: str, s: dict) -> None:
    table = Table(title=f"rsd eval · {name} · {model}")
    for col in ("problems", "samples (k)", "pass@1", "± std over samples", "mean tokens", "truncated"):
        table.add_column(col, justify="right")
    table.add_row(str(s["problems"]), str(s["samples"]), f"{s['pass@1']:.1%}",
                  f"{s['std']:.1%}" if s["samples"] > 1 else "–", f"{s['mean_tokens']:.0f}", f"{s['truncated']:.1%}")  # fmt: skip
    print_table(table)


def _compare_table(comparison: dict, baseline: str) -> None:
    table = Table(title=f"change against {baseline}")
    for col in ("benchmark", "baseline pass@1", "pass@1", "change (points)", "relative change"):
        table.add_column(col, justify="right")
    for name, c in comparison.items():
        rel = f"{c['relative']:+.1%}" if c["relative"] is not None else "– (baseline 0)"
        table.add_row(name, f"{c['baseline']:.1%}", f"{c['pass@1']:.1%}", f"{100 * c['change']:+.1f}", rel)
    print_table(table)

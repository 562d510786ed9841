"""Benchmark evaluation: k samples per problem from the model's chat template, pass@1 averaged over k.

Generation goes through ``RSDEngine`` in teacher-only mode with one model (the same sampler that writes
traces), or through vLLM when asked for and installed. Answers are checked by ``traces.answers``: the last
``\\boxed{}`` and math-verify for math, ``####`` numbers for GSM8K, option letters for GPQA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import random
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable

from .checks import InputError, InputWarning, input_file, number
from .config import ConfigError
from .traces.answers import ANSWER_KINDS, BOXED_INSTRUCTION, extract_for, gsm8k_reference, match_for
from .traces.data import DataError, Problem, load_problems, load_rows

BACKENDS = ("hf", "vllm")
LETTERS = "ABCD"
INSTRUCTIONS = {
    "math": BOXED_INSTRUCTION,
    "gsm8k": BOXED_INSTRUCTION,
    "mc": "Please reason step by step, and put the letter of the correct option within \\boxed{}.",
}


class EvalError(InputError):
    """A benchmark, results file or option we cannot evaluate with; the message says what to pass."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    source: str  # hub dataset id or local file
    split: str
    question_field: str | None
    answer_field: str | None
    kind: str  # math | gsm8k | mc
    config: str | None = None  # hub dataset config
    distractor_fields: tuple[str, ...] = ()  # mc: wrong options, shuffled with the right one


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", "math"),
        Benchmark("aime25", "yentinglin/aime_2025", "train", "problem", "answer", "math"),
        Benchmark("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", "math"),
        Benchmark("gpqa_diamond", "Idavidrein/gpqa", "train", "Question", "Correct Answer", "mc", "gpqa_diamond",
                  ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")),  # fmt: skip
        Benchmark("gsm8k", "openai/gsm8k", "test", "question", "answer", "gsm8k", "main"),
    )
}


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class EvalConfig:
    samples: int = _f(1, "Samples per problem (k); pass@1 is averaged over them.")
    temperature: float = _f(0.7, "Sampling temperature (0 = greedy).")
    top_p: float = _f(0.95, "Nucleus sampling mass (1 = off).")
    max_new_tokens: int = _f(4096, "Generation budget per sample, in tokens.")
    batch_size: int = _f(16, "Sequences decoded together.")
    seed: int = _f(0, "Base seed; each (problem, sample) has its own stream, so results do not depend on batching.")
    limit: int = _f(0, "Use only the first N problems of each benchmark (0 = all).")
    instruction: bool = _f(True, "Append the answer-format instruction (\\boxed{} answer / option letter) to each question.")
    chat_template: bool = _f(True, "Wrap questions in the model's chat template (when it has one).")
    backend: str = _f("hf", "hf: the toolkit's engine (teacher-only mode); vllm: vLLM, when installed.", choices=BACKENDS)

    def __post_init__(self):
        for name in ("samples", "batch_size", "max_new_tokens"):
            number(getattr(self, name), name, low=1, error=ConfigError)
        number(self.limit, "limit (0 = all)", low=0, error=ConfigError)
        number(self.temperature, "temperature", low=0, error=ConfigError)
        number(self.top_p, "top_p", low=0, high=1, low_open=True, error=ConfigError)
        number(self.seed, "seed", low=0, error=ConfigError)
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")

    def rsd_config(self):
        from .config import RSDConfig

        return RSDConfig(mode="teacher", temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                         max_new_tokens=self.max_new_tokens, chat_template=self.chat_template)  # fmt: skip


# ------------------------------------------------------------------------------------------ problems
def resolve_benchmark(
    name: str, question_field: str | None = None, answer_field: str | None = None, split: str | None = None,
    kind: str = "math",
) -> Benchmark:  # fmt: skip
    """A built-in benchmark by name, or a local file (its fields from the arguments or the usual defaults).

    ``NAME=PATH`` names a local file (the name its results are stored and compared under); a plain path
    is named by its file name without extension."""
    label, sep, path = name.partition("=")
    if sep and label and path and name not in BENCHMARKS and not os.path.exists(name):
        if not re.fullmatch(r"[\w.-]+", label):
            raise EvalError(f"--benchmark {name!r}: a name before '=' may hold letters, digits, '.', '-' and '_' only")
        return dataclasses.replace(resolve_benchmark(path, question_field, answer_field, split, kind), name=label)
    if name in BENCHMARKS:
        b = BENCHMARKS[name]
        return dataclasses.replace(b, split=split or b.split, question_field=question_field or b.question_field,
                                   answer_field=answer_field or b.answer_field)  # fmt: skip
    if name.startswith("asset:"):  # a fetched problem file (`rsd assets fetch --group benchmarks`)
        from .assets import BENCHMARKS as FETCHED

        if name[len("asset:") :] not in FETCHED:
            raise EvalError(f"{name} is not a problem set; problem assets: {', '.join('asset:' + b for b in FETCHED)}")
        stem = name[len("asset:") :]
        return Benchmark(stem, name, "train", question_field, answer_field, "gsm8k" if stem.startswith("gsm8k") else "math")
    ext = os.path.splitext(name)[1].lower()
    if os.path.isfile(name) or ext in (".jsonl", ".json", ".parquet", ".csv"):
        if not os.path.exists(name):
            raise EvalError(f"{name}: no such file")
        if kind not in ANSWER_KINDS:
            raise EvalError(f"answer kind must be one of {', '.join(ANSWER_KINDS)}; got {kind!r}")
        stem = os.path.splitext(os.path.basename(name))[0]
        return Benchmark(stem, name, split or "train", question_field, answer_field, kind)
    raise EvalError(
        f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))}, or a local .jsonl/.json/.parquet/.csv "
        "file with --question-field/--answer-field"
    )


def load_benchmark(bench: Benchmark, limit: int = 0) -> list[Problem]:
    """The benchmark's problems; multiple-choice options shuffled once per problem (stable across runs)."""
    if bench.kind == "mc" and bench.distractor_fields:
        return _multiple_choice(bench, limit)
    problems = load_problems(bench.source, bench.split, bench.question_field, bench.answer_field,
                             limit or None, bench.config)  # fmt: skip
    if bench.kind == "gsm8k":  # the reference solution ends with "#### N"
        problems = [dataclasses.replace(p, answer=gsm8k_reference(p.answer) or p.answer) for p in problems]
    if bench.kind == "mc":
        problems = [dataclasses.replace(p, answer=p.answer.strip().strip("()").upper()) for p in problems]
        not_letters = [p for p in problems if not re.fullmatch(r"[A-Z]", p.answer)]
        if len(not_letters) == len(problems):
            raise EvalError(f"{bench.source}: --kind mc needs option letters as answers (A, B, …), got "
                            f"{not_letters[0].answer!r}; use --kind math or --kind gsm8k for these answers")  # fmt: skip
        if not_letters:
            warnings.warn(f"{bench.source}: {len(not_letters)} of {len(problems)} answers are not option letters "
                          f"(first: problem {not_letters[0].id}, {not_letters[0].answer!r}); they can never be "
                          "scored correct", InputWarning, stacklevel=2)  # fmt: skip
    return problems


def _multiple_choice(bench: Benchmark, limit: int) -> list[Problem]:
    rows = load_rows(bench.source, bench.split, bench.config)
    if not rows:
        raise DataError(f"{bench.source}: the dataset is empty")
    rows = rows[:limit] if limit else rows
    needed = [bench.question_field, bench.answer_field, *bench.distractor_fields]
    missing = [f for f in needed if f not in rows[0]]
    if missing:
        raise DataError(f"{bench.source}: no field(s) {', '.join(missing)}; fields: {', '.join(rows[0])}")
    problems = []
    for i, row in enumerate(rows):
        pid = str(row.get("Record ID") or row.get("id") or i)
        options = [str(row[bench.answer_field]).strip()] + [str(row[f]).strip() for f in bench.distractor_fields]
        order = list(range(len(options)))
        random.Random(f"{bench.name}/{pid}").shuffle(order)
        listed = "\n".join(f"{LETTERS[k]}) {options[j]}" for k, j in enumerate(order))
        question = f"{str(row[bench.question_field]).strip()}\n\n{listed}"
        problems.append(Problem(i, pid, question, LETTERS[order.index(0)]))
    return problems


def prompt_for(problem: Problem, kind: str, config: EvalConfig) -> str:
    return f"{problem.question}\n\n{INSTRUCTIONS[kind]}" if config.instruction else problem.question


# ------------------------------------------------------------------------------------------- scoring
def score(problems: list[Problem], kind: str, outputs: list[dict], samples: int) -> dict:
    """Per-problem records and the summary from ``samples`` outputs per problem (problem-major order).

    ``outputs[i]``: ``{"text", "finish_reason", "n_tokens"}``. pass@1 = mean over problems of the share of
    correct samples; ``per_sample`` is the accuracy of sample j over all problems (its spread is ``std``).
    """
    if len(outputs) != len(problems) * samples:
        raise ValueError(f"{len(outputs)} outputs for {len(problems)} problems x {samples} samples")
    records = []
    for i, p in enumerate(problems):
        outs = outputs[i * samples : (i + 1) * samples]
        predicted = [extract_for(kind, o["text"]) for o in outs]
        correct = [match_for(kind, a, p.answer) for a in predicted]
        records.append({
            "id": p.id, "index": p.index, "question": p.question, "reference": p.answer, "predicted": predicted,
            "correct": correct, "pass@1": sum(correct) / samples, "finish_reasons": [o["finish_reason"] for o in outs],
            "n_tokens": [o["n_tokens"] for o in outs], "texts": [o["text"] for o in outs],
        })  # fmt: skip
    n = len(records)
    per_sample = [sum(r["correct"][j] for r in records) / n for j in range(samples)] if n else []
    mean = sum(r["pass@1"] for r in records) / n if n else float("nan")
    std = math.sqrt(sum((x - mean) ** 2 for x in per_sample) / (samples - 1)) if samples > 1 else 0.0
    tokens = [t for r in records for t in r["n_tokens"]]
    summary = {
        "problems": n, "samples": samples, "pass@1": mean, "per_sample": per_sample, "std": std,
        "mean_tokens": sum(tokens) / len(tokens) if tokens else 0.0,
        "truncated": sum(f == "length" for r in records for f in r["finish_reasons"]) / max(1, len(tokens)),
    }  # fmt: skip
    return {"summary": summary, "problems": records}


# ---------------------------------------------------------------------------------------- generation
def generate_hf(lm, prompts: list[str], seeds: list[int], config: EvalConfig, progress: Callable | None = None) -> list[dict]:
    """Samples from the toolkit's engine with one model (teacher-only mode)."""
    from .engine import RSDEngine

    engine = RSDEngine(lm, None, config.rsd_config())
    traces = engine.generate(prompts, seeds=seeds, batch_size=config.batch_size, progress=progress)
    return [{"text": t.text, "finish_reason": t.finish_reason, "n_tokens": len(t.ids)} for t in traces]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def generate_vllm(llm, prompts: list[str], seeds: list[int], config: EvalConfig, progress: Callable | None = None) -> list[dict]:
    """Samples from a ``vllm.LLM`` (chat template applied by vLLM), one seed per sample."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_new_tokens,
                             seed=s) for s in seeds]  # fmt: skip
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    results = []
    for o in outs:
        c = o.outputs[0]
        results.append({"text": c.text, "finish_reason": "eos" if c.finish_reason == "stop" else "length",
                        "n_tokens": len(c.token_ids)})  # fmt: skip
        if progress is not None:
            progress(None)
    return results


def load_vllm(model: str, config: EvalConfig, trust_remote_code: bool = False):
    if not vllm_available():
        raise EvalError("--backend vllm needs vLLM, which is not installed: pip install vllm (or use --backend hf)")
    from vllm import LLM

    from .models import resolve_model_dir

    return LLM(model=resolve_model_dir(model), seed=config.seed, trust_remote_code=trust_remote_code)


def evaluate(model, bench: Benchmark, problems: list[Problem], config: EvalConfig, progress: Callable | None = None) -> dict:
    """Evaluate one benchmark: ``model`` is an ``LM`` (backend hf) or a ``vllm.LLM`` (backend vllm)."""
    from .traces.pipeline import attempt_seed

    k = config.samples
    skipped = []
    if config.backend == "hf" and getattr(model, "context_length", None) is not None:  # vLLM checks its own
        from .traces.pipeline import context_overflow, describe_too_long

        rsd = config.rsd_config()
        over = [context_overflow([model], prompt_for(p, bench.kind, config), rsd) for p in problems]
        skipped = [(p, *o) for p, o in zip(problems, over) if o is not None]
        problems = [p for p, o in zip(problems, over) if o is None]
        if skipped:
            warnings.warn(f"{bench.name}: {describe_too_long(skipped, config.max_new_tokens)}", InputWarning, stacklevel=2)
        if not problems:
            raise EvalError(f"{bench.name}: no problem fits the model's context; lower --max-new-tokens")
    prompts = [prompt_for(p, bench.kind, config) for p in problems for _ in range(k)]
    seeds = [attempt_seed(p.id, j) for p in problems for j in range(k)]
    generate = generate_vllm if config.backend == "vllm" else generate_hf
    result = score(problems, bench.kind, generate(model, prompts, seeds, config, progress), k)
    info = {"name": bench.name, "source": bench.source, "split": bench.split, "kind": bench.kind, "config": bench.config,
            "skipped_too_long": [p.id for p, _, _ in skipped]}  # fmt: skip
    return {"benchmark": info, **result}


# ------------------------------------------------------------------------------------------- compare
def comparable(names: list[str], baseline: dict, path: str) -> list[str]:
    """The benchmarks of this run that the baseline also has; none is an error (raised before any model loads)."""
    old = list(baseline.get("benchmarks", {}))
    common = [n for n in names if n in old]
    if not common:
        raise EvalError(f"--compare {path}: no benchmark in common (this run: {', '.join(names)}; the baseline: "
                        f"{', '.join(old) or 'none'}); name a local file as in the baseline with --benchmark NAME=PATH")  # fmt: skip
    return common


def compare(results: dict, baseline: dict) -> dict[str, dict]:
    """Per benchmark in both files: pass@1 of each, absolute change and relative change ``(new - old) / old``.

    The paper reports the relative change this way (-20.5 % for direct distillation, +4.9 % for RSD).
    """
    new, old = results.get("benchmarks", {}), baseline.get("benchmarks", {})
    common = [b for b in new if b in old]
    if not common:
        raise EvalError(f"no benchmark in common: results have {', '.join(new) or 'none'}, the baseline has "
                        f"{', '.join(old) or 'none'}")  # fmt: skip
    out = {}
    for b in common:
        x, base = new[b]["summary"]["pass@1"], old[b]["summary"]["pass@1"]
        out[b] = {"pass@1": x, "baseline": base, "change": x - base, "relative": (x - base) / base if base else None}
    return out


def read_results(path: str) -> dict:
    """A results file of `rsd eval`."""
    import json

    if not os.path.exists(path):
        raise EvalError(f"{path}: no such results file; write one with `rsd eval … --out {path}`")
    input_file(path, "--compare")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise EvalError(f"{path}: not a results file of `rsd eval` (no 'benchmarks')")
    return data


# ----------------------------------------------------------------------------------------- intervals
def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % at z = 1.96); unlike mean ± 1.96 s.e. it stays inside [0, 1]
    and is not [0, 0] when nothing succeeded. ``successes`` may be fractional (pass@1 x problems over k samples:
    then the interval is conservative, averaging k samples only narrows the spread)."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_bootstrap(base: list[float], new: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """Change of ``new`` against ``base`` (per-problem scores of the same problems, in the same order): the mean
    difference and the relative change ``(new - base) / base``, each with a 95 % percentile interval from
    resampling problems (pairs stay together, so the problems both students find easy cancel out).

    The relative interval is None when more than 2.5 % of the resamples have a base of 0 (no ratio to take)."""
    import torch

    if len(base) != len(new):
        raise ValueError(f"{len(base)} base scores for {len(new)} new ones")
    n = len(base)
    if n == 0:
        return {"change": None, "change_ci95": None, "relative": None, "relative_ci95": None}
    b, x = torch.tensor(base, dtype=torch.float64), torch.tensor(new, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)
    bm, xm = b[idx].mean(1), x[idx].mean(1)

    def interval(values: torch.Tensor) -> list[float]:
        q = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64))
        return [float(q[0]), float(q[1])]

    base_mean, new_mean = float(b.mean()), float(x.mean())
    positive = bm > 0
    relative_ci = interval((xm[positive] - bm[positive]) / bm[positive]) if positive.float().mean() >= 0.975 else None
    return {"change": new_mean - base_mean, "change_ci95": interval(xm - bm),
            "relative": (new_mean - base_mean) / base_mean if base_mean > 0 else None, "relative_ci95": relative_ci}

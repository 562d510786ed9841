"""Problems in, verified RSD traces out: rejection sampling, filters, UPFT prefixes, one record per problem.

For each problem the engine generates ``attempts`` traces (rows of one batch); the shortest trace whose
final answer math-verify accepts and that passes the filters is kept. A problem none solves keeps the
first ``upft_tokens`` student tokens of its first trace as a ``upft_prefix`` record (hybrid UPFT).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, replace

from ..config import GenerateOptions, RSDConfig
from ..engine import RSDEngine, Trace
from ..engine.trace import sub_pth
from .answers import BOXED_INSTRUCTION, answers_match, extract_answer
from .data import Problem
from .store import TraceFile


def think_end_marker(engine: RSDEngine) -> str | None:
    """The student's end-of-think marker, when its chat template uses one."""
    vocab = engine.student.vocab
    marker = vocab.added.get(vocab.roles.get("think_end", -1))
    template = getattr(engine.student.tokenizer, "chat_template", None) or ""
    return marker if marker and marker in str(template) else None


def attempt_seed(problem_id: str, attempt: int) -> int:
    """Stable across runs and shards: a rerun regenerates the same traces."""
    digest = hashlib.blake2b(f"{problem_id}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def judge(trace: Trace, problem: Problem, opts: GenerateOptions, marker: str | None, mode: str) -> tuple[str | None, bool, list[str]]:
    """(predicted answer, correct, failed filters)."""
    predicted = extract_answer(trace.text, opts.answer_patterns)
    failed = []
    if opts.require_eos and trace.finish_reason != "eos":
        failed.append("no_eos")
    if marker and opts.require_think and trace.text.count(marker) != 1:
        failed.append("think_malformed")
    if mode == "rsd" and trace.acceptance_rate is not None and 1 - trace.acceptance_rate > opts.max_fallback_rate:
        failed.append("fallback_rate")
    return predicted, answers_match(predicted, problem.answer), failed


def choose(problem: Problem, traces: list[Trace], engine: RSDEngine, opts: GenerateOptions) -> dict:
    """The record kept for a problem: shortest correct, filtered trace, else the UPFT prefix."""
    marker = think_end_marker(engine)
    verdicts = [judge(t, problem, opts, marker, engine.config.mode) for t in traces]
    reasons = Counter(r for _, ok, failed in verdicts if ok for r in failed)
    reasons["no_answer"] = sum(predicted is None for predicted, _, _ in verdicts)  # nothing extracted (no \boxed{})
    reasons["wrong_answer"] = sum(predicted is not None and not ok for predicted, ok, _ in verdicts)
    good = [i for i, (_, ok, failed) in enumerate(verdicts) if ok and not failed]
    if good:
        best = min(good, key=lambda i: len(traces[i].ids))
        trace, kind, ids, text = traces[best], "full", traces[best].ids, traces[best].text
    else:
        best, trace, kind = 0, traces[0], "upft_prefix"
        ids = trace.ids[: opts.upft_tokens]
        text = engine.student.vocab.text_of([i for i in ids if i not in engine.student.stop_ids])
    record = {
        "id": problem.id, "index": problem.index, "question": problem.question, "reference": problem.answer,
        "prompt": trace.student_prompt, "text": text, "ids": list(ids), "kind": kind, "correct": bool(good),
        "predicted": verdicts[best][0], "attempts": len(traces), "correct_attempts": sum(ok for _, ok, _ in verdicts),
        "kept_attempts": len(good), "rejected": dict(reasons), "finish_reason": trace.finish_reason,
        "acceptance_rate": trace.acceptance_rate, "sub_pth": sub_pth(trace.records[: len(ids)], trace.pth),
        "last_resorts": sum(r.last_resort for r in trace.records[: len(ids)]), "n_tokens": len(ids),
        "teacher": engine.teacher.name, "student": engine.student.name,
    }  # fmt: skip
    if opts.token_stats:
        record["records"] = [asdict(r) for r in trace.records[: len(ids)]]
    return record


def with_instruction(problems: list[Problem], opts: GenerateOptions) -> list[Problem]:
    """The problems as the models see them: each question followed by the answer instruction (unless
    ``opts.instruction`` is off). The record's ``question`` is this text, so SFT trains on the same prompt."""
    if not opts.instruction:
        return list(problems)
    return [replace(p, question=f"{p.question}\n\n{BOXED_INSTRUCTION}") for p in problems]


def run_config(teacher: str, student: str, bridge: str, config: RSDConfig, opts: GenerateOptions, dataset: dict) -> dict:
    """What a trace file's records must agree on to be continued (known before any model loads)."""
    keep = {k: v for k, v in asdict(opts).items() if k != "batch_size"}
    keep["answer_patterns"] = list(opts.answer_patterns)
    keep["instruction"] = BOXED_INSTRUCTION if opts.instruction else None
    return {"teacher": teacher, "student": student, "bridge": bridge, "rsd": config.to_dict(), "generate": keep,
            "dataset": dataset}  # fmt: skip


def context_overflow(lms: list, prompt: str, config: RSDConfig) -> tuple[str, int] | None:
    """``(model name, tokens over)`` for the model whose context ``prompt`` plus ``max_new_tokens`` overflows
    most, or None when it fits every model (a model without a stated context always fits)."""
    over = [(lm.name, len(lm.prompt(prompt, config)[1]) + config.max_new_tokens - lm.context_length)
            for lm in lms if lm.context_length is not None]  # fmt: skip
    worst = max(over, key=lambda x: x[1], default=None)
    return worst if worst is not None and worst[1] > 0 else None


def fit_context(engine: RSDEngine, problems: list[Problem]) -> tuple[list[Problem], list[tuple[Problem, str, int]]]:
    """Split problems into those whose prompt plus ``max_new_tokens`` fits every running model's context and
    those that do not: ``(fitting, [(problem, model name, tokens over), …])``.

    Positions past a model's trained range decode garbage (and a huge prompt sits in prefill for minutes),
    so such problems are skipped, not run. Across tokenizers the budget is counted in student tokens for
    both models, an approximation for the teacher.
    """
    lms = [lm for lm, runs in ((engine.teacher, engine.run_teacher), (engine.student, engine.run_student)) if runs]
    fitting, skipped = [], []
    for problem in problems:
        over = context_overflow(lms, problem.question, engine.config)
        if over is None:
            fitting.append(problem)
        else:
            skipped.append((problem, *over))
    return fitting, skipped


def describe_too_long(skipped: list[tuple[Problem, str, int]], budget: int) -> str:
    """One line: how many problems were skipped and by how much the first ones overflow."""
    first = ", ".join(f"{p.id} by {over} tokens ({name})" for p, name, over in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (f"{len(skipped)} problem(s) skipped: prompt + --max-new-tokens {budget} exceeds the model's context "
            f"({first}{more}); lower --max-new-tokens or shorten them")  # fmt: skip


def generate_traces(engine: RSDEngine, problems: list[Problem], store: TraceFile, opts: GenerateOptions,
                    on_problem=None, on_trace=None) -> list[dict]:  # fmt: skip
    """Generate, judge and store every problem not yet in ``store``; returns the new records.

    A problem's record is written as soon as its last attempt finishes (not at the end of a batch), so a
    kill loses only problems still being decoded.
    """
    todo = [p for p in problems if not store.done(p.id)]
    # One engine call for every problem: finished rows are refilled up to the last prompt, and each trace goes to
    # ``trace_done`` without being kept. (Calls over slices of 4 batches each drained the batch at their end, where
    # the last rows run with few others: README, "many prompts".)
    prompts = [p.question for p in todo for _ in range(opts.attempts)]
    seeds = [attempt_seed(p.id, k) for p in todo for k in range(opts.attempts)]
    finished: dict[int, list[Trace]] = {}
    written = []

    def trace_done(trace: Trace) -> None:
        if on_trace is not None:
            on_trace(trace)
        i = trace.index // opts.attempts
        finished.setdefault(i, []).append(trace)
        if len(finished[i]) == opts.attempts:
            traces = sorted(finished.pop(i), key=lambda t: t.index)
            record = choose(todo[i], traces, engine, opts)
            store.append(record)
            written.append(record)
            if on_problem is not None:
                on_problem(record)

    if prompts:
        engine.generate(prompts, seeds=seeds, batch_size=opts.batch_size, progress=trace_done, keep=False)
    return written

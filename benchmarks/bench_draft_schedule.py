"""Should a row's draft length adapt to its acceptance history? Fixed K against adaptive schedules, from real
acceptance probabilities and this machine's own forward costs, measured in one run.

Speculative RSD commits exactly RSD's distribution whatever K a round uses, so any schedule that looks only
at a row's past keeps traces exact; the question is speed. Measured here:

1. Step-RSD traces of the speculative workload's pair (SmolLM2-135M teacher, the distilled same-tokenizer
   student of ``students.py``). Speculation has the same law, so these are its traces too. Traces that
   loop (distinct 4-grams below ``bench_engine.LOOP_BELOW``) are left out, as in ``bench_engine``: a
   drafter on a loop looks perfect.
2. At every generated position i: the draft acceptance ``alpha_i = sum_y min(q_i(y), g_i(y))`` (q: RSD's
   next-token distribution, ``speculative.rsd_target``; g: the student's draft distribution), computed from
   one full forward of each model over prompt + trace, with the library's own functions.
3. This machine's costs at batch 1: one student step, and one teacher verify forward over 1..K+1 positions
   (``bench_engine.per_model_step_ms`` / ``verify_ms``, the forwards speculation runs).
4. Each schedule replayed over the alpha sequences (a draft at position i kept with probability alpha_i,
   until the first rejection; 50 seeded replays): tokens per round and forward cost per round, against
   step RSD's forward cost per token. Round overheads outside the forwards are left out (the same bound as
   ``bench_engine``'s ``spec_over_step_bound``).

Usage:  python benchmarks/bench_draft_schedule.py [--prompts 8] [--new-tokens 512] > results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import LOOP_BELOW, REAL_PROMPTS, at_least_one, no_stops, per_model_step_ms, verify_ms  # noqa: E402
from students import distinct_4grams, load_distilled_student  # noqa: E402

from rsd_toolkit.config import RSDConfig  # noqa: E402
from rsd_toolkit.engine import RSDEngine, sampling, speculative  # noqa: E402
from rsd_toolkit.models import load_lm  # noqa: E402

REPLAYS = 50
MAX_K = 8


@torch.inference_mode()
def alphas(teacher, student, prompt: str, ids: list[int], config: RSDConfig) -> list[float]:
    """alpha_i for every generated token of one trace: what a draft from g at position i is kept with."""
    context = student.prompt(prompt, config)[1] + ids
    x = torch.tensor([context])
    T = sampling.fit_vocab(teacher.model(x).logits[0], teacher.vocab.size)  # [L, V]
    S = sampling.fit_vocab(student.model(x).logits[0], student.vocab.size)
    at = slice(len(context) - len(ids) - 1, len(context) - 1)  # the logits predicting each generated token
    T, S = T[at], S[at]
    g = speculative.draft_probs(S, config)
    q, _ = speculative.rsd_target(speculative.teacher_probs(T, config), S, config, g)
    return torch.minimum(q, g).sum(-1).tolist()


def replay(seq: list[float], schedule, student_ms: float, verify: dict[int, float], rng: random.Random) -> tuple[int, float]:
    """Tokens committed and forward milliseconds spent decoding one alpha sequence under ``schedule``."""
    i = tokens = 0
    cost, last = 0.0, None
    state: dict = {}
    while i < len(seq):
        K = schedule(state, last)
        kept = 0
        while kept < K and i + kept < len(seq) and rng.random() < seq[i + kept]:
            kept += 1
        i += kept + 1
        tokens += kept + 1
        cost += (K + 1) * student_ms + verify[K + 1]  # K drafts + the step after the last, one verify
        last = (K, kept)
    return tokens, cost


def fixed(k: int):
    return lambda state, last: k


def additive(start: int, up: int, down: int, most: int):
    """Longer after a round whose drafts were all kept, shorter after one that was cut (HF assisted
    generation's ``heuristic`` schedule is up=2, down=1)."""

    def schedule(state: dict, last) -> int:
        if last is None:
            state["k"] = start
        else:
            K, kept = last
            state["k"] = min(most, K + up) if kept == K else max(1, K - down)
        return state["k"]

    return schedule


def cpu_model() -> str:
    """The CPU's model name (small-batch GEMM speed differs a lot between CPU vendors' kernels)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=at_least_one, default=16, help="traces (the engine benchmark's real prompts, each with its own seed)")
    ap.add_argument("--new-tokens", type=at_least_one, default=512)
    args = ap.parse_args()
    config = RSDConfig(mode="rsd", max_new_tokens=args.new_tokens)
    teacher = no_stops(load_lm("asset:smollm2", dtype="float32", device="cpu"))
    student = no_stops(load_distilled_student("cpu"))
    prompts = (REAL_PROMPTS * 8)[: args.prompts]
    traces = RSDEngine(teacher, student, config).generate(prompts, seeds=list(range(len(prompts))), batch_size=len(prompts))
    text = [(p, t) for p, t in zip(prompts, traces) if distinct_4grams(t.ids) >= LOOP_BELOW]  # a loop drafts itself
    if not text:
        sys.exit(f"bench_draft_schedule: all {len(traces)} traces loop (distinct 4-grams below {LOOP_BELOW:.0%} of them), nothing to replay; use more --prompts or --new-tokens")
    seqs = [alphas(teacher, student, p, t.ids, config) for p, t in text]
    step = per_model_step_ms(teacher, student, 1, "cpu", steps=32)
    verify = verify_ms(teacher, 1, "cpu", list(range(1, MAX_K + 2)))
    step_ms_per_token = step["teacher"] + step["student"]  # step RSD: one forward of each per token
    schedules = {f"fixed_{k}": (lambda k=k: fixed(k)) for k in range(1, MAX_K + 1)}
    for most in (4, MAX_K):
        schedules[f"additive_+1-1_max{most}"] = lambda most=most: additive(2, 1, 1, most)
        schedules[f"additive_+2-1_max{most}"] = lambda most=most: additive(2, 2, 1, most)
    rows = []
    for name, make in schedules.items():
        tokens = cost = 0.0
        for r in range(REPLAYS):
            rng = random.Random(r)
            for seq in seqs:
                t, c = replay(seq, make(), step["student"], verify, rng)
                tokens, cost = tokens + t, cost + c
        rows.append({"schedule": name, "tokens_per_round_cost_ms": round(cost / tokens, 2),
                     "speedup_over_step_bound": round(step_ms_per_token / (cost / tokens), 3)})  # fmt: skip
    best_fixed = max((r for r in rows if r["schedule"].startswith("fixed")), key=lambda r: r["speedup_over_step_bound"])
    best_adaptive = max((r for r in rows if not r["schedule"].startswith("fixed")), key=lambda r: r["speedup_over_step_bound"])
    report = {
        "machine": {"cores": os.cpu_count(), "threads": torch.get_num_threads(), "cpu": cpu_model(),
                    "load_at_end": os.getloadavg()},  # fmt: skip
        "pair": {"teacher": "SmolLM2-135M-Instruct (asset:smollm2)", "student": student.name},
        "traces": len(traces), "new_tokens": args.new_tokens, "loop_below_distinct_4grams": LOOP_BELOW,
        "distinct_4grams_per_trace": [round(distinct_4grams(t.ids), 3) for t in traces],
        "text_traces_replayed": len(seqs), "alpha_mean_per_text_trace": [round(sum(s) / len(s), 3) for s in seqs],
        "student_step_ms": step["student"], "teacher_step_ms": step["teacher"],
        "verify_ms_by_width": verify, "verify_over_teacher_step_by_width": {w: v / step["teacher"] for w, v in verify.items()},
        "replays": REPLAYS, "rows": rows,
        "best_fixed": best_fixed, "best_adaptive": best_adaptive,
        "adaptive_over_best_fixed": round(best_adaptive["speedup_over_step_bound"] / best_fixed["speedup_over_step_bound"], 3),
    }  # fmt: skip
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""A same-tokenizer student whose RSD traces are text, shared by the fidelity and engine benchmarks.

SmolLM2-135M-Instruct cut to its first ``LAYERS`` decoder layers keeps the teacher's tokenizer and real
weights, but raw it puts its mass on a few tokens and its own samples loop. A short distillation with the
project's own ``rsd sft`` code on the teacher's own traces (teacher mode, simple math prompts) aligns its
head with the teacher, so that RSD with the SmolLM2 teacher accepts most proposals and the student's own
tokens read as text. Built once (~25 min on 2 cores) and cached under ``$RSD_CACHE/students/``,
keyed by ``VERSION`` (bump it when anything below changes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from rsd_toolkit.assets import cache_dir
from rsd_toolkit.config import RSDConfig
from rsd_toolkit.models import LM

VERSION = "smollm2-first6-distilled-v3"
LAYERS = 6
TRACE_PROBLEMS = 160  # teacher traces to distil on (seed 0 of demo.arithmetic_problems: the training split)
TRACE_TOKENS = 320  # stops off, as the engine benchmark decodes: the answer, then the teacher's own continuation
TRAIN_STEPS = 60
PER_DEVICE = 8


def first_layers_model(lm: LM, k: int):
    """The same model with its first ``k`` decoder layers (embeddings, final norm and head kept)."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(lm.model.config)
    config.num_hidden_layers = k
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:k]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {n: p for n, p in lm.model.state_dict().items() if not n.startswith("model.layers.") or int(n.split(".")[2]) < k}
    model.load_state_dict(state)
    return model


def quiet_threads() -> None:
    """One torch thread on a machine busier than its cores: two OpenMP threads that are descheduled at
    every barrier made a SmolLM2 decode step ~10x slower here (11 s vs 1 s at batch 16, load 6 on 2 cores)."""
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        torch.set_num_threads(1)


def distilled_student_dir(info: Callable[[str], None] = print) -> str:
    """The cached distilled student's model folder (built on first use: teacher traces, cut, ``rsd sft``)."""
    final = cache_dir() / "students" / VERSION
    if (final / "config.json").exists():
        return str(final)
    from rsd_toolkit import demo
    from rsd_toolkit.engine import RSDEngine
    from rsd_toolkit.models import load_lm
    from rsd_toolkit.sft import SFTConfig, train

    info(f"building the distilled same-tokenizer student once ({VERSION}); cached in {final}")
    quiet_threads()
    teacher = load_lm("asset:smollm2", dtype="float32", device="cpu")
    problems = demo.arithmetic_problems(TRACE_PROBLEMS, seed=0)
    cfg = RSDConfig(mode="teacher", max_new_tokens=TRACE_TOKENS, seed=0)
    no_stops = dataclasses.replace(teacher, stop_ids=frozenset())  # the whole budget, past the first end of turn
    traces = RSDEngine(no_stops, None, cfg).generate([p.question for p in problems], batch_size=32)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        init, out, corpus = Path(tmp) / "init", Path(tmp) / "trained", Path(tmp) / "traces.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            for p, t in zip(problems, traces):
                kind = "upft_prefix"  # cut at the budget: no stop to teach
                f.write(json.dumps({"id": p.id, "question": p.question, "text": t.text, "kind": kind}) + "\n")
        first_layers_model(teacher, LAYERS).save_pretrained(init)
        teacher.tokenizer.save_pretrained(init)
        config = SFTConfig(learning_rate=1e-3, epochs=100, max_steps=TRAIN_STEPS, batch_size=PER_DEVICE,
                           per_device_batch_size=PER_DEVICE, warmup_ratio=0.1, weight_decay=0.0, max_length=TRACE_TOKENS + 96,
                           bf16=False, think_markers="none", logging_steps=1000, save_steps=TRAIN_STEPS, save_total_limit=1,
                           resume=False, seed=0)  # fmt: skip
        summary = train(str(init), str(corpus), str(out), config, info=lambda _: None)
        info(f"distilled: {summary}")
        for ckpt in out.glob("checkpoint-*"):
            shutil.rmtree(ckpt)
        try:
            os.replace(out, final)  # atomic: a half-built student is never cached
        except OSError:
            if not (final / "config.json").exists():
                raise
    return str(final)


def demo_student_dir() -> str:
    """The demo's student folder (``rsd_toolkit.demo``: trained on first use, then cached); what training
    prints goes to stderr, since a benchmark's stdout is its JSON."""
    from rsd_toolkit import demo

    with contextlib.redirect_stdout(sys.stderr):
        return demo.student_dir(info=lambda m: print(m, file=sys.stderr))


def load_distilled_student(device: str = "cpu") -> LM:
    """The distilled student as an LM (float32, sdpa attention); what building it prints goes to stderr."""
    from rsd_toolkit.models import load_lm

    with contextlib.redirect_stdout(sys.stderr):
        path = distilled_student_dir(info=lambda m: print(m, file=sys.stderr))
    lm = load_lm(path, dtype="float32", device=device)
    lm.model.config._attn_implementation = "sdpa"
    return lm


def distinct_4grams(ids: list[int]) -> float:
    """Share of distinct 4-grams in a token sequence (a looping trace scores low, text near 1)."""
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    return len(set(grams)) / len(grams) if grams else 1.0


if __name__ == "__main__":  # build and check: RSD traces with the SmolLM2 teacher are text, not loops
    import time

    from rsd_toolkit import demo
    from rsd_toolkit.engine import RSDEngine
    from rsd_toolkit.models import load_lm

    t0 = time.time()
    student = load_distilled_student()
    print(f"student ready in {time.time() - t0:.0f} s", file=sys.stderr)
    teacher = load_lm("asset:smollm2", dtype="float32", device="cpu")
    problems = demo.arithmetic_problems(8, seed=1)
    for fb in ("sample", "strict"):
        traces = RSDEngine(teacher, student, RSDConfig(max_new_tokens=64, fallback=fb, seed=0)).generate([p.question for p in problems], batch_size=8)
        acc = sum(t.accepted for t in traces) / max(1, sum(t.decisions for t in traces))
        d4 = [distinct_4grams(t.ids) for t in traces]
        print(json.dumps({"fallback": fb, "acceptance": round(acc, 3), "distinct_4grams_min": round(min(d4), 3),
                          "distinct_4grams_mean": round(sum(d4) / len(d4), 3), "sample": traces[0].text[:300]}))

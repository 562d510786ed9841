"""The offline demo: the whole RSD story on 2 CPU cores, with real tokenizers from two families.

* Teacher: the real SmolLM2-135M-Instruct (GPT-2-style byte-level BPE, 49k tokens), fetched through pip.
* Student: a small Llama over Mistral's real SentencePiece tokenizer (32k tokens), trained once by
  ``rsd sft``'s own code on a synthetic arithmetic corpus written in a terse style of its own, then
  cached (``~/.cache/rsd_toolkit/demo/``). Its style differs from the teacher's chatty one on purpose:
  that difference is what RSD is about.

The demo decodes the same problems teacher-only (direct distillation) and with RSD through the bridged
engine, scores both trace sets under the student, and shows that teacher traces are full of tokens the
student finds surprising (p_s < 1 %) while RSD traces have almost none.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .assets import cache_dir
from .config import RSDConfig
from .traces.data import Problem

TEACHER = "asset:smollm2"
STUDENT_TOKENIZER = "asset:mistral-v1"
STUDENT_VERSION = "student-v1"
INSTRUCTION = "Put the final answer in \\boxed{}."
# A plain template for the student: its tokenizer (Mistral v0.1) ships none.
STUDENT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
    "{% else %}Answer: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)
STUDENT_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)  # fmt: skip
TRAIN_PROBLEMS = 2000
TRAIN_STEPS = 160


def arithmetic_problems(n: int, seed: int, unique: bool = True) -> list[Problem]:
    """Additions and subtractions of small numbers (seed 0: training, others: held out by construction)."""
    rng = random.Random(seed)
    out: list[Problem] = []
    seen: set[str] = set()
    while len(out) < n:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        pid = f"{a}{op}{b}"
        if (hash_split(pid) == 0) != (seed == 0) or (unique and pid in seen):  # training and held-out never overlap
            continue
        seen.add(pid)
        out.append(Problem(len(out), pid, f"What is {a} {op} {b}? {INSTRUCTION}", str(a + b if op == "+" else a - b)))
    return out


def hash_split(pid: str) -> int:
    import hashlib

    return hashlib.blake2b(pid.encode(), digest_size=1).digest()[0] % 5  # 0: training (1/5 of problems), else held out


def terse_solution(problem: Problem, rng: random.Random) -> str:
    """The student's own style: short, one equation, the boxed answer."""
    expr = problem.question.split("What is ")[1].split("?")[0]
    styles = (
        f"{expr} = {problem.answer}. So the answer is \\boxed{{{problem.answer}}}.",
        f"We compute {expr} = {problem.answer}. The answer is \\boxed{{{problem.answer}}}.",
        f"To find it: {expr} = {problem.answer}. \\boxed{{{problem.answer}}}",
    )
    return rng.choice(styles)


def student_dir(info: Callable[[str], None] = print, callbacks: list | None = None) -> str:
    """The cached demo student; trained on first use (about a minute on 2 cores); ``callbacks`` go to Trainer
    (the CLI shows training progress through one)."""
    final = cache_dir() / "demo" / STUDENT_VERSION
    if (final / "config.json").exists():
        return str(final)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .bridges import load_tokenizer
    from .sft import SFTConfig, train

    info(f"training the demo student once ({TRAIN_STEPS} steps on {TRAIN_PROBLEMS} synthetic problems); cached in {final}")
    tok = load_tokenizer(STUDENT_TOKENIZER)
    tok.chat_template = STUDENT_TEMPLATE
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        init, out = Path(tmp) / "init", Path(tmp) / "trained"
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, **STUDENT_SHAPE))  # fmt: skip
        model.save_pretrained(init)
        tok.save_pretrained(init)
        rng = random.Random(0)
        corpus = Path(tmp) / "corpus.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            for p in arithmetic_problems(TRAIN_PROBLEMS, seed=0, unique=False):
                f.write(json.dumps({"id": p.id + f"#{p.index}", "question": p.question, "text": terse_solution(p, rng), "kind": "full"}) + "\n")
        config = SFTConfig(learning_rate=4e-3, epochs=1, max_steps=TRAIN_STEPS, batch_size=32, per_device_batch_size=32,
                           warmup_ratio=0.05, weight_decay=0.0, max_length=128, bf16=False, think_markers="none",
                           logging_steps=1000, save_steps=0, save_total_limit=1, resume=False, seed=0)  # fmt: skip
        train(str(init), str(corpus), str(out), config, info=lambda _: None, callbacks=callbacks)
        for ckpt in out.glob("checkpoint-*"):
            shutil.rmtree(ckpt)
        try:
            os.replace(out, final)  # atomic: a half-trained student is never cached
        except OSError:
            if not (final / "config.json").exists():  # not another process finishing first
                raise
    return str(final)


def run(problems: int = 8, max_new_tokens: int = 40, batch_size: int = 8, info: Callable[[str], None] = print,
        train_callbacks: list | None = None) -> dict:
    """Teacher-only and RSD traces for held-out problems, both scored under the student."""
    from .bridges import analyse, load_vocab
    from .engine import RSDEngine
    from .models import load_lm
    from .surprisal import TextItem, score_items, summarize
    from .traces.answers import answers_match, extract_answer

    from .assets import asset_path

    for name in ("smollm2", STUDENT_TOKENIZER.removeprefix("asset:")):
        asset_path(name)  # a missing asset fails here, in one line, before any training
    student_path = student_dir(info, train_callbacks)
    compat = analyse(load_vocab(TEACHER), load_vocab(student_path))
    teacher, student = load_lm(TEACHER, dtype="float32", device="cpu"), load_lm(student_path, dtype="float32", device="cpu")
    held_out = arithmetic_problems(problems, seed=1)
    prompts = [p.question for p in held_out]
    seeds = list(range(len(held_out)))
    sets = {}
    for label, mode in (("teacher only", "teacher"), ("RSD", "rsd")):
        engine = RSDEngine(teacher, student, RSDConfig(mode=mode, max_new_tokens=max_new_tokens, seed=0))
        info(f"decoding {len(prompts)} problems: {label} ({engine.kind} bridge)")
        traces = engine.generate(prompts, seeds=seeds, batch_size=batch_size)
        scored = score_items(student, [TextItem.of_trace(p.id, p.question, t) for p, t in zip(held_out, traces)])
        stats = summarize(scored, 0.01)
        decisions = sum(t.decisions for t in traces)
        stats["acceptance_rate"] = sum(t.accepted for t in traces) / decisions if decisions else None
        stats["accuracy"] = sum(answers_match(extract_answer(t.text), p.answer) for p, t in zip(held_out, traces)) / len(traces)
        sets[label] = {"stats": stats, "traces": traces, "scored": scored}
    return {"teacher": TEACHER, "student": student_path, "compat": compat, "student_lm": student, "sets": sets, "problems": held_out}

"""Engine throughput against its physical limit, all in one run on the same models.

(a) limit    – a bare loop: one cached teacher forward and one cached student forward per token, through the
               engine's own ``BatchedContext`` (same KV store, same masks); measured for each pair
(b) exact    – RSD, teacher and student share a tokenizer
(c) bridged  – RSD across tokenizers (re-tokenising bridge), against its own limit
(d) generate – transformers ``generate`` with the teacher alone (sampling, same budget), also with
               ``cache_implementation="static"``

``--workload random`` (default): random Llama models from configs with real vocabularies (``--preset qwen``:
Qwen2.5-7B-shaped teacher, Qwen3-0.6B-shaped student, bf16); every proposal is rejected, the engine's worst case.
``--workload real``: the real SmolLM2-135M-Instruct as teacher; exact pairing with SmolLM2 cut to its first 6
layers (real weights, same tokenizer); bridged pairing with the demo's student (Mistral SentencePiece tokenizer,
trained by `rsd demo`); real acceptance, reported per row; one clocked extra run of the bridged engine and of its
limit splits each into forward time (per model) and the loop's own work (``bridged_forward_split``).
``--long-tokens 2048`` adds the exact pair at 256 and 2048 new tokens with the step time at the start and at the
end of the trace.
Stop tokens are disabled so every row decodes the full budget. Throughput counts new tokens per second,
prompt prefill included in every variant.

    python benchmarks/bench_engine.py --json
    python benchmarks/bench_engine.py --workload real --long-tokens 2048 --json
    python benchmarks/bench_engine.py --device cuda --preset qwen --json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rsd_toolkit.bridges import load_tokenizer  # noqa: E402
from rsd_toolkit.config import RSDConfig  # noqa: E402
from rsd_toolkit.engine import RSDEngine  # noqa: E402
from rsd_toolkit.engine import engine as engine_module  # noqa: E402
from rsd_toolkit.models import LM  # noqa: E402
from students import demo_student_dir, distinct_4grams, first_layers_model  # noqa: E402

PRESETS = {
    # name: (architecture, dtype, teacher shape, student shape, default batch sizes)
    "cpu": ("llama", "float32",
            dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4),
            dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
            (1, 16, 32)),
    "qwen": ("qwen", "bfloat16",
             dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4),
             dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
             (1, 64)),
}  # fmt: skip
PROMPT = "Solve step by step: a train leaves at 3 pm at 60 km/h; when has it covered 150 km?"


def flops_per_token(shape: dict, vocab: int) -> float:
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hd = shape.get("head_dim", h // shape["num_attention_heads"])
    attn = h * hd * (2 * shape["num_attention_heads"] + 2 * shape["num_key_value_heads"])
    return 2 * (n * (attn + 3 * h * i) + h * vocab)


def build(tokenizer_spec: str, role: str, preset: str, device: str) -> LM:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    arch, dtype, t_shape, s_shape, _ = PRESETS[preset]
    tok = load_tokenizer(tokenizer_spec)
    shape = t_shape if role == "teacher" else s_shape
    if arch == "llama":
        config_cls, model_cls = LlamaConfig, LlamaForCausalLM
    else:
        config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if role == "teacher" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    torch.manual_seed(0 if role == "teacher" else 1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # initialise in the target dtype: a 7B teacher in fp32 is 30 GB
    try:
        with torch.device(device):
            model = model_cls(config).eval()
    finally:
        torch.set_default_dtype(default)
    model.config._attn_implementation = "sdpa"
    lm = LM.wrap(model, tok, name=f"{role}:{tokenizer_spec}")
    lm.stop_ids = frozenset()  # random models: decode the full budget on every row
    return lm


_PACKS: dict[int, object] = {}


def packs_for(lm: LM):
    """The engine's default packed weights for ``lm`` (``engine/packed.py``), made once per model here so every
    variant of a run (engine, limit loop, per-model steps) runs the same forwards and no model is packed twice."""
    from rsd_toolkit.engine import packed

    if id(lm.model) not in _PACKS:
        _PACKS[id(lm.model)] = (lm.model, packed.PackedLinears(lm.model) if packed.default(lm.model) and not NO_PACKING else None)
    return _PACKS[id(lm.model)][1]


NO_PACKING = bool(os.environ.get("RSD_BENCH_NO_PACKING"))  # the A/B: every variant on plain F.linear


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@contextlib.contextmanager
def forward_clock(device: str, sides: dict[str, torch.nn.Module]):
    """Seconds spent in model forwards (every ``BatchedContext`` forward, eager or fixed-shape) while the block
    runs, in all and per side (``sides``: name -> model): the rest of a run is the loop's own work. Synchronises
    after each forward, so a clocked run is an extra run, never one whose rate is reported."""
    from rsd_toolkit.engine.context import BatchedContext

    names = {id(model): name for name, model in sides.items()}
    spent = {"forward_s": 0.0, "forwards": 0, **{f"{name}_forward_s": 0.0 for name in sides}, **{f"{name}_forwards": 0 for name in sides}}
    originals = {name: getattr(BatchedContext, name) for name in ("_forward", "_static_step")}

    def clocked(original):
        def run(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = original(self, *args, **kwargs)
            sync(device)
            seconds, name = time.perf_counter() - t0, names[id(self.model)]
            spent["forward_s"] += seconds
            spent["forwards"] += 1
            spent[f"{name}_forward_s"] += seconds
            spent[f"{name}_forwards"] += 1
            return out

        return run

    for name, original in originals.items():
        setattr(BatchedContext, name, clocked(original))
    try:
        yield spent
    finally:
        for name, original in originals.items():
            setattr(BatchedContext, name, original)


def forward_split(teacher: LM, student: LM, batch: int, new_tokens: int, device: str, prompts: list[str]) -> dict:
    """One clocked run of the own limit and one of the bridged engine: where each spends its time. ``c_over_own_limit``
    splits into the forwards the engine's schedule needs (ragged end, probes, wider catch-ups) and the engine's own
    work between them; ``bound_at_no_own_work`` is the ratio the engine would reach if that work cost nothing,
    ``bound_at_the_loops_own_work`` the ratio if it cost what the bare loop's does."""
    out = {}
    for name, fn in (("limit", lambda: two_forward_limit(teacher, student, batch, new_tokens, device, prompts)),
                     ("engine", lambda: engine_rate(teacher, student, batch, new_tokens, device, prompts=prompts)[0])):  # fmt: skip
        with forward_clock(device, {"teacher": teacher.model, "student": student.model}) as spent:
            run_s = batch * new_tokens / fn()  # (both produce batch * new_tokens tokens)
        out[name] = {"run_s": run_s, **spent, "own_work_share": 1 - spent["forward_s"] / run_s}
    for key in ("forward_s", "teacher_forward_s", "student_forward_s"):
        out[f"engine_over_limit_{key}"] = out["engine"][key] / out["limit"][key]
    out["bound_at_no_own_work"] = out["limit"]["run_s"] / out["engine"]["forward_s"]
    # the engine does all the bare loop does between forwards (read the logits, build the next block) and more:
    # the bound if its own work cost no more than the loop's
    out["bound_at_the_loops_own_work"] = out["limit"]["run_s"] / (out["engine"]["forward_s"] + out["limit"]["run_s"] - out["limit"]["forward_s"])
    return out


@torch.inference_mode()
def two_forward_limit(teacher: LM, student: LM, batch: int, new_tokens: int, device: str,
                      prompts: list[str] | None = None, step_ms: list | None = None,
                      row_steps: list[int] | None = None) -> float:  # fmt: skip
    """The bare loop the engine cannot beat: one cached teacher forward and one cached student forward per
    token, through the engine's own ``BatchedContext`` (same KV store, same explicit masks).

    ``row_steps``: the loop on an engine run's own schedule instead (the *ragged limit*): row b decodes
    ``row_steps[b]`` steps and then leaves the batch, as the engine's row b did; the rate still counts
    ``batch * new_tokens`` tokens, what that engine run produced."""
    from rsd_toolkit.engine import BatchedContext
    from rsd_toolkit.engine.context import static_default

    prompts = prompts or [PROMPT] * batch
    V_s = student.vocab.size
    steps_left = list(row_steps) if row_steps is not None else [new_tokens] * batch

    def run():
        tc, sc = (BatchedContext(lm.model, batch, static=static_default(lm.model), packed=packs_for(lm)) for lm in (teacher, student))
        tc.extend([teacher.prompt(p, RSDConfig())[1] for p in prompts[:batch]])
        sc.extend([student.prompt(p, RSDConfig())[1] for p in prompts[:batch]])
        left = list(steps_left)
        while left:
            t0 = time.perf_counter()
            nxt = tc.last_logits.argmax(-1).tolist()
            tc.extend([[t] for t in nxt])
            sc.extend([[t % V_s] for t in nxt])
            if step_ms is not None:
                sync(device)
                step_ms.append(1000 * (time.perf_counter() - t0))
            left = [n - 1 for n in left]
            if min(left) == 0:  # rows whose steps are done leave, as finished rows leave the engine's batch
                keep = [b for b, n in enumerate(left) if n]
                for c in (tc, sc):
                    c.select(keep)
                left = [left[b] for b in keep]

    return batch * new_tokens / timed(run, device)


def many_prompt_limit(teacher: LM, student: LM, batch: int, new_tokens: int, device: str, prompts: list[str]) -> float:
    """The two-forward limit for ``len(prompts)`` prompts at ``batch`` rows: full batches one after another,
    each with its own prefill (the bound for a run that decodes several batches' worth of prompts)."""
    seconds = 0.0
    for k in range(0, len(prompts), batch):
        chunk = prompts[k : k + batch]
        seconds += len(chunk) * new_tokens / two_forward_limit(teacher, student, len(chunk), new_tokens, device, chunk)
    return len(prompts) * new_tokens / seconds


def engine_rate(teacher: LM, student: LM, batch: int, new_tokens: int, device: str, mode: str = "rsd",
                prompts: list[str] | None = None, step_ms: list | None = None,
                static_step: bool | None = None, draft_tokens: int = 0, traces: list | None = None,
                rows: int | None = None, finish_steps: dict | None = None) -> tuple[float, dict]:  # fmt: skip
    """RSD tok/s and the run's stats (``static_step``: the engine's default, or forced on/off; ``traces``:
    receives the traces; ``rows``: prompts decoded, ``batch`` at a time, default ``batch``; ``finish_steps``:
    receives, per prompt index, the decode step (counted from the run's first) in which its row finished)."""
    config = RSDConfig(mode=mode, max_new_tokens=new_tokens, draft_tokens=draft_tokens)
    engine = RSDEngine(teacher, student, config, static_step=static_step,
                       packed_gemm={"teacher": packs_for(teacher), "student": packs_for(student)})
    prompts = prompts or [PROMPT] * batch
    if step_ms is not None or finish_steps is not None:  # instrument the step (benchmark only)
        step, count = engine._step, [0]

        def timed_step(rows, ctx):
            t0 = time.perf_counter()
            step(rows, ctx)
            count[0] += 1
            if step_ms is not None:  # time per decode step, start vs end of a trace
                sync(device)
                step_ms.append(1000 * (time.perf_counter() - t0))
            if finish_steps is not None:
                finish_steps.update({r.index: count[0] for r in rows if r.finish and r.index not in finish_steps})

        engine._step = timed_step
    runs = []
    seconds = timed(lambda: runs.append(engine.generate(prompts[: rows or batch], batch_size=batch)), device)
    out, stats = runs[0], runs[0].stats
    if traces is not None:
        traces.extend(out)
    tokens = sum(len(t.ids) for t in out)
    accepted, decisions = sum(t.accepted for t in out), sum(t.decisions for t in out)
    info = {"kind": engine.kind, "tokens": tokens, "acceptance": accepted / decisions if decisions else None,
            "acceptance_per_row": [round(t.acceptance_rate, 3) if t.acceptance_rate is not None else None for t in out],
            **{k: v / tokens for k, v in stats.items()}}  # fmt: skip
    info["bridge_share"] = stats.get("bridge_s", 0.0) / seconds  # pushes into the pairs / the whole run
    for side in ("teacher", "student"):
        real, computed = stats.get(f"{side}_real_positions"), stats.get(f"{side}_computed_positions")
        if real:
            info[f"{side}_computed_over_real"] = computed / real
        steps = {k: stats.get(f"{side}_static_{k}", 0) for k in ("replayed", "captured", "eager", "failed")}
        if any(steps.values()):  # fixed-shape steps: graph replays over all of them
            info[f"{side}_static_steps"] = steps
            info[f"{side}_graph_hit_rate"] = steps["replayed"] / sum(steps.values())
    return tokens / seconds, info


@torch.inference_mode()
def per_model_step_ms(teacher: LM, student: LM, batch: int, device: str, steps: int = 64) -> dict:
    """Median ms of one decode step (one token per row) of each model alone, through ``BatchedContext`` as
    the engine runs it (on CUDA: the captured graph), synchronised around each model."""
    import statistics

    from rsd_toolkit.engine import BatchedContext
    from rsd_toolkit.engine.context import static_default

    out = {}
    for side, lm in (("teacher", teacher), ("student", student)):
        ctx = BatchedContext(lm.model, batch, static=static_default(lm.model), packed=packs_for(lm))
        ctx.extend([lm.prompt(PROMPT, RSDConfig())[1]] * batch)
        times = [1000 * timed(lambda: ctx.extend([[7]] * batch), device) for _ in range(steps)]
        out[side] = statistics.median(times[steps // 4 :])  # after capture and warm-up
    return out


@torch.inference_mode()
def verify_ms(teacher: LM, batch: int, device: str, widths: list[int], repeats: int = 8) -> dict:
    """Median ms of one teacher forward over ``width`` positions per row with the logits at every position
    (``BatchedContext.extend(scores=True)``, as speculation's verify runs), per width: the teacher's part of
    a round in speculation's own limit."""
    import statistics

    from rsd_toolkit.engine import BatchedContext

    out = {}
    for width in widths:
        ctx = BatchedContext(teacher.model, batch, packed=packs_for(teacher))
        ctx.extend([teacher.prompt(PROMPT, RSDConfig())[1]] * batch)
        times = []
        for _ in range(repeats):
            times.append(1000 * timed(lambda: ctx.extend([[7] * width] * batch, scores=True), device))
            for b in range(batch):
                ctx.rollback(b, width)
        out[width] = statistics.median(times[1:])
    return out


def width_cost_ms(lm: LM, batch: int, device: str) -> dict:
    """Time of one cached forward appending 1..4 tokens per row: what re-tokenising catch-up costs."""
    from rsd_toolkit.engine import BatchedContext

    ctx = BatchedContext(lm.model, batch, packed=packs_for(lm))
    ctx.extend([lm.prompt(PROMPT, RSDConfig())[1]] * batch)
    out = {}
    for width in (1, 2, 3, 4):
        out[width] = 1000 * min(timed(lambda: ctx.extend([[7] * width] * batch), device) for _ in range(3))
    return out


@torch.inference_mode()
def generate_rate(teacher: LM, batch: int, new_tokens: int, device: str, prompts: list[str] | None = None,
                  cache_implementation: str | None = None) -> float | None:  # fmt: skip
    """Teacher-only ``generate`` (sampling, same budget, stops off); ``cache_implementation="static"`` too where
    transformers supports it (None when it refuses)."""
    tok = teacher.tokenizer
    texts = [teacher.prompt(p, RSDConfig())[0] for p in (prompts or [PROMPT] * batch)[:batch]]
    side, tok.padding_side = tok.padding_side, "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False) if tok.pad_token else None
    tok.padding_side = side
    if enc is None:
        ids = torch.tensor([teacher.prompt(p, RSDConfig())[1] for p in [texts[0]] * batch], device=device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    enc = {k: v.to(device) for k, v in enc.items()}
    extra = {"cache_implementation": cache_implementation} if cache_implementation else {}

    def run():
        teacher.model.generate(
            **enc, do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            pad_token_id=pad, eos_token_id=None, **extra,
        )  # fmt: skip

    try:
        return batch * new_tokens / timed(run, device)
    except Exception as e:  # noqa: BLE001 - a cache implementation this model or version does not support
        print(f"generate with {cache_implementation}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        return None


# ------------------------------------------------------------------------------------ the real workload
REAL_PROMPTS = [
    "What is 17 + 25? Explain briefly.", "A shop sells pens at 3 dollars each. How much do 7 pens cost?",
    "Solve for x: 2x + 6 = 20.", "What is the area of a rectangle 8 m long and 5 m wide?",
    "Tom has 12 apples and gives away 5. How many are left?", "What is 15% of 80?",
    "Convert 3 hours into minutes.", "What is the next prime number after 13?",
    "A train travels 120 km in 2 hours. What is its average speed?", "Simplify the fraction 18/24.",
    "What is 9 squared minus 4 squared?", "How many seconds are in a day?",
    "If a triangle has angles 50 and 60 degrees, what is the third angle?", "What is 144 divided by 12?",
    "Write 0.75 as a fraction.", "A recipe needs 250 g of flour per cake. How much flour for 4 cakes?",
]  # fmt: skip
EXACT_STUDENT_LAYERS = 6  # the exact pair's student: SmolLM2-135M cut to its first 6 of 30 layers (real weights)


def no_stops(lm: LM) -> LM:
    """Stops off, so every row decodes the whole budget and rates compare with the limit loop."""
    return dataclasses.replace(lm, stop_ids=frozenset())


def first_layers(lm: LM, k: int, device: str) -> LM:
    """The same model cut to its first ``k`` decoder layers (embeddings, final norm and head kept): a
    real-weights student that shares the teacher's tokenizer."""
    model = first_layers_model(lm, k)
    model.config._attn_implementation = "sdpa"
    return LM.wrap(model.eval().to(device), lm.tokenizer, name=f"smollm2-135m-first{k}layers")


def real_models(device: str) -> tuple[LM, LM, LM]:
    """Teacher: the real SmolLM2-135M-Instruct; exact student: its first layers; bridged student: the demo's
    student (Mistral SentencePiece tokenizer, trained by `rsd demo` once and cached)."""
    from rsd_toolkit.models import load_lm

    teacher = load_lm("asset:smollm2", dtype="float32", device=device)
    exact = first_layers(teacher, EXACT_STUDENT_LAYERS, device)
    bridged = load_lm(demo_student_dir(), dtype="float32", device=device)
    return no_stops(teacher), no_stops(exact), no_stops(bridged)


def params(lm: LM) -> int:
    return sum(p.numel() for p in lm.model.parameters())


def start_end(step_ms: list[float], edge: int = 32) -> dict:
    """Median step time over the first and the last ``edge`` steps of a trace."""
    import statistics

    return {"start_ms": statistics.median(step_ms[:edge]), "end_ms": statistics.median(step_ms[-edge:]), "steps": len(step_ms)}


def run_real(args, report: dict) -> None:
    teacher, exact_student, bridged_student = real_models(args.device)
    prompts = REAL_PROMPTS * 8
    report.update(teacher="SmolLM2-135M-Instruct (asset:smollm2)", exact_student=exact_student.name,
                  bridged_student="rsd demo student (asset:mistral-v1 tokenizer)",
                  params={"teacher": params(teacher), "exact_student": params(exact_student),
                          "bridged_student": params(bridged_student)})  # fmt: skip
    n = args.new_tokens or 512
    for batch in [int(b) for b in (args.batches or "1,16").split(",")]:
        for pair in ("exact", "bridged"):  # warm-up
            two_forward_limit(teacher, exact_student if pair == "exact" else bridged_student, batch, 16, args.device, prompts)
        engine_rate(teacher, exact_student, batch, 16, args.device, prompts=prompts)
        runs = {"a": [], "b": [], "a_c": [], "c": [], "r_c": []}
        finish: dict[int, int] = {}  # the bridged run's schedule: the step in which each row finished (the same every run)
        for _ in range(args.repeats):  # interleaved, best of each: noise slows single runs, not the ratios
            runs["a"].append((two_forward_limit(teacher, exact_student, batch, n, args.device, prompts), None))
            runs["b"].append(engine_rate(teacher, exact_student, batch, n, args.device, prompts=prompts))
            runs["a_c"].append((two_forward_limit(teacher, bridged_student, batch, n, args.device, prompts), None))
            runs["c"].append(engine_rate(teacher, bridged_student, batch, n, args.device, prompts=prompts, finish_steps=finish))
            row_steps = [finish[i] for i in range(batch)]
            runs["r_c"].append((two_forward_limit(teacher, bridged_student, batch, n, args.device, prompts, row_steps=row_steps), None))
        (a, _), (b, b_info), (a_c, _), (c, c_info), (r_c, _) = (max(runs[k], key=lambda r: r[0]) for k in ("a", "b", "a_c", "c", "r_c"))
        d = generate_rate(teacher, batch, n, args.device, prompts)
        d_static = generate_rate(teacher, batch, n, args.device, prompts, cache_implementation="static")
        row = {"batch": batch, "new_tokens": n, "a_exact_limit_tok_s": a, "b_exact_tok_s": b, "b_over_a": b / a,
               "a_bridged_limit_tok_s": a_c, "c_bridged_tok_s": c, "c_over_own_limit": c / a_c,
               "d_teacher_generate_tok_s": d, "d_teacher_generate_static_tok_s": d_static,
               "exact": b_info, "bridged": c_info,
               # the own limit runs one step per token; a bridged row's step may add none, one or several student
               # tokens: the bound if each row-step cost what a limit step costs is a_c / row_steps per token
               "c_row_steps_per_token": c_info.get("row_steps"),
               "c_over_step_bound": c / (a_c / c_info["row_steps"]) if c_info.get("row_steps") else None,
               # The ragged limit: the bare loop on the bridged run's own schedule (a step adds 0, 1 or more
               # student tokens, so rows reach the budget in different steps and leave; with no prompt left to
               # join, the last steps run a few rows at nearly a full step's cost). What the schedule itself
               # costs (ragged / own limit) and what the engine costs on top of it (c / ragged).
               "r_bridged_ragged_limit_tok_s": r_c, "ragged_limit_over_own_limit": r_c / a_c, "c_over_ragged_limit": c / r_c,
               "c_row_steps_min_max": [min(row_steps), max(row_steps)]}  # fmt: skip
        row["bridged_forward_split"] = forward_split(teacher, bridged_student, batch, n, args.device, prompts)
        if batch >= engine_module.DEFER_FROM_ROWS:  # what deferring multi-token catch-ups buys: the same run padded
            defer, engine_module.DEFER_FROM_ROWS = engine_module.DEFER_FROM_ROWS, 10**9
            try:
                c_padded, c_padded_info = engine_rate(teacher, bridged_student, batch, n, args.device, prompts=prompts)
            finally:
                engine_module.DEFER_FROM_ROWS = defer
            row.update(c_bridged_padded_tok_s=c_padded, c_padded_over_own_limit=c_padded / a_c,
                       bridged_padded={k: c_padded_info.get(k) for k in ("teacher_computed_over_real", "student_computed_over_real", "acceptance")})  # fmt: skip
        report["rows"].append(row)
        print(f"batch {batch}: exact {b:.1f} tok/s = {b / a:.2f} of its limit {a:.1f}; bridged {c:.1f} = {c / a_c:.2f} "
              f"of its limit {a_c:.1f} ({c / r_c:.2f} of its ragged limit {r_c:.1f}); acceptance exact "
              f"{b_info['acceptance']:.2f}, bridged {c_info['acceptance']:.2f}; bridge {c_info['bridge_share']:.1%} of the bridged run; "
              f"engine's own work {row['bridged_forward_split']['engine']['own_work_share']:.1%} of its run, "
              f"bound with none {row['bridged_forward_split']['bound_at_no_own_work']:.2f}, with the bare loop's "
              f"{row['bridged_forward_split']['bound_at_the_loops_own_work']:.2f}",
              file=sys.stderr, flush=True)  # fmt: skip
        if args.prompts_per_slot > 1:  # several batches' worth of prompts, as `rsd traces` decodes per call
            many = [REAL_PROMPTS[k % len(REAL_PROMPTS)] for k in range(batch * args.prompts_per_slot)]  # (never cut short)
            m_runs = {"limit": [], "engine": []}
            for _ in range(args.repeats):
                m_runs["limit"].append((many_prompt_limit(teacher, bridged_student, batch, n, args.device, many), None))
                m_runs["engine"].append(engine_rate(teacher, bridged_student, batch, n, args.device, prompts=many, rows=len(many)))
            (m_a, _), (m_c, m_info) = (max(m_runs[k], key=lambda r: r[0]) for k in ("limit", "engine"))
            row["many_prompts"] = {
                "prompts": len(many), "limit_tok_s": m_a, "bridged_tok_s": m_c, "bridged_over_limit": m_c / m_a,
                "joins": round(m_info["joins"] * m_info["tokens"]),  # engine_rate divides stats by tokens
                "steps": round(m_info["steps"] * m_info["tokens"]),
                "limit_steps": len(many) // batch * n,
                # decisions per step and slot: how full the engine keeps the batch (1.0: every slot decides every step)
                "occupancy": m_info["row_steps"] / m_info["steps"] / batch,
            }  # fmt: skip
            print(f"batch {batch}, {len(many)} prompts: bridged {m_c:.1f} tok/s = {m_c / m_a:.2f} of the limit {m_a:.1f}",
                  file=sys.stderr, flush=True)  # fmt: skip
    if args.long_tokens:
        batch = 16 if 16 in [r["batch"] for r in report["rows"]] else report["rows"][-1]["batch"]
        short, long = 256, args.long_tokens
        out = {"batch": batch}
        for tokens in (short, long):
            limit_steps, engine_steps = [], []
            lim = two_forward_limit(teacher, exact_student, batch, tokens, args.device, prompts, step_ms=limit_steps)
            rate, info = engine_rate(teacher, exact_student, batch, tokens, args.device, prompts=prompts, step_ms=engine_steps)
            out[str(tokens)] = {"limit_tok_s": lim, "exact_tok_s": rate, "acceptance": info["acceptance"],
                                "limit_steps": start_end(limit_steps), "engine_steps": start_end(engine_steps)}  # fmt: skip
            print(f"{tokens} tokens: exact {rate:.1f} tok/s, limit {lim:.1f}", file=sys.stderr, flush=True)
        out["exact_long_over_short"] = out[str(long)]["exact_tok_s"] / out[str(short)]["exact_tok_s"]
        out["limit_long_over_short"] = out[str(long)]["limit_tok_s"] / out[str(short)]["limit_tok_s"]
        report["long"] = out
    targets = {}
    for r in report["rows"]:
        if r["batch"] == 16:
            targets["exact_over_limit_at_16>=0.90"] = r["b_over_a"] >= 0.90
            targets["bridged_over_own_limit_at_16>=0.80"] = r["c_over_own_limit"] >= 0.80
            targets["bridged_over_own_limit_at_16>=0.95"] = r["c_over_own_limit"] >= 0.95  # issue 21
            targets["bridge_share_of_bridged_run_at_16<=0.10"] = r["bridged"]["bridge_share"] <= 0.10  # issue 21
            targets["bridged_over_ragged_limit_at_16>=0.95"] = r["c_over_ragged_limit"] >= 0.95  # the engine's own cost
            split = r["bridged_forward_split"]  # what the forwards alone allow (a target above it is out of reach)
            report["bridged_at_16_bounds"] = {k: split[k] for k in ("bound_at_no_own_work", "bound_at_the_loops_own_work")}
            if "many_prompts" in r:
                targets["bridged_many_prompts_over_limit_at_16>=0.95"] = r["many_prompts"]["bridged_over_limit"] >= 0.95
            for side, pair in (("student", "exact"), ("student", "bridged"), ("teacher", "bridged")):
                value = r[pair].get(f"{side}_computed_over_real")
                if value is not None:
                    targets[f"{pair}_{side}_computed_over_real_at_16<1.2"] = value < 1.2
    if "long" in report:
        targets["exact_2048_over_256>=0.85"] = report["long"]["exact_long_over_short"] >= 0.85
    report["targets_met"] = targets


# ------------------------------------------------------------------------------- speculative RSD (issue 20)
LOOP_BELOW = 0.5  # a trace whose share of distinct 4-grams is below this is a loop, not text


def run_speculative(args, report: dict) -> None:
    """Rows for K in ``--draft-tokens`` at each batch: speculative RSD against step RSD (K = 0), teacher-only
    ``generate`` and the two-forward limit, all on the same pair in one run. The pair: the real SmolLM2 teacher
    and a same-tokenizer student whose traces are text (its first layers, distilled on the teacher's traces;
    ``students.py``); rows whose traces are loops are counted out of the acceptance figures."""
    from students import load_distilled_student

    from rsd_toolkit.models import load_lm

    if args.pair == "qwen-coder":  # the real identical pair: Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct
        teacher = no_stops(load_lm("asset:qwen-coder-1.5b", dtype=args.dtype, device=args.device))
        student = no_stops(load_lm("asset:qwen-coder-0.5b", dtype=args.dtype, device=args.device))
        teacher_name = "Qwen2.5-Coder-1.5B-Instruct (asset:qwen-coder-1.5b)"
    else:
        teacher = no_stops(load_lm("asset:smollm2", dtype="float32", device=args.device))
        student = no_stops(load_distilled_student(args.device))
        teacher_name = "SmolLM2-135M-Instruct (asset:smollm2)"
    prompts = REAL_PROMPTS * 8
    n = args.new_tokens or 512
    ks = [int(k) for k in args.draft_tokens.split(",")]
    spec = report["speculative"] = {"teacher": teacher_name, "student": student.name, "dtype": args.dtype,
                                    "packed_gemm": {"teacher": packs_for(teacher) is not None, "student": packs_for(student) is not None},
                                    "params": {"teacher": params(teacher), "student": params(student)},
                                    "new_tokens": n, "loop_below_distinct_4grams": LOOP_BELOW, "rows": []}  # fmt: skip
    for batch in [int(b) for b in (args.batches or "1,4,16").split(",")]:
        engine_rate(teacher, student, batch, 16, args.device, prompts=prompts, draft_tokens=max(ks))  # warm-up
        limit = two_forward_limit(teacher, student, batch, n, args.device, prompts)
        generate = generate_rate(teacher, batch, n, args.device, prompts)
        step_ms = per_model_step_ms(teacher, student, batch, args.device, steps=32)  # what one draft costs vs a teacher step
        verify = verify_ms(teacher, batch, args.device, [K + 1 for K in ks if K])  # what one verify forward costs
        step = None
        for K in ks:
            traces: list = []
            rate, info = engine_rate(teacher, student, batch, n, args.device, prompts=prompts, draft_tokens=K, traces=traces,
                                     rows=max(batch, args.min_rows))  # fmt: skip
            step = rate if K == 0 else step
            text = [distinct_4grams(t.ids) for t in traces]
            ok = [t for t, d in zip(traces, text) if d >= LOOP_BELOW]
            acc = sum(t.accepted for t in ok) / max(1, sum(t.decisions for t in ok))
            tokens = sum(len(t.ids) for t in traces)
            drafted = info.get("drafted", 0) * tokens  # engine_rate divides stats by tokens
            row = {
                "batch": batch, "draft_tokens": K, "tok_s": rate,
                "spec_over_step": rate / step if step else None, "spec_over_generate": rate / generate if generate else None,
                "spec_over_limit": rate / limit,
                "teacher_forwards_per_token": info.get("row_rounds", tokens) if K else 1.0,
                "draft_acceptance": info["draft_accepted"] / info["drafted"] if drafted else None,
                "rsd_acceptance_text_rows": acc, "text_rows": len(ok), "loop_rows": len(traces) - len(ok),
                "distinct_4grams_per_row": [round(d, 3) for d in text],
                "teacher_computed_over_real": info.get("teacher_computed_over_real"),
                "student_computed_over_real": info.get("student_computed_over_real"),
                "limit_tok_s": limit, "generate_tok_s": generate, "step_ms_per_model": step_ms,
            }  # fmt: skip
            if K:  # speculation's own limit at this draft acceptance, measured in this run: per committed token,
                # (K+1) student steps and one teacher forward over K+1 positions, over the tokens a round commits
                per_token = ((K + 1) * step_ms["student"] + verify[K + 1]) * row["teacher_forwards_per_token"]
                row["verify_ms"] = verify[K + 1]
                row["verify_over_teacher_step"] = verify[K + 1] / step_ms["teacher"]  # one forward over K+1 vs over 1
                # rows still decoding per round: rows commit different numbers of tokens, so with a fixed
                # budget and no prompts left to join the batch thins out at the end (the step path's does not)
                row["rows_per_round"] = info["row_rounds"] / info["spec_rounds"]
                row["spec_over_step_bound"] = (step_ms["student"] + step_ms["teacher"]) / per_token
                row["spec_over_own_limit"] = row["tok_s"] * per_token / 1000 / batch
            for side in ("student", "teacher"):
                if info.get(f"{side}_cache_longest"):
                    row[f"{side}_cache_width_over_longest_mean"] = info[f"{side}_cache_width"] / info[f"{side}_cache_longest"]
                    row[f"{side}_cache_width_over_longest_max"] = info[f"{side}_cache_width_over_longest_max"] * tokens
            spec["rows"].append(row)
            print(f"batch {batch} K {K}: {rate:.1f} tok/s = {row['spec_over_step'] or 1:.2f}x step, "
                  f"{row['spec_over_generate'] or 0:.2f}x generate ({generate:.1f}), {rate / limit:.2f}x limit ({limit:.1f}); "
                  f"forwards/token {row['teacher_forwards_per_token']:.2f}, draft acceptance {row['draft_acceptance']}, "
                  f"loops {row['loop_rows']}/{len(traces)}", file=sys.stderr, flush=True)  # fmt: skip
    report["targets_met"] = speculative_targets(spec["rows"], args.recommended_k)
    if args.pair == "qwen-coder":
        report["targets_met"].update(real_pair_targets(spec["rows"], args.recommended_k))


def real_pair_targets(rows: list[dict], recommended: int) -> dict:
    """The real identical pair's targets: batch 1 speculative >= 1.5x the teacher's generate and >= 2x step RSD
    with <= 0.35 teacher forwards per token (met by any K); batch 16: the recommended K >= 1.0x step RSD, and step
    RSD >= 0.9x its two-forward limit."""
    b1 = [r for r in rows if r["batch"] == 1 and r["draft_tokens"]]
    out = {"b1_some_K_over_generate>=1.5_and_over_step>=2_and_forwards<=0.35": any(
        (r["spec_over_generate"] or 0) >= 1.5 and r["spec_over_step"] >= 2 and r["teacher_forwards_per_token"] <= 0.35 for r in b1)}
    for r in rows:
        if r["batch"] == 16 and r["draft_tokens"] == recommended:
            out[f"K{recommended}_b16_over_step>=1.0"] = r["spec_over_step"] >= 1.0
        if r["draft_tokens"] == 0:
            out[f"step_b{r['batch']}_over_limit>=0.9"] = r["spec_over_limit"] >= 0.9
    return out


def speculative_targets(rows: list[dict], recommended: int) -> dict:
    targets = {}
    for r in rows:
        if r["draft_tokens"] == 0:
            continue
        if r["batch"] == 1:
            targets[f"K{r['draft_tokens']}_b1_over_step>=1.4"] = r["spec_over_step"] >= 1.4
            targets[f"K{r['draft_tokens']}_b1_over_generate>=1.1"] = r["spec_over_generate"] is not None and r["spec_over_generate"] >= 1.1
            targets[f"K{r['draft_tokens']}_b1_teacher_forwards_per_token<=0.5"] = r["teacher_forwards_per_token"] <= 0.5
        if r["batch"] == 16 and r["draft_tokens"] == recommended:
            targets[f"K{recommended}_b16_over_step>=1.0"] = r["spec_over_step"] >= 1.0
        for side in ("teacher", "student"):
            if r.get(f"{side}_computed_over_real") is not None:
                targets[f"K{r['draft_tokens']}_b{r['batch']}_{side}_computed_over_real<=1.3"] = r[f"{side}_computed_over_real"] <= 1.3
            if r.get(f"{side}_cache_width_over_longest_mean") is not None:
                targets[f"K{r['draft_tokens']}_b{r['batch']}_{side}_cache_width<=1.25x_longest"] = r[f"{side}_cache_width_over_longest_mean"] <= 1.25
    return targets


def at_least_one(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value!r}")
    return int(value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workload", choices=("random", "real", "speculative"), default="random",
                    help="random: random models (every proposal rejected); real: SmolLM2 teacher, real-weights students; "
                         "speculative: SmolLM2 teacher, distilled same-tokenizer student, K = --draft-tokens")
    ap.add_argument("--draft-tokens", default="0,2,4,8", help="speculative: comma-separated K (0 = step RSD, the baseline)")
    ap.add_argument("--pair", choices=("smollm2", "qwen-coder"), default="smollm2",
                    help="speculative: smollm2 (SmolLM2 teacher, distilled student) or qwen-coder (1.5B -> 0.5B, real)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="speculative, qwen-coder pair")
    ap.add_argument("--min-rows", type=int, default=4,
                    help="speculative: decode at least this many prompts per row (batch 1: one after another), so one "
                         "trace's luck does not decide a row")
    ap.add_argument("--recommended-k", type=int, default=3, help="speculative: the K whose batch-16 row must not slow down (README: 3 on CPU)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="random workload: default cpu on cpu, qwen on cuda")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the preset's; real: 1,16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 256 (random), 512 (real)")
    ap.add_argument("--long-tokens", type=int, default=0, help="real: also compare the exact pair at 256 and this many tokens")
    ap.add_argument("--teacher-tokenizer", default="asset:qwen2")
    ap.add_argument("--bridged-student-tokenizer", default="asset:llama-bpe")
    ap.add_argument("--prompts-per-slot", type=at_least_one, default=1,
                    help="real: also decode this many batches' worth of prompts in one call (rows refill), against the "
                         "limit for as many full batches")
    ap.add_argument("--repeats", type=at_least_one, default=1, help="real: measure limit and engine this many times, interleaved; best of each")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.draft_tokens_given = "--draft-tokens" in sys.argv
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cores": os.cpu_count(), "load_at_start": os.getloadavg(),
        "workload": args.workload, "repeats": args.repeats, "rows": [],
    }  # fmt: skip
    if args.workload == "real":
        run_real(args, report)
        if args.draft_tokens_given:  # the speculative rows on the same workload's teacher
            targets = report["targets_met"]
            run_speculative(args, report)
            report["targets_met"] = {**targets, **report["targets_met"]}
    elif args.workload == "speculative":
        run_speculative(args, report)
    else:
        run_random(args, report)
    report["load_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2) if args.json else json.dumps(report["targets_met"], indent=2))


def run_random(args, report: dict) -> None:
    preset = args.preset or ("qwen" if args.device == "cuda" else "cpu")
    batches = [int(b) for b in args.batches.split(",")] if args.batches else list(PRESETS[preset][4])
    n = args.new_tokens or 256
    teacher = build(args.teacher_tokenizer, "teacher", preset, args.device)
    student = build(args.teacher_tokenizer, "student", preset, args.device)
    bridged_student = build(args.bridged_student_tokenizer, "student", preset, args.device)
    _, _, t_shape, s_shape, _ = PRESETS[preset]
    report.update(preset=preset, new_tokens=n, teacher_flops_per_token=flops_per_token(t_shape, teacher.vocab.size),
                  student_flops_per_token=flops_per_token(s_shape, student.vocab.size))  # fmt: skip
    report["flops_ratio"] = report["teacher_flops_per_token"] / report["student_flops_per_token"]
    for batch in batches:
        # Warm-up at this batch size: allocator, kernels, clocks (a fresh GPU machine runs slow for many seconds).
        two_forward_limit(teacher, student, batch, 32, args.device)
        engine_rate(teacher, student, batch, 32, args.device)
        engine_rate(teacher, bridged_student, batch, 32, args.device)
        generate_rate(teacher, batch, 32, args.device)
        a = two_forward_limit(teacher, student, batch, n, args.device)
        b, b_info = engine_rate(teacher, student, batch, n, args.device)
        a_c = two_forward_limit(teacher, bridged_student, batch, n, args.device)
        c, c_info = engine_rate(teacher, bridged_student, batch, n, args.device)
        d = generate_rate(teacher, batch, n, args.device)
        d_static = generate_rate(teacher, batch, n, args.device, cache_implementation="static")
        row = {"batch": batch, "a_limit_tok_s": a, "b_exact_tok_s": b, "a_bridged_limit_tok_s": a_c, "c_bridged_tok_s": c,
               "d_teacher_generate_tok_s": d, "d_teacher_generate_static_tok_s": d_static,
               "b_over_a": b / a, "c_over_own_limit": c / a_c, "c_over_b": c / b, "b_over_d": b / d, "exact": b_info,
               "bridged": c_info, "teacher_forward_ms_by_width": width_cost_ms(teacher, batch, args.device),
               "student_forward_ms_by_width": width_cost_ms(bridged_student, batch, args.device),
               "step_ms_per_model": per_model_step_ms(teacher, student, batch, args.device)}  # fmt: skip
        if args.device == "cuda":  # what the captured graphs buy: the same exact run with the step eager
            row["b_exact_eager_step_tok_s"] = engine_rate(teacher, student, batch, n, args.device, static_step=False)[0]
        report["rows"].append(row)
        print(f"batch {batch:3d}: limit {a:8.1f}  exact {b:8.1f} ({b / a:.2f})  bridged {c:8.1f} ({c / a_c:.2f} of its limit)"
              f"  generate {d:8.1f} (exact/generate {b / d:.2f})", file=sys.stderr, flush=True)  # fmt: skip
    rates = {r["batch"]: r["b_exact_tok_s"] for r in report["rows"]}
    if 1 in rates and len(rates) > 1:
        top = max(rates)
        report[f"b{top}_over_b1"] = rates[top] / rates[1]
    targets = {}
    for r in report["rows"]:
        if args.device == "cpu" and r["batch"] == 16:
            targets["b_over_a_at_16>=0.90"] = r["b_over_a"] >= 0.90
        if args.device == "cuda":
            targets[f"b_over_d_at_{r['batch']}>=0.8"] = r["b_over_d"] >= 0.8
            targets[f"b_over_a_at_{r['batch']}>=0.9"] = r["b_over_a"] >= 0.9
            targets[f"c_over_b_at_{r['batch']}>=0.75"] = r["c_over_b"] >= 0.75
    if args.device == "cuda" and "b64_over_b1" in report:
        targets["b64_over_b1>=10"] = report["b64_over_b1"] >= 10
    report["targets_met"] = targets


if __name__ == "__main__":
    main()

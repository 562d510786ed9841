"""Engine throughput against its physical limit, all in one run on the same models.

(a) limit    – a bare loop: one cached teacher forward and one cached student forward per token
(b) exact    – RSD, teacher and student share a tokenizer (qwen2)
(c) bridged  – RSD, qwen2 teacher and llama-bpe student (re-tokenising bridge)
(d) generate – transformers ``generate`` with the teacher alone (sampling, same budget)

Models are random (Llama architecture from configs; ``--preset qwen``: Qwen2.5-7B-shaped teacher, Qwen3-0.6B-
shaped student, bf16) with real vocabulary sizes. Stop tokens are disabled so every row decodes the full
budget. Throughput counts new tokens per second, prompt prefill included in every variant.

    python benchmarks/bench_engine.py --json
    python benchmarks/bench_engine.py --device cuda --preset qwen --json
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsd_toolkit.bridges import load_tokenizer  # noqa: E402
from rsd_toolkit.config import RSDConfig  # noqa: E402
from rsd_toolkit.engine import RSDEngine  # noqa: E402
from rsd_toolkit.models import LM  # noqa: E402

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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def two_forward_limit(teacher: LM, student: LM, batch: int, new_tokens: int, device: str) -> float:
    from transformers import DynamicCache

    ids = torch.tensor([teacher.prompt(PROMPT, RSDConfig())[1]] * batch, device=device)

    def run():
        tc, sc = DynamicCache(config=teacher.model.config), DynamicCache(config=student.model.config)
        kw = lambda m, c: {"cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values": c}  # noqa: E731
        t = teacher.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw(teacher.model, tc)).logits[:, -1]
        student.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw(student.model, sc))
        for _ in range(new_tokens):
            nxt = t.argmax(-1, keepdim=True)
            t = teacher.model(input_ids=nxt, use_cache=True, **kw(teacher.model, tc)).logits[:, -1]
            student.model(input_ids=nxt, use_cache=True, **kw(student.model, sc))

    return batch * new_tokens / timed(run, device)


def engine_rate(teacher: LM, student: LM, batch: int, new_tokens: int, device: str, mode: str = "rsd") -> tuple[float, dict]:
    engine = RSDEngine(teacher, student, RSDConfig(mode=mode, max_new_tokens=new_tokens))
    out = []
    seconds = timed(lambda: out.extend(engine.generate([PROMPT] * batch, batch_size=batch)), device)
    tokens = sum(len(t.ids) for t in out)
    accepted, decisions = sum(t.accepted for t in out), sum(t.decisions for t in out)
    info = {"kind": engine.kind, "tokens": tokens, "acceptance": accepted / decisions if decisions else None,
            **{k: v / tokens for k, v in engine.stats.items()}}  # fmt: skip
    return tokens / seconds, info


def width_cost_ms(lm: LM, batch: int, device: str) -> dict:
    """Time of one cached forward appending 1..4 tokens per row: what re-tokenising catch-up costs."""
    from rsd_toolkit.engine import BatchedContext

    ctx = BatchedContext(lm.model, batch)
    ctx.extend([lm.prompt(PROMPT, RSDConfig())[1]] * batch)
    out = {}
    for width in (1, 2, 3, 4):
        out[width] = 1000 * min(timed(lambda: ctx.extend([[7] * width] * batch), device) for _ in range(3))
    return out


@torch.inference_mode()
def generate_rate(teacher: LM, batch: int, new_tokens: int, device: str) -> float:
    ids = torch.tensor([teacher.prompt(PROMPT, RSDConfig())[1]] * batch, device=device)

    def run():
        teacher.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_p=0.95,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip

    return batch * new_tokens / timed(run, device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cpu on cpu, qwen on cuda")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the preset's)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--teacher-tokenizer", default="asset:qwen2")
    ap.add_argument("--bridged-student-tokenizer", default="asset:llama-bpe")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    preset = args.preset or ("qwen" if args.device == "cuda" else "cpu")
    batches = [int(b) for b in args.batches.split(",")] if args.batches else list(PRESETS[preset][4])
    n = args.new_tokens
    if args.device == "cpu":
        torch.set_num_threads(torch.get_num_threads())

    teacher = build(args.teacher_tokenizer, "teacher", preset, args.device)
    student = build(args.teacher_tokenizer, "student", preset, args.device)
    bridged_student = build(args.bridged_student_tokenizer, "student", preset, args.device)
    _, _, t_shape, s_shape, _ = PRESETS[preset]
    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "preset": preset, "new_tokens": n,
        "teacher_flops_per_token": flops_per_token(t_shape, teacher.vocab.size),
        "student_flops_per_token": flops_per_token(s_shape, student.vocab.size),
        "rows": [],
    }  # fmt: skip
    report["flops_ratio"] = report["teacher_flops_per_token"] / report["student_flops_per_token"]
    for batch in batches:
        # Warm-up at this batch size: allocator, kernels, clocks (a fresh GPU machine runs slow for many seconds).
        two_forward_limit(teacher, student, batch, 32, args.device)
        engine_rate(teacher, student, batch, 32, args.device)
        engine_rate(teacher, bridged_student, batch, 32, args.device)
        generate_rate(teacher, batch, 32, args.device)
        a = two_forward_limit(teacher, student, batch, n, args.device)
        b, b_info = engine_rate(teacher, student, batch, n, args.device)
        c, c_info = engine_rate(teacher, bridged_student, batch, n, args.device)
        d = generate_rate(teacher, batch, n, args.device)
        row = {"batch": batch, "a_limit_tok_s": a, "b_exact_tok_s": b, "c_bridged_tok_s": c, "d_teacher_generate_tok_s": d,
               "b_over_a": b / a, "c_over_b": c / b, "b_over_d": b / d, "exact": b_info, "bridged": c_info,
               "teacher_forward_ms_by_width": width_cost_ms(teacher, batch, args.device),
               "student_forward_ms_by_width": width_cost_ms(bridged_student, batch, args.device)}  # fmt: skip
        report["rows"].append(row)
        if not args.json:
            print(f"batch {batch:3d}: limit {a:8.1f}  exact {b:8.1f} ({b / a:.2f})  bridged {c:8.1f} ({c / b:.2f} of exact)"
                  f"  generate {d:8.1f} (exact/generate {b / d:.2f})", flush=True)  # fmt: skip
    rates = {r["batch"]: r["b_exact_tok_s"] for r in report["rows"]}
    if 1 in rates and len(rates) > 1:
        top = max(rates)
        report[f"b{top}_over_b1"] = rates[top] / rates[1]
    targets = {}
    for r in report["rows"]:
        if args.device == "cpu" and r["batch"] == 16:
            targets["b_over_a_at_16>=0.90"] = r["b_over_a"] >= 0.90
        targets[f"c_over_b_at_{r['batch']}>=0.75"] = r["c_over_b"] >= 0.75
        if args.device == "cuda":
            targets[f"b_over_d_at_{r['batch']}>=0.8"] = r["b_over_d"] >= 0.8
    if args.device == "cpu" and "b32_over_b1" in report:
        targets["b32_over_b1>=8"] = report["b32_over_b1"] >= 8
    report["targets_met"] = targets
    print(json.dumps(report, indent=2) if args.json else json.dumps(targets, indent=2))


if __name__ == "__main__":
    main()

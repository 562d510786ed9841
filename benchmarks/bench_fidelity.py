"""Fidelity benchmark: how many sub-pth tokens teacher and RSD traces hold, on real models, with intervals.

Pairs: the real SmolLM2-135M-Instruct teacher with (a) the demo student (Mistral SentencePiece tokenizer:
cross-family, bridged) and (b) the distilled same-tokenizer student (``students.py``: SmolLM2's first 6
layers distilled on the teacher's traces; run through the text bridge so its ids are the canonical
encoding of the text, the tokens ``rsd surprisal`` and SFT see). Rows: teacher-only, RSD ``sample``, RSD
``strict``, the paper's reference configuration; prompts are added until a row has ``--min-tokens`` scored
tokens. Every token is scored three ways and compared: the engine's p_s, ``rsd surprisal`` on the record
file (``load_items`` + ``score_items``), and an independent fp32 re-score (a plain forward of prompt +
encode(text) + stop, log-softmax in float64). Sub-pth ratios come with Clopper-Pearson 95 % intervals.

    python benchmarks/bench_fidelity.py --json > benchmarks/results_fidelity_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rsd_toolkit.config import RSDConfig  # noqa: E402
from rsd_toolkit.engine import RSDEngine  # noqa: E402
from rsd_toolkit.models import LM  # noqa: E402

LOG_TOL = 1e-3  # |ln p| difference counted as a disagreement (fp32 forwards along different paths agree to ~1e-5)


def interval(k: int, n: int) -> list[float]:
    """Clopper-Pearson (exact binomial) 95 % interval of k / n."""
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [ci.low, ci.high]


@torch.inference_mode()
def rescore_fp32(lm: LM, prompt: str, text: str, stop: int | None) -> tuple[list[int], torch.Tensor]:
    """Independent score: one plain forward of the whole sequence (no cache, no engine code), float64
    log-softmax. Returns the completion ids and ln p of each [n]."""
    _, prompt_ids = lm.prompt(prompt, RSDConfig())
    ids = lm.vocab.encode(text) + ([] if stop is None else [stop])
    full = torch.tensor([prompt_ids + ids])  # [1, P + n]
    logits = lm.model(input_ids=full).logits[0, len(prompt_ids) - 1 : -1, : lm.vocab.size]  # [n, V]
    logp = logits.double().log_softmax(-1)
    return ids, logp[torch.arange(len(ids)), torch.tensor(ids)]


def run_row(label: str, teacher: LM, student: LM, config: RSDConfig, bridge: str | None, problems, min_tokens: int,
            batch: int, out_dir: Path) -> dict:
    from rsd_toolkit.surprisal import load_items, score_items

    engine = RSDEngine(teacher, student, config, bridge_kind=bridge)
    traces, used, t0 = [], [], time.perf_counter()
    last_resort_events = 0
    while sum(len(t.ids) for t in traces) < min_tokens:
        chunk = problems[len(used) : len(used) + batch]
        if not chunk:
            break
        out = engine.generate([p.question for p in chunk], seeds=[p.index for p in chunk], batch_size=batch)
        traces += out
        last_resort_events += out.stats["strict_last_resort"]
        used += chunk
    gen_s = time.perf_counter() - t0
    path = out_dir / f"{label.replace(' ', '_').replace('/', '-')}.jsonl"
    with open(path, "w", encoding="utf-8") as f:  # the record fields `rsd generate` writes that scoring reads
        for p, t in zip(used, traces):
            f.write(json.dumps({"id": p.id + f"#{p.index}", "question": p.question, "text": t.text, "ids": t.ids,
                                "finish_reason": t.finish_reason, "kind": "full"}) + "\n")  # fmt: skip
    scored = {s.id: s for s in score_items(student, load_items(str(path)))}
    pth = config.pth
    n = sub = lr = id_mismatch = surprisal_disagree = rescore_disagree = class_disagree = 0
    max_diff_s = max_diff_r = 0.0
    surprisal_sum = 0.0
    for p, t in zip(used, traces):
        eng = torch.tensor([math.log(max(r.p_s, 1e-300)) for r in t.records], dtype=torch.float64)  # [n]
        stop = t.ids[-1] if t.finish_reason == "eos" else None
        r_ids, r_logp = rescore_fp32(student, p.question, t.text, stop)
        s = scored.get(p.id + f"#{p.index}")
        s_ids, s_logp = (s.ids, s.logprobs.double()) if s is not None else ([], torch.zeros(0))
        n += len(t.ids)
        sub += t.sub_pth
        lr += t.last_resorts
        surprisal_sum += float(-r_logp.sum())
        if r_ids != t.ids or s_ids != t.ids:
            id_mismatch += max(len(t.ids), len(r_ids), len(s_ids))
            continue
        ds, dr = (eng - s_logp).abs(), (eng - r_logp).abs()
        if len(t.ids):
            max_diff_s, max_diff_r = max(max_diff_s, float(ds.max())), max(max_diff_r, float(dr.max()))
        surprisal_disagree += int((ds > LOG_TOL).sum())
        rescore_disagree += int((dr > LOG_TOL).sum())
        below = lambda lp: lp < math.log(pth)  # noqa: E731
        class_disagree += int((below(eng) != below(r_logp)).sum() + (below(eng) != below(s_logp)).sum())
    decisions = sum(t.decisions for t in traces)
    return {
        "row": label, "mode": config.mode, "fallback": config.fallback if config.mode == "rsd" else None,
        "reference": config.student_topk_gate, "bridge": engine.kind, "traces": len(traces),
        "eos_traces": sum(t.finish_reason == "eos" for t in traces), "tokens": n, "sub_pth": sub,
        "sub_pth_ratio": sub / n if n else None, "sub_pth_ci95": interval(sub, n) if n else None,
        "acceptance_pooled": sum(t.accepted for t in traces) / decisions if decisions else None,
        "acceptance_mean": (sum(t.acceptance_rate for t in traces if t.decisions) / max(1, sum(1 for t in traces if t.decisions))
                            if decisions else None),  # fmt: skip
        "mean_surprisal": surprisal_sum / n if n else None, "last_resort_tokens": lr,
        "last_resort_events": last_resort_events, "sub_pth_outside_last_resorts": sub - lr,
        "id_mismatch_tokens": id_mismatch, "engine_vs_surprisal_disagree": surprisal_disagree,
        "engine_vs_rescore_disagree": rescore_disagree, "sub_pth_class_disagree": class_disagree,
        "max_abs_dlogp_surprisal": max_diff_s, "max_abs_dlogp_rescore": max_diff_r, "generate_s": round(gen_s, 1),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-tokens", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pairs", default="cross,same")
    ap.add_argument("--rows", default="teacher,rsd sample,rsd strict,rsd reference", help="rows to run (labels)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--merge", nargs="+", help="join the JSON reports of runs over different --pairs and exit")
    args = ap.parse_args()
    if args.merge:
        reports = [json.loads(Path(f).read_text()) for f in args.merge]
        joined = {**reports[0], "rows": [r for rep in reports for r in rep["rows"]],
                  "runs": [{k: v for k, v in rep.items() if k != "rows"} for rep in reports]}  # fmt: skip
        print(json.dumps(joined, indent=1))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from rsd_toolkit import demo
    from rsd_toolkit.models import load_lm
    from students import demo_student_dir, load_distilled_student

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    teacher = load_lm("asset:smollm2", dtype="float32", device="cpu")
    problems = demo.arithmetic_problems(400, seed=1)  # held out from both students' training
    base = RSDConfig(max_new_tokens=args.max_new_tokens, seed=0)
    configs = [("teacher", replace(base, mode="teacher")), ("rsd sample", base),
               ("rsd strict", replace(base, fallback="strict")),
               ("rsd reference", RSDConfig.reference(max_new_tokens=args.max_new_tokens, seed=0))]  # fmt: skip
    report: dict = {"benchmark": "fidelity", "teacher": "SmolLM2-135M-Instruct (asset:smollm2)", "pth": base.pth,
                    "temperature": base.temperature, "top_p": base.top_p, "max_new_tokens": args.max_new_tokens,
                    "min_tokens_per_row": args.min_tokens, "log_tolerance": LOG_TOL, "torch_threads": torch.get_num_threads(),
                    "pairs": args.pairs, "loadavg_start": os.getloadavg(), "rows": []}  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs.split(","):
            if pair == "cross":
                student, bridge, name = load_lm(demo_student_dir(), dtype="float32", device="cpu"), None, "demo student (asset:mistral-v1)"
            else:
                student, bridge, name = load_distilled_student(), "bridged", "distilled SmolLM2 first-6-layers (same tokenizer)"
            for label, cfg in [c for c in configs if c[0] in args.rows.split(",")]:
                log(f"{pair}: {label}")
                row = run_row(f"{pair}/{label}", teacher, student, cfg, bridge, problems, args.min_tokens, args.batch, Path(tmp))
                row.update(pair=pair, student=name)
                report["rows"].append(row)
                log(json.dumps(row))
    report.update(loadavg_end=os.getloadavg(), total_s=round(time.perf_counter() - t0, 1))
    print(json.dumps(report, indent=1) if args.json else "\n".join(json.dumps(r) for r in report["rows"]))


if __name__ == "__main__":
    main()

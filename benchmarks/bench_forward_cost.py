"""The cost of one cached forward over n positions, against one pass over the weights, on the real models.

For each model (Qwen2.5-Coder-1.5B-Instruct, Qwen2.5-Coder-0.5B-Instruct, SmolLM2-135M-Instruct; fp32 by
default) a ``BatchedContext`` holds a 128-token prompt per row; then, interleaved per repeat (the machine is
noisy: read the ratios), it times

* ``positions``: one forward over n = 1…9 new positions at batch 1, keeping the logits of all n (a verify);
* ``batch``: one forward over one position at batch 1…16 (a decode step);

each once with plain ``F.linear`` (MKL) and once inside ``PackedLinears`` (oneDNN on prepacked weights), with
the same tokens. The physical limit is measured in the same run: weight bytes ÷ the read bandwidth of a
tensor larger than the last-level cache (``limit_ms``). Ratios: ``cost(n) / cost(1)`` per variant, and
``cost / limit``. ``--dtype bfloat16`` measures the bf16 path (what ``--dtype bfloat16`` gives on a CPU with
AMX/AVX512-BF16).

    python benchmarks/bench_forward_cost.py --json
    python benchmarks/bench_forward_cost.py --models qwen-coder-1.5b --dtype bfloat16 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsd_toolkit import assets  # noqa: E402
from rsd_toolkit.engine.context import BatchedContext  # noqa: E402
from rsd_toolkit.engine.packed import PackedLinears  # noqa: E402
from rsd_toolkit.models import load_lm  # noqa: E402

PROMPT_TOKENS = 128


def read_bandwidth(mib: int = 2048, repeats: int = 5) -> float:
    """Bytes per second read by a sum over a tensor larger than the last-level cache (best of ``repeats``)."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = min(_clock(x.sum) for _ in range(repeats))
    return x.numel() * 4 / best


def _clock(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def weight_bytes(model) -> int:
    """Bytes a decode step reads at least once: every weight (a tied head counted once; embeddings read one
    row per token, so they are left out unless tied to the head)."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if head.data_ptr() != emb.data_ptr():
        total -= emb.numel() * emb.element_size()
    return total


def forward_ms(ctx: BatchedContext, appends: list[list[int]], scores: bool) -> float:
    """One ``extend`` (timed), then the rows roll back: the context is as before, less the holes."""
    seconds = _clock(lambda: ctx.extend(appends, scores=scores))
    for row, a in enumerate(appends):
        ctx.rollback(row, len(a))
    ctx.maybe_compact(slack=0)
    return seconds * 1e3


def measure(lm, packed: PackedLinears, widths: list[int], batches: list[int], repeats: int) -> dict:
    torch.manual_seed(0)
    vocab = lm.model.config.vocab_size
    prompts = torch.randint(1000, min(vocab, 30000), (max(batches), PROMPT_TOKENS)).tolist()
    variants = {"plain": None, "packed": packed}
    contexts = {}
    for name, p in variants.items():
        for batch in sorted(set(batches) | {1}):
            ctx = BatchedContext(lm.model, batch, packed=p)
            ctx.extend(prompts[:batch])
            contexts[name, batch] = ctx
    pos = {(name, n): [] for name in variants for n in widths}
    bat = {(name, b): [] for name in variants for b in batches}
    tokens = prompts[0][:max(widths)]
    for r in range(repeats + 1):  # the first round warms up
        for n in widths:
            for name in variants:
                ms = forward_ms(contexts[name, 1], [tokens[:n]], scores=True)
                if r:
                    pos[name, n].append(ms)
        for b in batches:
            for name in variants:
                ms = forward_ms(contexts[name, b], [[t] for t in tokens[:1] * b], scores=False)
                if r:
                    bat[name, b].append(ms)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {
        "positions": {name: {str(n): round(med(pos[name, n]), 2) for n in widths} for name in variants},
        "batch": {name: {str(b): round(med(bat[name, b]), 2) for b in batches} for name in variants},
    }


def check_equal(lm, packed: PackedLinears, width: int = 5) -> float:
    """Max |Δlogit| / max |logit| between the two variants over a ``width``-position forward."""
    ids = torch.randint(1000, 30000, (1, PROMPT_TOKENS + width)).tolist()[0]
    outs = []
    for p in (None, packed):
        ctx = BatchedContext(lm.model, 1, packed=p)
        ctx.extend([ids[:PROMPT_TOKENS]])
        outs.append(ctx.extend([ids[PROMPT_TOKENS:]], scores=True)[0])
    return ((outs[0] - outs[1]).abs().max() / outs[0].abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen-coder-1.5b,qwen-coder-0.5b,smollm2")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--widths", default="1,2,3,4,5,6,7,8,9")
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    widths = [int(x) for x in args.widths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    bandwidth = read_bandwidth()
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "read_bandwidth_gb_s": round(bandwidth / 1e9, 1)},
        "dtype": args.dtype, "repeats": args.repeats, "models": {},
    }  # fmt: skip
    for name in args.models.split(","):
        assets.asset_path(name)  # one line naming the fetch command when missing
        lm = load_lm(f"asset:{name}", dtype=args.dtype)
        t0 = time.perf_counter()
        packed = PackedLinears(lm.model)
        pack_s = time.perf_counter() - t0
        limit_ms = weight_bytes(lm.model) / bandwidth * 1e3
        row = {"weight_gb": round(weight_bytes(lm.model) / 1e9, 3), "limit_ms": round(limit_ms, 2),
               "pack_seconds": round(pack_s, 1), "packed_gb": round(packed.nbytes / 1e9, 3),
               "max_rel_logit_diff": check_equal(lm, packed)}  # fmt: skip
        row.update(measure(lm, packed, widths, batches, args.repeats))
        for kind, base in (("positions", "1"), ("batch", "1")):
            row[f"{kind}_over_one"] = {v: {k: round(ms / row[kind][v][base], 2) for k, ms in row[kind][v].items()} for v in row[kind]}
            row[f"{kind}_over_limit"] = {v: {k: round(ms / limit_ms, 2) for k, ms in row[kind][v].items()} for v in row[kind]}
        report["models"][name] = row
        print(json.dumps({name: {k: row[k] for k in ("limit_ms", "positions_over_one", "max_rel_logit_diff")}}), file=sys.stderr, flush=True)
        del lm, packed
    big = report["models"].get("qwen-coder-1.5b")
    if big and args.dtype == "float32" and "5" in big["positions"]["packed"]:
        five = big["positions"]
        report["target_1p5b_5_positions_le_1_3x_one"] = {
            "packed_5_over_packed_1": big["positions_over_one"]["packed"]["5"],
            "packed_5_over_plain_1": round(five["packed"]["5"] / five["plain"]["1"], 2),
            "plain_5_over_plain_1": big["positions_over_one"]["plain"]["5"],
            "met": big["positions_over_one"]["packed"]["5"] <= 1.3 and five["packed"]["5"] <= 1.3 * five["plain"]["1"]}  # fmt: skip
    print(json.dumps(report, indent=2 if args.json else None))


if __name__ == "__main__":
    main()

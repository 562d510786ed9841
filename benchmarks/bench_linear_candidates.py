"""Candidates for a linear layer over a few rows on CPU, side by side, against one pass over the weight.

One [N, K] fp32 weight shape (default the 1.5B Qwen's MLP, [8960, 1536]), ``--copies`` distinct weights cycled
so that every call reads its weight from memory (their total exceeds the last-level cache), rows 1…16:

* ``mkl`` – ``F.linear`` (MKL: matrix-vector for one row, GEMM for more), on 2 threads and on 1;
* ``mkl_packed`` – MKL's GEMM on a weight packed once (``torch.ops.mkl._mkl_linear``);
* ``onednn_packed`` – oneDNN on a weight reordered once (``torch.ops.mkldnn._linear_pointwise``, what
  ``engine/packed.py`` uses, and what inductor's CPU freezing emits);
* ``compiled`` – ``torch.compile`` of a module holding the weight, with freezing (inductor's CPU lowering);
* ``bf16`` / ``bf16_onednn_packed`` – the same in bfloat16 (half the bytes; lossy, only when asked for).

The limit: weight bytes ÷ the read bandwidth of a sum over a 512 MiB tensor, measured in the same run.

    python benchmarks/bench_linear_candidates.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def per_call_ms(fn, copies: int, repeats: int = 3) -> float:
    for i in range(copies):
        fn(i)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(copies):
            fn(i)
    return (time.perf_counter() - t0) / (repeats * copies) * 1e3


def cold_ms(fn, flush: torch.Tensor, repeats: int = 5) -> float:
    """Median ms of one call right after reading ``flush`` (larger than the last-level cache)."""
    times = []
    for _ in range(repeats + 1):
        flush.sum()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[repeats // 2] * 1e3


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8960,1536")
    ap.add_argument("--copies", type=int, default=24)
    ap.add_argument("--rows", default="1,2,3,5,9,16")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes on 2 cores)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    N, K = (int(x) for x in args.shape.split(","))
    torch.manual_seed(0)
    weights = [torch.randn(N, K) for _ in range(args.copies)]
    big = torch.ones(2**27)
    read = big.numel() * 4 / (per_call_ms(lambda i: big.sum(), 1, 3) / 1e3)
    limit = N * K * 4 / read * 1e3
    report = {"shape": [N, K], "copies": args.copies, "threads": torch.get_num_threads(),
              "read_bandwidth_gb_s": round(read / 1e9, 1), "limit_ms": round(limit, 3), "cpu": cpu_model(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "onednn_bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported(), "rows": {}}  # fmt: skip
    compiled = None
    if not args.no_compile:
        import torch._inductor.config as inductor

        inductor.freezing = True
        modules = [torch.nn.Linear(K, N, bias=False) for _ in range(2)]
        for m, w in zip(modules, weights):
            m.weight.data = w
        t0 = time.perf_counter()
        compiled = [torch.compile(m.eval(), dynamic=False) for m in modules]
        report["compile_note"] = "one compile per weight and row count; *_cold: one call after evicting the cache"
    half = [w.to(torch.bfloat16) for w in weights]
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, K)
        xb = x.to(torch.bfloat16)
        row = {"mkl": per_call_ms(lambda i: F.linear(x, weights[i]), args.copies)}
        torch.set_num_threads(1)
        row["mkl_1_thread"] = per_call_ms(lambda i: F.linear(x, weights[i]), args.copies)
        torch.set_num_threads(report["threads"])
        packs = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights]
        row["mkl_packed"] = per_call_ms(lambda i: torch.ops.mkl._mkl_linear(x, packs[i], weights[i], None, m), args.copies)
        packs = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in weights]
        out = torch.ops.mkldnn._linear_pointwise(x, packs[0], None, "none", [], "")
        row["onednn_packed_max_abs_diff"] = (out - F.linear(x, weights[0])).abs().max().item()
        row["onednn_packed"] = per_call_ms(lambda i: torch.ops.mkldnn._linear_pointwise(x, packs[i], None, "none", [], ""), args.copies)
        del packs
        if compiled is not None:
            with torch.no_grad():
                t0 = time.perf_counter()
                for c in compiled:
                    c(x)
                row["compile_seconds"] = time.perf_counter() - t0
                # each call after a 512 MiB read that evicts its weight, beside MKL timed the same way
                row["compiled_cold"] = cold_ms(lambda: compiled[0](x), big)
                row["mkl_cold"] = cold_ms(lambda: F.linear(x, weights[0]), big)
        row["bf16"] = per_call_ms(lambda i: F.linear(xb, half[i]), args.copies)
        if report["onednn_bf16"]:  # an AVX2-only CPU has no oneDNN bf16 path (its reorder raises)
            packs = [torch.ops.mkldnn._reorder_linear_weight(w, 8) for w in half]
            row["bf16_onednn_packed"] = per_call_ms(lambda i: torch.ops.mkldnn._linear_pointwise(xb, packs[i], None, "none", [], ""), args.copies)
            del packs
        row = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        row["over_limit"] = {k: round(v / limit, 2) for k, v in row.items() if isinstance(v, float) and k not in ("compile_seconds", "onednn_packed_max_abs_diff")}
        report["rows"][str(m)] = row
        print(m, row, file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2 if args.json else None))


if __name__ == "__main__":
    main()

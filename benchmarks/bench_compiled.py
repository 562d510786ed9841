"""The compiled bridge against its Python source, on the same steps: CPU µs per push at batch 64.

Each round runs the corpus batch-64 rows of ``bench_bridges.py`` (every bridged and remappable pair, 64 rows
of their own text, ``push_all`` per step; plain pushes and the engine's copy-then-push) in two child
processes, one with the compiled modules and one with ``RSD_PURE_PYTHON=1``, in alternating order; the best
of ``--rounds`` per variant is kept (the host is noisy), and the ratio is compiled / source. One core
(``torch``, tokenizers: 1 thread).

    python benchmarks/bench_compiled.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PAIRS = [("qwen2", "llama-bpe"), ("llama-bpe", "qwen2"), ("qwen2", "gpt-2"), ("llama-bpe", "mistral-v1"),
         ("mistral-v1", "llama-bpe"), ("gpt-2", "tekken"), ("mistral-v1", "mistral-v3")]  # fmt: skip


def child(batch: int, chars: int) -> None:
    """One variant's rows, as JSON on stdout."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_bridges as bb  # sets the one-thread environment before torch and tokenizers load
    import torch

    from rsd_toolkit import bridges

    torch.set_num_threads(1)
    rows = {}
    for a, b in PAIRS:
        bridge = bb.loaded_bridge(a, b)
        streams = [bridge.teacher.encode(bb.corpus(chars, seed=10 + r)) for r in range(batch)]
        plain = bb.run_batch(bridge, streams, extras=False)  # (exactness: bench_bridges.py and the tests)
        trial = bb.run_batch(bridge, streams, trial=True)
        rows[f"{a}->{b}"] = {"us_cpu_per_push": plain["us_cpu_per_push"], "trial_us_cpu_per_push": trial["us_cpu_per_push"]}
    print(json.dumps({"compiled": bridges.compiled(), "rows": rows}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON only")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each variant (alternating; best kept)")
    ap.add_argument("--batch", type=int, default=64, help="rows per step")
    ap.add_argument("--chars", type=int, default=3000, help="text per row (characters)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.batch, args.chars)
    best: dict[str, dict] = {"compiled": {}, "source": {}}
    for k in range(args.rounds):
        for variant in ("compiled", "source") if k % 2 == 0 else ("source", "compiled"):
            env = {**os.environ, "RSD_PURE_PYTHON": "1" if variant == "source" else "0"}
            cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch), "--chars", str(args.chars)]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            got = json.loads(run.stdout.splitlines()[-1])
            if got["compiled"] != (variant == "compiled"):
                sys.exit(f"error: the {variant} run reported compiled={got['compiled']} (build the package: pip install -e .)")
            for pair, row in got["rows"].items():
                mine = best[variant].setdefault(pair, dict(row))
                for key, value in row.items():
                    mine[key] = min(mine[key], value)
            if not args.json:
                print(variant, got["rows"], file=sys.stderr)
    rows = []
    for pair in best["compiled"]:
        c, s = best["compiled"][pair], best["source"][pair]
        rows.append({"pair": pair, "compiled_us_cpu_per_push": c["us_cpu_per_push"], "source_us_cpu_per_push": s["us_cpu_per_push"],
                     "compiled_over_source": round(c["us_cpu_per_push"] / s["us_cpu_per_push"], 3),
                     "compiled_pushes_per_cpu_s": round(1e6 / c["us_cpu_per_push"]),
                     "trial_compiled_over_source": round(c["trial_us_cpu_per_push"] / s["trial_us_cpu_per_push"], 3)})  # fmt: skip
    print(json.dumps({
        "benchmark": "compiled bridge vs source", "batch": args.batch, "rounds": args.rounds,
        "cpu_count": os.cpu_count(), "rows": rows,
        "max_compiled_over_source": max(r["compiled_over_source"] for r in rows),
        "min_compiled_pushes_per_cpu_s": min(r["compiled_pushes_per_cpu_s"] for r in rows),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()

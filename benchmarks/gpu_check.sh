#!/usr/bin/env bash
# The engine's GPU checks in one run (~10 min on an H100/H200): the CUDA-graph tests (graph == eager
# tokens), then the qwen-preset benchmark at batch 1 and 64 (exact and bridged RSD, two-forward limit,
# teacher-only generate, per-model step ms, graph hit rate). JSON goes to ${OUT:-.}/results_engine_cuda.json.
set -euo pipefail
out=${OUT:-.}
export PYTHONUNBUFFERED=1
python -m pytest -q tests/test_engine.py tests/test_context.py -k "static or cuda or graph" 2>&1 | tee "$out/gpu_tests.log"
python benchmarks/bench_engine.py --device cuda --preset qwen --batches 1,64 --json > "$out/results_engine_cuda.json"
# speculative RSD rows (K = 0, 2, 4, 8 at batch 1, 4, 16) on the real SmolLM2 teacher with the distilled
# same-tokenizer student: needs the fetched assets (RSD_CACHE carried along; the device reaches no registry)
python benchmarks/bench_engine.py --device cuda --workload speculative --batches 1,4,16 --draft-tokens 0,2,4,8 \
    --json > "$out/results_engine_speculative_cuda.json"
# the real identical pair (Qwen2.5-Coder-1.5B -> 0.5B, bf16), K = 0, 2, 3, 4, 6 at batch 1 and 16: needs
# `rsd assets fetch --group qwen-coder-1.5b --group qwen-coder-0.5b` in the RSD_CACHE the device sees (1.6 GB: more
# than a carried folder holds, so it runs only where the cache is there)
if python -c "from rsd_toolkit import assets; assets.asset_path('qwen-coder-1.5b'); assets.asset_path('qwen-coder-0.5b')" 2>/dev/null; then
    python benchmarks/bench_engine.py --device cuda --workload speculative --pair qwen-coder --dtype bfloat16 \
        --batches 1,16 --draft-tokens 0,2,3,4,6 --new-tokens 256 --json > "$out/results_engine_real_pair_cuda.json"
else
    echo "qwen-coder assets not in RSD_CACHE: real-pair rows skipped" | tee "$out/results_engine_real_pair_cuda.skipped"
fi
python - "$out/results_engine_cuda.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps(r["targets_met"], indent=2))
for row in r["rows"]:
    print(row["batch"], {k: round(v, 3) for k, v in row.items() if isinstance(v, float)},
          row.get("step_ms_per_model"), row["exact"].get("teacher_graph_hit_rate"))
PY

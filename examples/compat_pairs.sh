#!/usr/bin/env bash
# Compatibility reports for the real tokenizer pairs the bridges are tested on (run `rsd assets fetch` first).
set -euo pipefail
for pair in "qwen2 llama-bpe" "qwen2 gpt-2" "llama-bpe mistral-v1" "gpt-2 tekken" "mistral-v1 mistral-v3" "qwen2 qwen2"; do
  set -- $pair
  printf '%-12s -> %-12s ' "$1" "$2"
  rsd compat "asset:$1" "asset:$2" --json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["verdict"], "boundaries in common: %.1f%%" % (100*r["boundary_agreement"]))'
done

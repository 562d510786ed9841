"""Scoring throughput (``score_completions``, what ``rsd surprisal`` runs) against a bare batched forward.

Both run in this process on the same model, the same traces and the same batches (sorted by length):

  bare    – ``model(input_ids, attention_mask)`` over each right-padded batch, logits for every position:
            the physical limit (a scorer must compute exactly these logits)
  scoring – ``score_completions``: prompt prefill, completion columns in chunks through the engine's
            BatchedContext, log-probabilities of the chosen tokens

Traces: random token ids with lengths spread like real traces (--min-len..--max-len), prompts of 24-64
tokens. Throughput counts completion tokens per second. The target is scoring/bare >= 0.9.

    python benchmarks/bench_surprisal.py --json                      # SmolLM2-135M (real weights) on CPU
    python benchmarks/bench_surprisal.py --model random-qwen --json  # 150k vocabulary, random weights
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsd_toolkit.engine.scoring import score_completions  # noqa: E402
from rsd_toolkit.models import LM, load_lm  # noqa: E402


def model(name: str, device: str) -> LM:
    if name == "smollm2":
        return load_lm("asset:smollm2", dtype="float32", device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    from rsd_toolkit.bridges import load_tokenizer

    tok = load_tokenizer("asset:qwen2")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    return LM.wrap(LlamaForCausalLM(cfg).eval().to(device), tok, name="random-qwen")


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, vocab, (int(torch.randint(24, 65, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    completions = [torch.randint(10, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return prompts, completions


@torch.inference_mode()
def bare(lm: LM, prompts, completions, batch_size: int) -> tuple[float, int]:
    """Seconds for plain forwards over the same sorted batches; returns (seconds, padded cells)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]), reverse=True)
    device = lm.model.get_input_embeddings().weight.device
    cells = 0
    t0 = time.perf_counter()
    for s in range(0, len(order), batch_size):
        seqs = [prompts[i] + completions[i] for i in order[s : s + batch_size]]
        width = max(map(len, seqs))
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, seq in enumerate(seqs):
            ids[j, : len(seq)] = torch.tensor(seq)
            mask[j, : len(seq)] = 1
        logits = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        cells += ids.numel()
        del logits
    _sync(device)
    return time.perf_counter() - t0, cells


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "random-qwen"], default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--traces", type=int, default=48)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="Alternating runs of each variant; the best is reported.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    lm = model(args.model, args.device)
    prompts, completions = workload(args.traces, args.min_len, args.max_len, lm.vocab.size)
    tokens = sum(map(len, completions))
    score_completions(lm, prompts[:2], [c[:16] for c in completions[:2]])  # warm-up
    times = {"bare": [], "scoring": []}
    computed = {}
    for _ in range(args.repeats):  # alternate, so machine noise hits both alike
        t, computed["bare"] = bare(lm, prompts, completions, args.batch_size)
        times["bare"].append(t)
        t0 = time.perf_counter()
        score_completions(lm, prompts, completions, batch_size=args.batch_size)
        _sync(args.device)
        times["scoring"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    result = {
        "benchmark": "surprisal_scoring",
        "model": lm.name,
        "device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "traces": args.traces,
        "completion_tokens": tokens,
        "prompt_tokens": sum(map(len, prompts)),
        "batch_size": args.batch_size,
        "bare_padded_cells": computed["bare"],
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in best.items()},
        "scoring_vs_bare": round(best["bare"] / best["scoring"], 3),
        "target": 0.9,
    }
    result["target_met"] = result["scoring_vs_bare"] >= result["target"]
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

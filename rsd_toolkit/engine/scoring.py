"""Teacher-forced scoring: the log-probability a model gives each token of a completion after its prompt.

It runs through the engine's own routines: ``BatchedContext.extend`` (the one place a model runs) and
``TokenProbs`` (chosen-token probabilities from one log-sum-exp). Sequences are sorted by length so a
batch pads little; completion columns go in chunks so the [rows, columns, vocab] logits stay within
``max_logit_elements`` (a 150k vocabulary at 16 rows x 1024 columns would be 10 GB of float32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..models import LM
from .context import BatchedContext
from .sampling import TokenProbs, fit_vocab

MAX_LOGIT_ELEMENTS = 2**26  # 256 MB of float32 logits per chunk


def chunk_columns(rows: int, vocab: int, max_logit_elements: int = MAX_LOGIT_ELEMENTS) -> int:
    """Completion columns per forward so that rows x columns x vocab logits fit the budget."""
    return max(1, min(1024, max_logit_elements // max(1, rows * vocab)))


@torch.inference_mode()
def score_completions(
    lm: LM,
    prompts: list[list[int]],
    completions: list[list[int]],
    *,
    batch_size: int = 16,
    temperature: float = 1.0,
    max_logit_elements: int = MAX_LOGIT_ELEMENTS,
    progress: Callable[[int, int], None] | None = None,
) -> list[torch.Tensor]:
    """Per sequence, float32 log p(completion[k] | prompt, completion[:k]) for every k (on the CPU).

    ``prompts[i]`` must hold at least one token (the first completion token is predicted from it);
    ``progress(sequences, tokens)`` is called after each batch.
    """
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in length")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS) to predict the first completion token")
    # Longest first: an out-of-memory error shows up in the first batch, not after an hour.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]), reverse=True)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ctx = BatchedContext(lm.model, len(idx))
        ctx.extend([prompts[i] for i in idx])
        parts: list[list[torch.Tensor]] = [[] for _ in idx]
        width = max(len(completions[i]) for i in idx)
        step = chunk_columns(len(idx), ctx.last_logits.shape[-1], max_logit_elements)
        for c0 in range(0, width, step):
            appends = [completions[i][c0 : c0 + step] for i in idx]
            outs = ctx.extend(appends, scores=True)  # per row: logits predicting each appended token
            for j, a in enumerate(appends):
                if a:
                    preds = fit_vocab(outs[j], lm.vocab.size)
                    tok = torch.tensor(a, device=preds.device)
                    parts[j].append(TokenProbs(preds, temperature).log_at(torch.arange(len(a), device=preds.device), tok).cpu())
        for j, i in enumerate(idx):
            out[i] = torch.cat(parts[j]) if parts[j] else torch.zeros(0)
        if progress is not None:
            progress(len(idx), sum(len(completions[i]) for i in idx))
    return out  # type: ignore[return-value]

"""Sampling and RSD's acceptance rule as plain functions over explicit tensors: one routine for teacher
proposals, student fallbacks and plain generation; one for scoring chosen tokens; one rule.

Randomness comes in as uniforms ``u`` (one row of them per sequence, drawn from that sequence's own
generator), so a sequence's samples do not depend on which batch it shares. Sampling is inverse-CDF
(one cumulative sum, no sort); nucleus (top-p) truncation is exact by rejection: a draw from the full
distribution is kept when the mass of tokens strictly more probable than it is below ``top_p``, which
is the renormalised top-p distribution. A full sort of a 150k vocabulary costs ~80 ms per 16 rows on
a CPU; this costs two passes.
"""

from __future__ import annotations

import torch

from ..config import RSDConfig

TOP_P_TRIES = 4  # rejection tries before the exact sort fallback (all fail with prob (1-top_p)^4)
UNIFORMS_PER_DRAW = TOP_P_TRIES + 1


def tempered_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax at ``temperature`` in float32; temperature 0 gives the one-hot argmax (greedy)."""
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(logits / temperature, dim=-1)


def acceptance_probs(logits: torch.Tensor, config: RSDConfig) -> torch.Tensor:
    """The student probabilities compared with ``pth`` (temperature 1, or the sampling temperature)."""
    if config.acceptance_probs == "raw":
        return torch.softmax(logits.float(), dim=-1)
    return tempered_probs(logits, config.temperature)


class TokenProbs:
    """Probabilities of chosen tokens without materialising a [rows, vocab] softmax: one log-sum-exp per row."""

    def __init__(self, logits: torch.Tensor, temperature: float = 1.0):
        self.logits = logits
        self.temperature = temperature
        if temperature == 0:
            self.lse = None
        else:
            self.lse = torch.logsumexp(logits.float() / temperature, dim=-1)

    @classmethod
    def acceptance(cls, logits: torch.Tensor, config: RSDConfig) -> "TokenProbs":
        """The probabilities compared with pth (see :func:`acceptance_probs`)."""
        return cls(logits, 1.0 if config.acceptance_probs == "raw" else config.temperature)

    def at(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.log_at(rows, ids))

    def log_at(self, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (no underflow to 0 for very unlikely tokens: surprisal stays finite)."""
        if self.lse is None:  # greedy: probability 1 for the argmax, 0 otherwise
            hit = self.logits[rows].argmax(-1) == ids
            return torch.where(hit, 0.0, -torch.inf)
        return self.logits[rows, ids].float() / self.temperature - self.lse[rows]


def fit_vocab(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Logits cut (or padded with -inf) to the tokenizer's size: padded embedding rows are never sampled."""
    if logits.shape[-1] > size:
        return logits[..., :size]
    if logits.shape[-1] < size:
        pad = logits.new_full((*logits.shape[:-1], size - logits.shape[-1]), torch.finfo(logits.dtype).min)
        return torch.cat([logits, pad], dim=-1)
    return logits


def token_scores(logits: torch.Tensor, ids: torch.Tensor, config: RSDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """For tokens ``ids`` [n] predicted by ``logits`` [n, V]: each one's acceptance probability p_s [n]
    and whether it ranks in the student's top-k [n] (all True without the top-k gate)."""
    p_s = TokenProbs.acceptance(logits, config).at(torch.arange(len(ids), device=logits.device), ids)
    gate = in_topk(logits, ids, config.k) if config.student_topk_gate else torch.ones_like(ids, dtype=torch.bool)
    return p_s, gate


def passes(p_s: torch.Tensor, in_gate: torch.Tensor, config: RSDConfig) -> torch.Tensor:
    """RSD's rule (arXiv 2509.22230, §3), per student token: p_s >= pth (and, with the reference
    script's gate, a rank in the student's top-k)."""
    return (p_s >= config.pth) & in_gate


def accepts(p_s: torch.Tensor, in_gate: torch.Tensor, config: RSDConfig) -> bool:
    """A candidate – one student token, or the span of student tokens its text becomes – is accepted
    iff every one of its tokens passes."""
    return bool(passes(p_s, in_gate, config).all())


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw ids from non-negative ``weights`` [R, V] (need not sum to 1) with uniforms ``u`` [R, m] -> [R, m]."""
    cdf = weights.cumsum(-1)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return ids.clamp_(max=weights.shape[-1] - 1)


def mass_above(probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the total probability of tokens strictly more probable than ``ids`` [R]."""
    p = probs.gather(-1, ids[:, None])
    return torch.where(probs > p, probs, 0.0).sum(-1)


# A token with p > 1 - top_p + this is in the nucleus whatever the rest (the mass above it is at most 1 - p);
# the slack covers the float error of a softmax's sum over a large vocabulary (~1e-6).
NUCLEUS_SURE_SLACK = 1e-4


def in_nucleus(probs: torch.Tensor, ids: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per row, whether ``ids`` [R] is in the top-``top_p`` nucleus of ``probs`` [R, V] (the mass strictly
    more probable than it is below ``top_p``). Only rows whose token is not surely in it are summed: a
    sampled token is usually likely enough, and the sum is a pass over the whole vocabulary."""
    p = probs.gather(-1, ids[:, None])[:, 0]
    ok = p > 1 - top_p + NUCLEUS_SURE_SLACK
    unsure = (~ok).nonzero()[:, 0]
    if unsure.numel():
        ok[unsure] = mass_above(probs[unsure], ids[unsure]) < top_p
    return ok


def sample(probs: torch.Tensor, u: torch.Tensor, top_p: float = 1.0) -> torch.Tensor:
    """One id per row from ``probs`` [R, V] truncated to its top-``top_p`` mass; ``u`` [R, UNIFORMS_PER_DRAW]."""
    if top_p >= 1.0:
        return inverse_cdf(probs, u[:, :1])[:, 0]
    tries = inverse_cdf(probs, u[:, :TOP_P_TRIES])
    out = torch.full_like(tries[:, 0], -1)
    todo = torch.arange(probs.shape[0], device=probs.device)
    for t in range(TOP_P_TRIES):
        if todo.numel() == 0:
            return out
        cand = tries[todo, t]
        rows = probs if t == 0 else probs[todo]  # first try: every row, no [rows, vocab] copy
        ok = in_nucleus(rows, cand, top_p)
        out[todo[ok]] = cand[ok]
        todo = todo[~ok]
    for r in todo.tolist():  # all tries fell outside the nucleus (rare): exact by sorting this row
        sorted_p, order = probs[r].sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        out[r] = order[inverse_cdf(torch.where(keep, sorted_p, 0.0)[None], u[r : r + 1, TOP_P_TRIES:])[0, 0]]
    return out


def topk_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [R, V]: the ``k`` most likely tokens of each row."""
    k = min(k, logits.shape[-1])
    idx = logits.topk(k, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)


def in_topk(logits: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, whether ``ids`` [R] ranks among the ``k`` largest logits (ties count in its favour)."""
    chosen = logits.gather(-1, ids[:, None])
    return (logits > chosen).sum(-1) < k


def propose(teacher_logits: torch.Tensor, u: torch.Tensor, config: RSDConfig) -> torch.Tensor:
    """Teacher candidates [R, teacher_draws]: independent draws at the sampling temperature and top-p."""
    probs = tempered_probs(teacher_logits, config.temperature)
    draws = [sample(probs, u[:, j * UNIFORMS_PER_DRAW : (j + 1) * UNIFORMS_PER_DRAW], config.top_p)
             for j in range(config.teacher_draws)]  # fmt: skip
    return torch.stack(draws, dim=1)


def fallback(student_logits: torch.Tensor, u: torch.Tensor, config: RSDConfig, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """The student's own token when the teacher's is rejected (``config.fallback`` picks the rule).
    ``excluded`` [R, V]: strict choices already tried and rejected (drawn again without them)."""
    if config.fallback == "sample":  # by rejection: no [R, V] nucleus mask
        return sample(tempered_probs(student_logits, config.temperature), u, config.top_p)
    return inverse_cdf(fallback_weights(student_logits, config, excluded), u[:, :1])[:, 0]


def fallback_weights(student_logits: torch.Tensor, config: RSDConfig, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """The fallback distribution as unnormalised weights [R, V] (what :func:`fallback` draws from).

    ``sample``: tempered and top-p; ``topk``: tempered, restricted to the top-k; ``strict``: tempered,
    restricted to the tokens the acceptance rule itself accepts, or the argmax if there is none."""
    probs = tempered_probs(student_logits, config.temperature)
    if config.fallback == "sample":
        return nucleus(probs, config.top_p)
    if config.fallback == "topk":
        return torch.where(topk_mask(student_logits, config.k), probs, 0.0)
    allowed = strict_choices(student_logits, config, excluded)
    allowed |= ~allowed.any(-1, keepdim=True) & topk_mask(student_logits, 1)
    return torch.where(allowed, probs, 0.0)


NUCLEUS_TOPK = (64, 1024)  # candidates examined, then for rows whose nucleus is wider, before a full sort


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` [R, V] restricted to the nucleus and renormalised: the distribution :func:`sample` draws.

    A token is in the nucleus when the mass strictly more probable than it is below ``top_p`` (so ties
    with the last kept token are kept, as in :func:`sample`). The cut is found among each row's largest
    probabilities (``NUCLEUS_TOPK``); only a row whose nucleus is wider than those is sorted in full."""
    if top_p >= 1.0:
        return probs / probs.sum(-1, keepdim=True)
    V = probs.shape[-1]
    cut = torch.full(probs.shape[:1], -1.0, device=probs.device, dtype=probs.dtype)  # [R]; -1: not found yet
    todo = torch.arange(probs.shape[0], device=probs.device)
    for k in (*NUCLEUS_TOPK, V):
        k = min(k, V)
        rows = probs[todo]
        top = rows.sort(dim=-1, descending=True).values if k == V else rows.topk(k, dim=-1).values
        cut[todo] = _nucleus_floor(top, top_p, k == V)
        todo = todo[cut[todo] < 0]
        if not todo.numel():
            break
    kept = torch.where(probs >= cut[:, None], probs, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def _nucleus_floor(top: torch.Tensor, top_p: float, complete: bool) -> torch.Tensor:
    """The smallest kept probability per row, from its largest probabilities ``top`` [R, k] (descending);
    -1 where even the k-th is kept and ``top`` is not the ``complete`` vocabulary (the cut lies further)."""
    k = top.shape[-1]
    first = torch.ones_like(top, dtype=torch.bool)  # the first of each run of equal probabilities
    first[:, 1:] = top[:, 1:] != top[:, :-1]
    start = torch.where(first, torch.arange(k, device=top.device), 0).cummax(-1).values  # [R, k]
    above = (top.cumsum(-1) - top).gather(-1, start)  # [R, k]: mass strictly more probable than each
    kept = above < top_p
    floor = torch.where(kept, top, torch.inf).amin(-1)
    return floor if complete else torch.where(kept[:, -1], -1.0, floor)


def strict_choices(student_logits: torch.Tensor, config: RSDConfig, excluded: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [R, V]: tokens a strict fallback may choose (those that pass), less the ``excluded`` ones."""
    gate = topk_mask(student_logits, config.k) if config.student_topk_gate else torch.ones_like(student_logits, dtype=torch.bool)
    allowed = passes(acceptance_probs(student_logits, config), gate, config)
    return allowed if excluded is None else allowed & ~excluded


def uniforms_per_step(config: RSDConfig) -> int:
    """Uniforms each sequence consumes per decision: teacher draws, then the fallback draw."""
    return UNIFORMS_PER_DRAW * (config.teacher_draws + 1)

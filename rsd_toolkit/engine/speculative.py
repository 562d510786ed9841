"""Speculative RSD as plain functions over explicit tensors: RSD's next-token distribution in closed form,
and the draft-and-verify rule that samples it exactly.

For a same-tokenizer pair, one RSD step at a position draws from (``t`` the teacher's sampling
distribution, ``a`` the student's acceptance probabilities, ``S = {y : a(y) >= pth [, top-k rank]}``,
``A = t(S)``, ``f`` the fallback distribution, ``N`` teacher draws)::

    q(y) = t(y) 1[y in S] (1 - (1-A)^N) / A  +  (1-A)^N f(y)            (A = 0: q = f)

The first term is the mass of "the teacher proposed y and the student accepted it", the second of
"every proposal was rejected and the student chose y". Speculative sampling (Leviathan et al. 2023;
Chen et al. 2023) turns draws from the student's own distribution ``g`` into exact draws from ``q``:
accept draft d with probability min(1, q(d)/g(d)), otherwise draw from max(0, q - g) normalised; after
k accepted drafts, one more token comes from q at position k+1. A committed token's source is drawn
from its posterior (first term / q), so (token, source) pairs keep RSD's joint distribution.
"""

from __future__ import annotations

import torch

from ..config import RSDConfig
from . import sampling


def draft_probs(student_logits: torch.Tensor, config: RSDConfig) -> torch.Tensor:
    """The student's own sampling distribution g [..., V] (tempered, top-p): what a draft is drawn from."""
    return sampling.nucleus(sampling.tempered_probs(student_logits, config.temperature), config.top_p)


def teacher_probs(teacher_logits: torch.Tensor, config: RSDConfig) -> torch.Tensor:
    """The teacher's sampling distribution t [..., V] (tempered, top-p): what ``sampling.propose`` draws."""
    return sampling.nucleus(sampling.tempered_probs(teacher_logits, config.temperature), config.top_p)


def acceptable(student_logits: torch.Tensor, config: RSDConfig) -> torch.Tensor:
    """S as a boolean [R, V]: the tokens RSD accepts from the teacher (``sampling.passes``; the top-k gate
    counts ties in the token's favour, as ``sampling.in_topk`` does for a proposal)."""
    a = sampling.acceptance_probs(student_logits, config)
    if config.student_topk_gate:
        kth = student_logits.topk(min(config.k, student_logits.shape[-1]), dim=-1).values[:, -1:]
        gate = student_logits >= kth
    else:
        gate = torch.ones_like(a, dtype=torch.bool)
    return sampling.passes(a, gate, config)


def rsd_target(
    t: torch.Tensor, student_logits: torch.Tensor, config: RSDConfig, g: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RSD's next-token distribution q [R, V] and its teacher-sourced part [R, V] (<= q elementwise),
    from the teacher's sampling distribution ``t`` [R, V] and the student's logits [R, V]. ``g`` [R, V]: the
    student's sampling distribution (``draft_probs``) when the caller has it: it is the ``sample`` fallback.
    Mode ``teacher``: q = t, all of it teacher-sourced."""
    if config.mode == "teacher":
        return t, t
    inside = acceptable(student_logits, config)
    A = torch.where(inside, t, 0.0).sum(-1, keepdim=True).double()  # [R, 1]
    miss = (1 - A).clamp(min=0) ** config.teacher_draws  # every teacher draw rejected
    # (1 - (1-A)^N) / A without cancellation for small A: -expm1(N log1p(-A)) / A (-> N as A -> 0)
    scale = torch.where(A > 0, -torch.expm1(config.teacher_draws * torch.log1p(-A.clamp(max=1 - 1e-16))) / A.clamp(min=1e-300), 0.0)
    scale = torch.where(A >= 1, 1.0, scale)
    from_teacher = torch.where(inside, t, 0.0) * scale.to(t.dtype)
    f = g if g is not None and config.fallback == "sample" else sampling.fallback_weights(student_logits, config)
    q = from_teacher + miss.to(t.dtype) * f / f.sum(-1, keepdim=True)
    return q, from_teacher


def verify(
    q: torch.Tensor, q_teacher: torch.Tensor, g: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative acceptance of K drafts per row against the target q.

    q, q_teacher [R, K+1, V]: target and its teacher-sourced part at each draft position and the one after;
    g [R, K, V]: the draft distribution at each draft position; drafts [R, K]; u [R, 2K+2] uniforms
    (K accept tests, one final draw, K+1 source draws).
    Returns accepted [R] (drafts kept, 0..K), tokens [R, K+1] (the kept drafts, then the corrected or
    bonus token at position ``accepted``; later entries are unused) and from_teacher [R, K+1].
    """
    R, K = drafts.shape
    rows = torch.arange(R, device=q.device)
    ratio = q[:, :K].gather(-1, drafts[..., None])[..., 0] / g.gather(-1, drafts[..., None])[..., 0]  # [R, K]
    kept = (u[:, :K] < ratio).long().cumprod(-1)  # accept while every earlier draft was accepted
    accepted = kept.sum(-1)  # [R]
    at = accepted.clamp(max=K - 1) if K else accepted
    # rejected at position j < K: draw from max(0, q_j - g_j); all accepted: draw from q_K
    residual = q[rows, accepted]
    if K:
        rejected = (accepted < K)[:, None]
        residual = torch.where(rejected, (residual - g[rows, at]).clamp(min=0), residual)
        empty = residual.sum(-1, keepdim=True) <= 0  # q == g up to rounding: q itself is exact then
        residual = torch.where(empty, q[rows, accepted], residual)
    final = sampling.inverse_cdf(residual, u[:, K : K + 1])[:, 0]  # [R]
    tokens = torch.cat([drafts, final[:, None]], dim=1).clone()  # [R, K+1]
    tokens[rows, accepted] = final
    p_teacher = q_teacher.gather(-1, tokens[..., None])[..., 0] / q.gather(-1, tokens[..., None])[..., 0].clamp(min=1e-38)
    from_teacher = u[:, K + 1 : 2 * K + 2] < p_teacher
    return accepted, tokens, from_teacher


def uniforms_per_round(draft_tokens: int) -> int:
    """Uniforms one row consumes per round: one per draft (an inverse-CDF draw from g), then ``verify``'s."""
    return 3 * draft_tokens + 2

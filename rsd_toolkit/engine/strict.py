"""The strict fallback's choices across tokenizers, as plain functions (no model, no engine state).

A strict choice is judged on the span of student tokens its text becomes, not on the token drawn. After
held whitespace that span can start earlier than the choice: SmolLM2 writes ``" \\n\\n"`` as one token
while the text is open, but ``" \\n\\n1"`` is ``" \\n"``, ``"\\n"``, ``"1"``. Every choice drawn from the
logits after ``" \\n\\n"`` is then judged in a context the student never sampled from (after ``"\\n"``), and
all of them can fail although the student has good tokens there. The logits the probe computed at the
first token of the choice's own text are the student's distribution in that canonical context; drawing
the next choices from them ("merges of the held whitespace") gives choices that pass when the student
has any, so only a truly unavoidable last resort lets a sub-pth token in.
"""

from __future__ import annotations

import torch

MAX_TRIES = 32  # strict choices judged per fallback before the last resort (each one a batched probe)


def split_point(rolled_back: list[bytes], span: list[bytes]) -> int | None:
    """Where the candidate's own text starts in its span: ``j`` with ``span[:j]`` spelling exactly the
    ``rolled_back`` tokens' bytes (the held text, re-split), or None (the choice merged into them).

    Only ``0 < j < len(span)`` is returned: then the probe's logits at position ``j`` predict the choice's
    first token after the canonical re-split of the held text."""
    held = b"".join(rolled_back)
    if not held:
        return None
    acc = b""
    for j, piece in enumerate(span[:-1]):
        acc += piece
        if acc == held:
            return j + 1
        if len(acc) >= len(held):
            return None
    return None


def pick_sources(has_split: list[bool], left_split: list[bool], left_own: list[bool]) -> list[str | None]:
    """Per open row, where its next strict choice is drawn from: ``"split"`` (the canonical context of
    the held text, preferred once found), ``"own"`` (the logits the student stands at) or None (every
    passing choice of both was tried: the last resort is unavoidable)."""
    out: list[str | None] = []
    for split, ls, lo in zip(has_split, left_split, left_own):
        out.append("split" if split and ls else "own" if lo else None)
    return out


def last_resort(tried: list, key) -> object:
    """The least bad tried choice: the one whose least likely token (``key``) is the most likely."""
    return max(tried, key=key)


def draw_column(k: int, uniforms: int) -> int | None:
    """Uniform column for strict draw ``k``: sampled while uniforms last, then None (take the most likely
    untried choice: deterministic, no extra randomness consumed)."""
    return k if k < uniforms else None


def most_likely(allowed: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Per row of ``allowed`` [R, V] / ``probs`` [R, V], the most probable allowed id [R]."""
    return torch.where(allowed, probs, -1.0).argmax(-1)

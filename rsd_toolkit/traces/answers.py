"""Final-answer extraction and equivalence (math-verify), shared by `rsd generate` and `rsd eval`."""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (balanced braces), or None."""
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end() : i - 1].strip()
    return found


def extract_answer(text: str, patterns: tuple[str, ...] = ()) -> str | None:
    """The last ``\\boxed{}``; else the last match of the first extra regex (group 1) that matches."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in patterns:
        matches = re.findall(pattern, text)
        if matches:
            last = matches[-1]
            return (last[0] if isinstance(last, tuple) else last).strip()
    return None


def answers_match(predicted: str | None, reference: str) -> bool:
    """Mathematical equivalence by math-verify (``\\frac{1}{2}`` = ``0.5``), exact text as a fallback."""
    if predicted is None:
        return False
    from math_verify import parse, verify

    def wrap(s: str) -> str:
        s = s.strip()
        return s if s.startswith("$") or "\\boxed" in s else f"${s}$"

    try:
        if verify(parse(wrap(reference)), parse(wrap(predicted))):
            return True
    except Exception:  # math-verify raises on some malformed LaTeX; fall back to text comparison
        pass
    norm = lambda s: re.sub(r"\s+", "", s).strip("$.")  # noqa: E731
    return norm(predicted) == norm(reference)

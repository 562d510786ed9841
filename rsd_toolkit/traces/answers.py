"""Final-answer extraction and equivalence (math-verify), shared by `rsd generate` and `rsd eval`.

Three answer kinds: ``math`` (last ``\\boxed{}``, math-verify), ``gsm8k`` (references end in ``#### N``;
predictions give a box, ``#### N`` or, failing both, their last number) and ``mc`` (one option letter).
"""

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


BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


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


ANSWER_KINDS = ("math", "gsm8k", "mc")
_GSM8K = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_TEXT_WRAP = re.compile(r"^\\(?:text|textbf|mathrm|mathbf)\s*\{(.*)\}$")
# "The answer is (B)", "Answer: C", "**Answer:** D"; the letter must be a capital ("the answer is a number")
_LETTER_PHRASE = re.compile(r"(?i:answer)\s*(?:(?i:is)\s*)?[:\s]*\**\s*\(?\s*([A-Z])\b")


def gsm8k_reference(solution: str) -> str | None:
    """The number after GSM8K's last ``####`` (thousands commas dropped), or None."""
    found = _GSM8K.findall(solution)
    return found[-1].strip().replace(",", "").rstrip(".") if found else None


def extract_gsm8k(text: str) -> str | None:
    """A GSM8K prediction: last ``\\boxed{}``, else last ``#### N``, else the last number in the text."""
    answer = last_boxed(text) or gsm8k_reference(text)
    if answer is None:
        numbers = _NUMBER.findall(text)
        answer = numbers[-1] if numbers else None
    return answer.replace(",", "").replace("$", "").strip() if answer is not None else None


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """A multiple-choice letter: from the last ``\\boxed{}`` (``B``, ``(B)``, ``\\text{B}``, ``B) 42``), else from
    the last "answer is X" / "Answer: X" phrase. Only letters in ``letters`` count."""
    boxed = last_boxed(text)
    if boxed is not None:
        inner = boxed.strip()
        while (m := _TEXT_WRAP.match(inner)) is not None:
            inner = m.group(1).strip()
        m = re.match(r"^\(?([A-Za-z])\)?(?:$|[\s).:])", inner)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    found = [x for x in _LETTER_PHRASE.findall(text) if x in letters]
    return found[-1] if found else None


def extract_for(kind: str, text: str, patterns: tuple[str, ...] = ()) -> str | None:
    """The predicted answer of ``text`` for an answer kind (see ``ANSWER_KINDS``)."""
    if kind == "mc":
        return extract_choice(text)
    if kind == "gsm8k":
        return extract_gsm8k(text)
    return extract_answer(text, patterns)


def match_for(kind: str, predicted: str | None, reference: str) -> bool:
    """Is ``predicted`` right? Letters compare exactly; numbers and expressions by math-verify."""
    if predicted is None:
        return False
    if kind == "mc":
        return predicted.strip().upper() == reference.strip().upper()
    if kind == "gsm8k":
        return answers_match(predicted.replace(",", ""), reference.replace(",", ""))
    return answers_match(predicted, reference)

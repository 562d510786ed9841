"""Incremental canonical encoding: append text, get back (rollback, append) so that the id list always
equals ``vocab.encode(text)`` of everything appended so far.

Re-encoding the whole text per token costs O(n) and a trace O(n²). Instead we re-encode from a *stable
cut*: a token boundary where a space or tab follows a non-space. In every pre-tokeniser regex we
support (GPT-2, Llama-3, Qwen2, Tekken, DeepSeek) and in SentencePiece BPE (no piece has ``▁`` after a
non-``▁``) such a position is a pre-token boundary that appending text cannot move, so tokens before
it never change. We go back two cuts and check that the first word re-encodes to the ids we had; if
not, we go further back (ultimately to the segment start, which is exact by definition).

Special tokens that the bridge maps by role are hard segment boundaries: nothing re-encodes across them.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from .vocab import Vocab

_SPACE_OR_TAB = (0x20, 0x09)
_WHITESPACE = (0x20, 0x09, 0x0A, 0x0D, 0x0B, 0x0C)


@dataclass
class Update:
    """How the target side changes: drop the last ``rollback`` ids, then append ``append``."""

    rollback: int = 0
    append: list[int] | None = None

    def __post_init__(self):
        if self.append is None:
            self.append = []

    def then(self, other: "Update") -> "Update":
        """The single update equivalent to applying ``self`` and then ``other``."""
        kept = len(self.append) - other.rollback
        if kept >= 0:
            return Update(self.rollback, self.append[:kept] + other.append)
        return Update(self.rollback - kept, list(other.append))

    def apply(self, ids: list[int]) -> list[int]:
        """Return ``ids`` updated (a new list)."""
        return ids[: len(ids) - self.rollback] + self.append


class IncrementalEncoder:
    """Keeps ``ids == segments' canonical encodings`` while text is appended."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._unicode_form = vocab.unicode_normalization  # e.g. "NFC": text is kept normalised
        self.ids: list[int] = []
        self._seg0 = 0  # index in ids where the current segment starts
        self._ends: list[int] = []  # raw-byte end of each token of the current segment
        self._text = bytearray()  # UTF-8 text of the current segment
        self._raw_len = 0  # sum of token byte lengths of the current segment

    def copy(self) -> "IncrementalEncoder":
        new = IncrementalEncoder.__new__(IncrementalEncoder)
        new.vocab = self.vocab
        new._unicode_form = self._unicode_form
        new.ids = list(self.ids)
        new._seg0 = self._seg0
        new._ends = list(self._ends)
        new._text = bytearray(self._text)
        new._raw_len = self._raw_len
        return new

    # -- appending ---------------------------------------------------------------------------------
    def push_known(self, ids: list[int], text: str) -> Update:
        """Append ids already known to be the canonical continuation for ``text`` (remap fast path)."""
        table = self.vocab.token_bytes
        for i in ids:
            self._raw_len += len(table[i])
            self._ends.append(self._raw_len)
        self._text += text.encode()
        self.ids.extend(ids)
        return Update(0, list(ids))

    def push_special(self, token_id: int) -> Update:
        """Append a token that closes the current segment (a role-mapped special token)."""
        self.ids.append(token_id)
        self._seg0 = len(self.ids)
        self._ends, self._text, self._raw_len = [], bytearray(), 0
        return Update(0, [token_id])

    def push_text(self, text: str) -> Update:
        """Append text; re-encode from a stable cut and report the difference."""
        if not text:
            return Update()
        lead = self._raw_len - len(self._text)  # dummy-prefix bytes the tokens carry before the text
        if self._unicode_form:
            self._append_normalized(text)
        else:
            self._text += text.encode()
        cuts = self._cuts_before_end(6)  # latest first, 0 (segment start) last
        for j in range(1, len(cuts) + 1):
            c = cuts[j] if j < len(cuts) else 0
            new_tail = self._encode_from(c, lead)
            if c == 0:
                break
            checked = cuts[j - 1] - c  # the word between two cuts must re-encode to what we had
            start = self._seg0 + c
            if new_tail[:checked] == self.ids[start : start + checked]:
                break
        old_tail = self.ids[self._seg0 + c :]
        lcp = 0
        limit = min(len(old_tail), len(new_tail))
        while lcp < limit and old_tail[lcp] == new_tail[lcp]:
            lcp += 1
        update = Update(len(old_tail) - lcp, new_tail[lcp:])
        self._replace_tail(self._seg0 + c + lcp, update.append)
        return update

    # -- internals -----------------------------------------------------------------------------------
    def _append_normalized(self, text: str) -> None:
        """Keep the text in the tokenizer's Unicode form, so token bytes line up with it.

        Only the tail from the last starter character can compose with what is appended, so only that
        tail is normalised again (a combining accent may merge into the previous letter).
        """
        buf = self._text
        start = len(buf)
        for _ in range(8):  # walk back over at most a few characters
            if start == 0:
                break
            start -= 1
            while start > 0 and (buf[start] & 0xC0) == 0x80:
                start -= 1
            if not unicodedata.combining(bytes(buf[start : start + 4]).decode(errors="ignore")[:1] or "a"):
                break
        tail = bytes(buf[start:]).decode()
        del buf[start:]
        buf += unicodedata.normalize(self._unicode_form, tail + text).encode()

    def _cuts_before_end(self, count: int) -> list[int]:
        """Up to ``count`` segment-relative token indices of stable cuts, latest first, plus 0 last."""
        ends, table, ids, seg0 = self._ends, self.vocab.token_bytes, self.ids, self._seg0
        out: list[int] = []
        i = len(ends) - 1
        while i >= 1 and len(out) < count:
            first = table[ids[seg0 + i]][:1]
            if first and first[0] in _SPACE_OR_TAB:
                prev = table[ids[seg0 + i - 1]][-1:]
                if prev and prev[0] not in _WHITESPACE:
                    out.append(i)
            i -= 1
        out.append(0)
        return out

    def _encode_from(self, c: int, lead: int) -> list[int]:
        """Canonical ids of the segment's text from token index ``c`` on (``c`` is a stable cut or 0)."""
        if c == 0:
            return self.vocab.encode(bytes(self._text).decode())
        offset = self._ends[c - 1] - lead
        window = bytes(self._text[offset:]).decode()
        if self.vocab.strip_leading_space and window.startswith(" "):
            window = window[1:]  # the normaliser prepends the dummy space again
        return self.vocab.encode(window)

    def _replace_tail(self, start: int, new_ids: list[int]) -> None:
        del self.ids[start:]
        rel = start - self._seg0
        del self._ends[rel:]
        raw = self._ends[-1] if self._ends else 0
        table = self.vocab.token_bytes
        for i in new_ids:
            raw += len(table[i])
            self._ends.append(raw)
        self._raw_len = raw
        self.ids.extend(new_ids)

"""Incremental canonical encoding: append text, get back (rollback, append) so that the id list always
equals ``vocab.encode(text)`` of everything appended so far.

Re-encoding the whole text per token costs O(n) and a trace O(n²). Instead we re-encode from a *cut*:

* a *stable cut* is a token boundary where a space or tab follows a non-space. In every pre-tokeniser
  regex we support (GPT-2, Llama-3, Qwen2, Tekken, DeepSeek) and in SentencePiece BPE (no piece has
  ``▁`` after a non-``▁``) such a position is a pre-token boundary that appending text cannot move, so
  tokens before it never change;
* inside a *long run* without one (whitespace runs, CJK prose, minified code, base64, digit strings) any
  token boundary at a character start is a *run cut*, so a window never grows with the run.

We go back two cuts and check that the tokens between them re-encode to the ids we had; if not, we go
further back (ultimately to the segment start, which is exact by definition). A stable cut needs no
check; a run cut relies on it: a change that reaches further left than the checked tokens would have to
leave them intact while re-routing the merges before them, which none of the suite's tokenizers does
(property tests and the bridge benchmark compare with a full re-encode after every push).

Special tokens that the bridge maps by role are hard segment boundaries: nothing re-encodes across them.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from .vocab import Vocab

RUN_BYTES = 32  # no stable cut in this many bytes before the end: the text is in a long run
CHECK_BYTES = 4  # a run cut is checked on at least this many bytes of tokens after it
MAX_TRIES = 6  # cuts tried before re-encoding the whole segment


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
        # Latest stable cut (segment token index; 0: none within RUN_BYTES of where the tail last changed),
        # kept up to date on every change so that spotting a long run costs O(1), not a scan.
        self._last_stable = 0

    def copy(self) -> "IncrementalEncoder":
        new = IncrementalEncoder.__new__(IncrementalEncoder)
        new.vocab = self.vocab
        new._unicode_form = self._unicode_form
        new.ids = list(self.ids)
        new._seg0 = self._seg0
        new._ends = list(self._ends)
        new._text = bytearray(self._text)
        new._raw_len = self._raw_len
        new._last_stable = self._last_stable
        return new

    # -- appending ---------------------------------------------------------------------------------
    def push_special(self, token_id: int) -> Update:
        """Append a token that closes the current segment (a role-mapped special token)."""
        self.ids.append(token_id)
        self._seg0 = len(self.ids)
        self._ends, self._text, self._raw_len, self._last_stable = [], bytearray(), 0, 0
        return Update(0, [token_id])

    def push_text(self, text: str) -> Update:
        """Append text; re-encode from a cut and report the difference."""
        if not text:
            return Update()
        lead = self._raw_len - len(self._text)  # dummy-prefix bytes the tokens carry before the text
        if self._unicode_form:
            self._append_normalized(text)
        else:
            self._text += text.encode()
        later, c = None, 0
        for tries, cut in enumerate(self._cuts(lead)):  # latest first
            if later is not None:
                c = cut if tries <= MAX_TRIES else 0
                new_tail = self._encode_from(c, lead)
                checked = later - c  # the tokens between two cuts must re-encode to what we had
                start = self._seg0 + c
                if c == 0 or new_tail[:checked] == self.ids[start : start + checked]:
                    break
            later = cut
        else:
            c, new_tail = 0, self._encode_from(0, lead)
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
        if text.isascii() and (not buf or buf[-1] < 0x80):
            buf += text.encode()  # ASCII after ASCII: already in every normal form
            return
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

    def _cuts(self, lead: int):
        """Segment-relative token indices of cuts, latest first, then 0 (generated lazily).

        Stable cuts, and run cuts where stable cuts are ``RUN_BYTES`` or more apart (or the text has had
        none for that long): token boundaries at a character start, ``CHECK_BYTES`` or more apart.
        """
        ends, ids, seg0 = self._ends, self.ids, self._seg0
        starts_space, ends_word = self.vocab.cut_flags
        runs = self.vocab.continues_exactly
        anchor = ends[-1] if ends else 0  # start of the latest stable cut (or the end of the text)
        in_run = runs and self._in_long_run()
        bound = anchor - 1  # a run cut starts at or before this raw offset
        for i in range(len(ends) - 1, 0, -1):
            start = ends[i - 1]
            if starts_space[ids[seg0 + i]] and ends_word[ids[seg0 + i - 1]]:  # stable cut
                yield i
                anchor, in_run, bound = start, False, start - CHECK_BYTES
                continue
            in_run = in_run or (runs and anchor - start >= RUN_BYTES)
            if in_run and start <= bound and self._char_start(start, lead):
                yield i
                bound = start - CHECK_BYTES
        yield 0

    def _stable(self, i: int) -> bool:
        """Token i of the segment starts with a space or tab that follows a non-space."""
        starts, ends = self.vocab.cut_flags
        j = self._seg0 + i
        return bool(starts[self.ids[j]] and ends[self.ids[j - 1]])

    def _in_long_run(self) -> bool:
        """No stable cut in the last ``RUN_BYTES`` bytes of a segment at least that long."""
        ends = self._ends
        if not ends or ends[-1] < RUN_BYTES:
            return False
        return self._last_stable == 0 or ends[-1] - ends[self._last_stable - 1] >= RUN_BYTES

    def _char_start(self, raw: int, lead: int) -> bool:
        """The segment text at raw-byte offset ``raw`` starts a character that is not a combining mark."""
        pos = raw - lead
        if not 0 < pos < len(self._text) or (self._text[pos] & 0xC0) == 0x80:
            return False
        if self._text[pos] < 0x80:
            return True
        ch = bytes(self._text[pos : pos + 4]).decode(errors="ignore")[:1]
        return bool(ch) and not unicodedata.combining(ch)

    def _encode_from(self, c: int, lead: int) -> list[int]:
        """Canonical ids of the segment's text from token index ``c`` on (``c`` is a cut or 0)."""
        if c == 0:
            return self.vocab.encode(bytes(self._text).decode())
        window = bytes(self._text[self._ends[c - 1] - lead :]).decode()
        if self.vocab.strip_leading_space and window.startswith(" ") and not self.vocab.continues_exactly:
            window = window[1:]  # the normaliser prepends the dummy space again
        return self.vocab.encode_continuation(window)

    def _replace_tail(self, start: int, new_ids: list[int]) -> None:
        del self.ids[start:]
        rel = start - self._seg0
        del self._ends[rel:]
        if self._last_stable >= rel:  # it was rolled back: the latest one left within reach
            ends, self._last_stable = self._ends, 0
            for i in range(rel - 1, 0, -1):
                if self._stable(i):
                    self._last_stable = i
                    break
                if ends[-1] - ends[i - 1] >= RUN_BYTES:
                    break
        raw = self._ends[-1] if self._ends else 0
        table = self.vocab.token_bytes
        for i in new_ids:
            raw += len(table[i])
            self._ends.append(raw)
        self._raw_len = raw
        self.ids.extend(new_ids)
        for i in range(max(rel, 1), len(self._ends)):
            if self._stable(i):
                self._last_stable = i

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
leave them intact while re-routing the merges before them, which the suite's tokenizers do not do. A
window that starts inside a pre-token begun before the cut can still pass the check and split what
follows differently (Tekken's punctuation run after two U+FFFD takes spacing marks and a dash), so a
window that changes tokens before the latest cut must also give our ids when it encodes the old text
(rare: 0.12 % of pushes on base64, none on digits). Property tests and the bridge benchmark compare with a
full re-encode after every push.

Special tokens that the bridge maps by role are hard segment boundaries: nothing re-encodes across them.
An added token matched *in the text* (a literal ``<s>``) is read by windows like any token, except where
the tokenizer starts afresh after it (``Vocab.restart_contents``: legacy SentencePiece ``tokenizer.json``
such as Phi-3's or Llama-2's puts a dummy ``▁`` there): from then on the segment is re-encoded from its
start on every push (exact, O(segment) per push, until the next special token; such text is rare).

A long segment is *sealed* at a stable cut ``SEAL_KEEP`` tokens back once it holds ``SEAL_AT`` tokens: the
ids before the cut move to an immutable chunk that copies share, and the segment goes on from the cut (a
window from it needs no check, so it serves as the segment's start). A trial copy per push (what the
engine makes) then costs the same at 100k tokens as at 1k.
"""

from __future__ import annotations

import unicodedata
from array import array
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .vocab import Vocab

RUN_BYTES = 32  # no stable cut in this many bytes before the end: the text is in a long run
CHECK_BYTES = 4  # a run cut is checked on at least this many bytes of tokens after it
MAX_TRIES = 6  # cuts tried before re-encoding the whole segment
# A trial copy per push (the engine's) copies the segment: small segments keep it cheap (128/32 against 1024/256:
# 0.91-0.92x the CPU per copied push at batch 64, in-process A/B), and prose has a stable cut every few tokens.
SEAL_AT = 128  # segment tokens from which its settled start is sealed (copies then stop growing)
SEAL_KEEP = 32  # tokens a seal leaves in the segment; the cut is sought this far back again at most
_SPACES = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"  # the ASCII characters str.isspace() accepts


_COMBINING_BMP: bytes | None = None


def _combining_bmp() -> bytes:
    """1 at each code point below U+10000 that is a combining mark (``unicodedata.combining``), built once."""
    global _COMBINING_BMP
    if _COMBINING_BMP is None:
        _COMBINING_BMP = bytes(unicodedata.combining(chr(cp)) != 0 for cp in range(0x10000))
    return _COMBINING_BMP


@dataclass(slots=True)
class Update:
    """How the target side changes: drop the last ``rollback`` ids, then append ``append``."""

    rollback: int = 0
    append: list[int] = field(default_factory=list)

    def then(self, other: "Update") -> "Update":
        """The single update equivalent to applying ``self`` and then ``other``."""
        kept = len(self.append) - other.rollback
        if kept >= 0:
            return Update(self.rollback, self.append[:kept] + other.append)
        return Update(self.rollback - kept, list(other.append))

    def apply(self, ids: list[int]) -> list[int]:
        """Return ``ids`` updated (a new list)."""
        return ids[: len(ids) - self.rollback] + self.append


class Encode(NamedTuple):
    """One tokenizer call an encoder needs: ``vocab.encode(text)`` (``whole``: a segment from its start,
    dummy prefix included) or ``vocab.encode_continuation(text)`` (a window inside a segment)."""

    vocab: Vocab
    text: str
    whole: bool

    def run(self) -> Sequence[int]:
        return self.vocab.encode(self.text) if self.whole else self.vocab.encode_window(self.text)

    def cached(self) -> Sequence[int] | None:
        """The answer when the window cache has it (the encoder then need not yield the request)."""
        return None if self.whole else self.vocab._window_cache.get(self.text)


Steps = Generator[Encode, Sequence[int], Any]


def drive(steps: Steps) -> Any:
    """Run a generator of :class:`Encode` requests one at a time; its return value."""
    try:
        request = next(steps)
        while True:
            request = steps.send(request.run())
    except StopIteration as stop:
        return stop.value


class IncrementalEncoder:
    """Keeps ``ids == segments' canonical encodings`` while text is appended."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self._unicode_form = vocab.unicode_normalization  # e.g. "NFC": text is kept normalised
        self._sealed: tuple[array, ...] = ()  # ids before the last seal, in chunks shared by every copy
        self._ids = array("q")  # ids of every segment since then (an array: copies are cheap)
        self._seg0 = 0  # index in ids where the current segment starts
        self._ends = array("q")  # raw-byte end of each token of the current segment (an array: copies are cheap)
        self._text = bytearray()  # UTF-8 text of the current segment
        self._raw_len = 0  # sum of token byte lengths of the current segment
        # Latest stable cut (segment token index; 0: none within RUN_BYTES of where the tail last changed),
        # kept up to date on every change so that spotting a long run costs O(1), not a scan.
        self._last_stable = 0
        self._mid = False  # the segment starts at a seal (a stable cut), not after a special or at the start
        self._next_seal = SEAL_AT  # segment length at which to try the next seal
        self._whole = False  # the segment's text holds a restarting added token: re-encode it from its start

    def copy(self) -> "IncrementalEncoder":
        new = IncrementalEncoder.__new__(IncrementalEncoder)
        new.vocab = self.vocab
        new._unicode_form = self._unicode_form
        new._sealed = self._sealed
        new._ids = self._ids[:]
        new._seg0 = self._seg0
        new._ends = self._ends[:]
        new._text = bytearray(self._text)
        new._raw_len = self._raw_len
        new._last_stable = self._last_stable
        new._mid = self._mid
        new._next_seal = self._next_seal
        new._whole = self._whole
        return new

    @property
    def ids(self) -> list[int]:
        """This side's ids so far (a new list)."""
        out: list[int] = []
        for chunk in self._sealed:
            out.extend(chunk)
        out.extend(self._ids)
        return out

    # -- appending ---------------------------------------------------------------------------------
    def push_special(self, token_id: int) -> Update:
        """Append a token that closes the current segment (a role-mapped special token)."""
        self._ids.append(token_id)
        self._seg0 = len(self._ids)
        self._ends, self._text, self._raw_len, self._last_stable = array("q"), bytearray(), 0, 0
        self._mid, self._next_seal, self._whole = False, SEAL_AT, False
        return Update(0, [token_id])

    def push_text(self, text: str) -> Update:
        """Append text; re-encode from a cut and report the difference."""
        return drive(self.push_text_steps(text))

    def push_text_steps(self, text: str) -> Steps:
        """:meth:`push_text` as a generator of the encodes it needs (see :meth:`start_text`)."""
        started = self.start_text(text)
        return started if isinstance(started, Update) else (yield from started)

    def start_text(self, text: str) -> "Update | Steps":
        """Append text: the Update itself when every window it needs is in the window cache (most pushes),
        else a generator that yields each :class:`Encode` still needed, is sent its ids, and returns the
        Update. ``Pair.push`` drives it directly; ``push_all`` drives a whole batch's at once, so the
        encodes of one step go to each tokenizer together (the same code either way, hence the same ids).

        The window is the smallest one the cuts allow: when the new text starts a stable cut (a space or
        tab after a non-space) only the new text is encoded and nothing is rolled back; when the latest
        cut is stable, the window starts there (no check needed); otherwise two cuts back, checked.
        """
        if not text:
            return Update()
        buf, ends, ids, vocab = self._text, self._ends, self._ids, self.vocab
        old_len = len(buf)
        lead = self._raw_len - old_len  # dummy-prefix bytes the tokens carry before the text
        last = buf[-1] if buf else 0x20
        junction = (
            bool(ends) and text[0] in " \t" and vocab.cut_flags[1][ids[-1]]
            and (last not in _SPACES if last < 0x80 else self._word_before(old_len))
        )  # fmt: skip
        if self._unicode_form and not (text.isascii() and last < 0x80) and not self._appends_as_is(text):
            self._append_normalized(text)
            text = None  # the appended text differs: read it back from the buffer
        else:
            buf += text.encode()
        if self._whole or (vocab.restart_marks and self._completes_restart(old_len)):
            self._whole = True  # a rare text (a literal "<s>" for a legacy tokenizer): exact, O(segment) per push
            request = self._encode_from(0, lead)
            new_tail = request.cached()
            return self._splice_when_sent(self._seg0, request) if new_tail is None else self._splice(self._seg0, new_tail)
        c = self._last_stable
        if junction:  # a stable cut at the old end: the old ids stay, the new text is encoded alone
            start, window = len(ids), (text if text is not None else buf[old_len:].decode())
        elif c and ends[-1] - ends[c - 1] < RUN_BYTES and self._word_before(ends[c - 1] - lead):
            # the latest cut is stable: encode from it, no check
            start, window = self._seg0 + c, buf[ends[c - 1] - lead :].decode()
        else:  # a long run: the search's first two cuts, without its generators (most run pushes end here)
            cuts = self._cuts(lead, 2)
            latest = cuts[0]
            if not latest:
                return self._searched(lead)  # only the segment start
            if self._needs_no_check(latest, lead):
                request = self._encode_from(latest, lead)
                new_tail = request.cached()
                start = self._seg0 + latest
                return self._splice_when_sent(start, request) if new_tail is None else self._splice(start, new_tail)
            c = cuts[1]
            request = self._encode_from(c, lead)
            new_tail = request.cached()
            if new_tail is None:
                return self._checked_when_sent(c, latest, request, lead)
            if self._agrees(c, latest, new_tail):
                return self._splice(self._seg0 + c, new_tail)
            return self._searched(lead)
        if vocab.strip_window and window[:1] == " ":
            window = window[1:]  # the normaliser prepends the dummy space again
        new_tail = vocab._window_cache.get(window)
        if new_tail is None:
            return self._splice_when_sent(start, Encode(vocab, window, False))
        return self._splice(start, new_tail)

    def _splice_when_sent(self, start: int, request: Encode) -> Steps:
        return self._splice(start, (yield request))

    def _checked_when_sent(self, c: int, latest: int, request: Encode, lead: int) -> Steps:
        """:meth:`_search`'s first window (from the cut ``c`` before the ``latest``) when the cache lacks it:
        kept if it re-encodes the tokens between the two cuts as they were, else the whole search."""
        new_tail = yield request
        if self._agrees(c, latest, new_tail):
            return self._splice(self._seg0 + c, new_tail)
        return (yield from self._searched(lead))

    def _searched(self, lead: int) -> Steps:
        cut, new_tail = yield from self._search(lead)
        return self._splice(self._seg0 + cut, new_tail)

    def _agrees(self, c: int, later: int, new_tail: Sequence[int]) -> bool:
        """A window from cut ``c`` gives the ids we had up to the ``later`` cut (or ``c`` is the segment start)."""
        start = self._seg0 + c
        return c == 0 or list(new_tail[: later - c]) == self._ids[start : self._seg0 + later].tolist()

    def _search(self, lead: int) -> Generator[Encode, Sequence[int], tuple[int, Sequence[int]]]:
        """Where no stable cut is near: try cuts from the latest back, each window checked against the
        tokens we had; returns the cut and its window's ids (yielding only windows the cache lacks)."""
        ends, ids = self._ends, self._ids
        latest, later, c, new_tail = 0, None, 0, None
        for tries, cut in enumerate(self._cuts(lead, MAX_TRIES + 2)):  # latest first (then cut 0 at the latest)
            if later is None:
                if cut and self._needs_no_check(cut, lead):
                    request = self._encode_from(cut, lead)
                    return cut, request.cached() or (yield request)
                latest = cut
            else:
                c = cut if tries <= MAX_TRIES else 0
                request = self._encode_from(c, lead)
                new_tail = request.cached() or (yield request)
                start = self._seg0 + c
                if self._agrees(c, later, new_tail):  # the tokens between two cuts must re-encode to what we had
                    if c == 0 or later == latest or self._needs_no_check(c, lead):
                        return c, new_tail
                    if self._agrees(c, latest, new_tail):
                        return c, new_tail
                    # The window changes tokens before the latest cut. A run cut inside a pre-token that began
                    # before it (Tekken's punctuation run after two U+FFFD takes spacing marks and a dash) can
                    # re-encode the checked tokens alike and still split what follows differently: the old
                    # text from the cut must then give the ids we had.
                    before = self._encode_from(c, lead, ends[-1] - lead)
                    if list(before.cached() or (yield before)) == ids[start:].tolist():
                        return c, new_tail
            later = cut
        return 0, (yield self._encode_from(0, lead))

    def _splice(self, start: int, new_tail: Sequence[int]) -> Update:
        """Replace ids[start:] by ``new_tail`` (token ends and the latest stable cut follow); the Update
        keeps their common prefix."""
        ids, ends, seg0 = self._ids, self._ends, self._seg0
        n_old = len(ids) - start
        lcp = 0
        if n_old:
            limit = min(n_old, len(new_tail))
            while lcp < limit and ids[start + lcp] == new_tail[lcp]:
                lcp += 1
            start += lcp
            if lcp < n_old:
                del ids[start:]
                del ends[start - seg0 :]
        append = list(new_tail[lcp:]) if lcp else list(new_tail)
        rel = start - seg0
        starts, words = self.vocab.cut_flags
        lens = self.vocab.token_lens
        raw, prev, latest, k = (ends[-1] if ends else 0), (ids[start - 1] if rel else -1), 0, rel
        for i in append:
            raw += lens[i]
            ends.append(raw)
            if starts[i] and prev >= 0 and words[prev]:
                latest = k
            prev = i
            k += 1
        self._raw_len = raw
        ids.extend(append)
        if latest:
            self._last_stable = latest
        elif self._last_stable >= rel:  # it was rolled back: the latest one left within reach
            self._last_stable = self._stable_before(rel)
        if len(ends) >= self._next_seal:
            self._seal()
        return Update(n_old - lcp, append)

    def _seal(self) -> None:
        """Move the segment's start to a stable cut ``SEAL_KEEP`` or more tokens back (the latest such cut
        within another ``SEAL_KEEP``); the ids before it go to a shared chunk. Tokens before a stable cut
        never change and a window from it is exact without a check, which is all a segment start gives."""
        ends, lead = self._ends, self._raw_len - len(self._text)
        n = len(ends)
        if self._whole:  # token ends need not line up with the text after a restarting token: no cut
            return
        self._next_seal = n + SEAL_KEEP  # found or not, the next try comes later
        for c in range(n - SEAL_KEEP, max(0, n - 2 * SEAL_KEEP), -1):
            if self._needs_no_check(c, lead):
                break
        else:
            return  # a long run without a stable cut: copies grow until one comes
        cut = ends[c - 1]
        split = self._seg0 + c
        self._sealed += (self._ids[:split],)
        del self._ids[:split]
        self._seg0 = 0
        self._ends = array("q", [e - cut for e in ends[c:]])
        del self._text[: cut - lead]  # the text's bytes now line up with the tokens' (no dummy prefix)
        self._raw_len -= cut
        self._last_stable = self._last_stable - c if self._last_stable > c else 0
        self._mid = True
        self._next_seal = len(self._ends) + SEAL_AT - SEAL_KEEP

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

    def _completes_restart(self, old_len: int) -> bool:
        """The text appended after byte ``old_len`` completes a restarting added token (``Vocab.restart_contents``,
        e.g. a literal ``<s>`` for Phi-3): windows cannot read across it, so the segment is encoded whole."""
        buf, vocab = self._text, self.vocab
        if vocab.restart_marks.isdisjoint(bytes(buf[old_len:]).decode(errors="ignore")):
            return False
        longest = max(map(len, vocab.restart_contents))
        tail = bytes(buf[max(0, old_len - longest - 8) :])  # (a normalised tail may start a little before old_len)
        return any(c in tail for c in vocab.restart_contents)

    def _appends_as_is(self, text: str) -> bool:
        """:meth:`_append_normalized` would append ``text`` unchanged: the last character is not a
        combining mark (so it is the whole tail normalised again) and normalising it with ``text``
        changes nothing."""
        buf = self._text
        start = len(buf) - 1
        if start < 0:
            return False
        while start > 0 and (buf[start] & 0xC0) == 0x80:
            start -= 1
        last = buf[start:].decode(errors="ignore")
        return bool(last) and not unicodedata.combining(last[0]) and unicodedata.is_normalized(self._unicode_form, last + text)

    def _cuts(self, lead: int, most: int) -> list[int]:
        """Segment-relative token indices of the latest ``most`` cuts, latest first; a shorter list ends
        with 0 (the segment start). A list, not a generator: most searches need only two.

        Stable cuts, and run cuts where stable cuts are ``RUN_BYTES`` or more apart (or the text has had
        none for that long): token boundaries at a character start, ``CHECK_BYTES`` or more apart.
        """
        ends, ids, seg0 = self._ends, self._ids, self._seg0
        starts_space, ends_word = self.vocab.cut_flags
        runs = self.vocab.continues_exactly
        anchor = ends[-1] if ends else 0  # start of the latest stable cut (or the end of the text)
        in_run = runs and self._in_long_run()
        bound = anchor - 1  # a run cut starts at or before this raw offset
        out: list[int] = []
        for i in range(len(ends) - 1, 0, -1):
            start = ends[i - 1]
            if starts_space[ids[seg0 + i]] and ends_word[ids[seg0 + i - 1]]:  # stable cut
                out.append(i)
                if len(out) == most:
                    return out
                anchor, in_run, bound = start, False, start - CHECK_BYTES
                continue
            in_run = in_run or (runs and anchor - start >= RUN_BYTES)
            if in_run and start <= bound and self._char_start(start, lead):
                out.append(i)
                if len(out) == most:
                    return out
                bound = start - CHECK_BYTES
        out.append(0)
        return out

    def _stable(self, i: int) -> bool:
        """Token i of the segment starts with a space or tab that follows a non-space."""
        starts, ends = self.vocab.cut_flags
        j = self._seg0 + i
        return bool(starts[self._ids[j]] and ends[self._ids[j - 1]])

    def _needs_no_check(self, i: int, lead: int) -> bool:
        """Token i of the segment (i > 0) is a stable cut after a non-space character: the tokens before it
        never change and a window from it is exact without a check."""
        return self._stable(i) and self._word_before(self._ends[i - 1] - lead)

    def _word_before(self, pos: int) -> bool:
        """The text's character ending at byte ``pos`` is not whitespace: a space or tab after it is a
        cut that needs no check. (The token flags read bytes: a no-break space would pass them, and a
        regex ``\\s+`` can take it together with the space after it.)"""
        buf = self._text
        if pos <= 0:
            return False
        last = buf[pos - 1]
        if last < 0x80:
            return last not in _SPACES
        ch = bytes(buf[max(0, pos - 4) : pos]).decode(errors="ignore")[-1:]
        return bool(ch) and not ch.isspace()

    def _in_long_run(self) -> bool:
        """No stable cut in the last ``RUN_BYTES`` bytes of a segment at least that long."""
        ends = self._ends
        if not ends or ends[-1] < RUN_BYTES:
            return False
        return self._last_stable == 0 or ends[-1] - ends[self._last_stable - 1] >= RUN_BYTES

    def _char_start(self, raw: int, lead: int) -> bool:
        """The segment text at raw-byte offset ``raw`` starts a character that is not a combining mark."""
        buf = self._text
        pos = raw - lead
        if not 0 < pos < len(buf):
            return False
        b = buf[pos]
        if b < 0x80:
            return True
        if b < 0xC0:  # a continuation byte
            return False
        # The text is valid UTF-8 (it is encoded from str): the code point from its lead byte on, then a table
        # (decoding a str per call cost CJK runs a third of a push)
        if b < 0xE0:
            cp = (b & 0x1F) << 6 | (buf[pos + 1] & 0x3F)
        elif b < 0xF0:
            cp = (b & 0x0F) << 12 | (buf[pos + 1] & 0x3F) << 6 | (buf[pos + 2] & 0x3F)
        else:
            return not unicodedata.combining(bytes(buf[pos : pos + 4]).decode()[0])
        return not _combining_bmp()[cp]

    def _encode_from(self, c: int, lead: int, end: int | None = None) -> "Encode":
        """The encode giving the segment's canonical ids from token index ``c`` on (``c`` is a cut or 0), of
        the text up to byte ``end`` (default: all of it)."""
        if c == 0 and not self._mid:
            return Encode(self.vocab, bytes(self._text[:end]).decode(errors="replace"), True)
        window = bytes(self._text[self._ends[c - 1] - lead if c else 0 : end]).decode(errors="replace")
        if self.vocab.strip_leading_space and window.startswith(" ") and not self.vocab.continues_exactly:
            window = window[1:]  # the normaliser prepends the dummy space again
        return Encode(self.vocab, window, False)

    def _stable_before(self, rel: int) -> int:
        """The latest stable cut before segment token ``rel`` within ``RUN_BYTES`` of it (0: none)."""
        ends = self._ends
        for i in range(rel - 1, 0, -1):
            if self._stable(i):
                return i
            if ends[rel - 1] - ends[i - 1] >= RUN_BYTES:
                return 0
        return 0

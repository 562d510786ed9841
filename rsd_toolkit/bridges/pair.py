"""One generated text, seen by two models: what each side's context gains when either side adds a token.

The engine keeps one pair per sequence. ``push_teacher(id)`` / ``push_student(id)`` return a
:class:`Step` – the :class:`Update` of the student's ids and of the teacher's ids. ``copy()`` gives a
trial state for a proposal that may be rejected.

* :class:`TokenPair` (identical / remappable tokenizers): token level. Ids pass through the 1:1 table as
  sampled, exactly as single-tokenizer RSD does; a token the other side lacks becomes that side's
  encoding of its text.
* :class:`TextPair` (different tokenizers): text level. Both sides are kept at the *canonical* encoding
  of the shared text (``ids == encode(text)``, segment by segment), so a student trace is exactly what
  its tokenizer makes of the trace text. A token that ends inside a UTF-8 character stays in its own
  side's context as a raw id (the model must see it to finish the character); the other side receives
  the text once the character is complete, and the holding side is then re-encoded canonically.

Special tokens mapped between the sides (EOS, end-of-turn, think markers…) close a segment on both.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from .incremental import IncrementalEncoder, Update
from .streams import Bridge

STUDENT, TEACHER = "student", "teacher"


@dataclass
class Step:
    student: Update
    teacher: Update


class TokenPair:
    """Token-level pairing for identical or remappable tokenizers."""

    holder = None  # never mid-character: both sides hold the same ids

    def __init__(self, teacher_to_student: Bridge, student_to_teacher: Bridge):
        self.t2s, self.s2t = teacher_to_student, student_to_teacher

    def copy(self) -> "TokenPair":
        return self

    def push_teacher(self, token: int) -> Step:
        return Step(_map_token(self.t2s, token), Update(0, [token]))

    def push_student(self, token: int) -> Step:
        return Step(Update(0, [token]), _map_token(self.s2t, token))


def _map_token(bridge: Bridge, token: int) -> Update:
    if token in bridge.specials and token not in bridge.expansions:
        return Update(0, [bridge.specials[token]])
    if token in bridge.expansions:
        return Update(0, bridge.dst.encode(bridge.expansions[token].decode("utf-8", errors="replace")))
    target = bridge.table[token] if token < len(bridge.table) else -1
    if target >= 0:
        return Update(0, [target])
    return Update(0, bridge.dst.encode(bridge.src.text_of([token])))


class TextPair:
    """Text-level pairing for different tokenizers: both sides canonical."""

    def __init__(self, teacher_to_student: Bridge, student_to_teacher: Bridge):
        self.bridges = {TEACHER: teacher_to_student, STUDENT: student_to_teacher}
        self.enc = {STUDENT: IncrementalEncoder(teacher_to_student.dst), TEACHER: IncrementalEncoder(teacher_to_student.src)}
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._segment_start = True
        self.holder: str | None = None  # side whose context ends with raw ids of an unfinished character
        self._held_ids: list[int] = []
        self._held_text = ""  # completed text the holder's encoder has not received yet

    def copy(self) -> "TextPair":
        new = TextPair.__new__(TextPair)
        new.bridges = self.bridges
        new.enc = {side: enc.copy() for side, enc in self.enc.items()}
        new._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        new._utf8.setstate(self._utf8.getstate())
        new._segment_start = self._segment_start
        new.holder, new._held_ids, new._held_text = self.holder, list(self._held_ids), self._held_text
        return new

    def push_teacher(self, token: int) -> Step:
        own, other = self._push(TEACHER, token)
        return Step(student=other, teacher=own)

    def push_student(self, token: int) -> Step:
        own, other = self._push(STUDENT, token)
        return Step(student=own, teacher=other)

    def _push(self, side: str, token: int) -> tuple[Update, Update]:
        bridge = self.bridges[side]
        other_side = TEACHER if side == STUDENT else STUDENT
        if self.holder not in (None, side):
            raise RuntimeError(f"the {self.holder} side is inside a character; only it may add tokens now")
        if not 0 <= token < bridge.src.size:
            raise ValueError(f"token id {token} is outside the {side} vocabulary (size {bridge.src.size})")
        mapped = bridge.specials.get(token)
        if mapped is not None and token not in bridge.expansions:
            own, other = self._flush(side)
            own = own.then(self.enc[side].push_special(token))
            other = other.then(self.enc[other_side].push_special(mapped))
            self._segment_start = True
            return own, other
        data = bridge.expansions.get(token, bridge.src.token_bytes[token])
        if self._segment_start and data:
            if bridge.src.strip_leading_space and data[:1] == b" ":
                data = data[1:]
            self._segment_start = False
        text = self._utf8.decode(data)
        mid_character = bool(self._utf8.getstate()[0])
        other = self.enc[other_side].push_text(text)
        if self.holder is None and not mid_character:
            return self.enc[side].push_text(text), other
        # Inside a character: this side keeps its raw ids until the character completes.
        rollback = len(self._held_ids)
        self._held_ids.append(token)
        self._held_text += text
        if mid_character:
            self.holder = side
            return Update(0, [token]), other
        own = Update(rollback, []).then(self.enc[side].push_text(self._held_text))
        self.holder, self._held_ids, self._held_text = None, [], ""
        return own, other

    def _flush(self, side: str) -> tuple[Update, Update]:
        """Before a segment-closing special: an unfinished character becomes U+FFFD on both sides."""
        if not self._utf8.getstate()[0] and self.holder is None:
            return Update(), Update()
        text = self._utf8.decode(b"", final=True)
        holder = self.holder or side
        holder_update = Update(len(self._held_ids), []).then(self.enc[holder].push_text(self._held_text + text))
        rest = STUDENT if holder == TEACHER else TEACHER
        rest_update = self.enc[rest].push_text(text)
        self.holder, self._held_ids, self._held_text = None, [], ""
        return (holder_update, rest_update) if holder == side else (rest_update, holder_update)


def make_pair(bridge: Bridge, reverse: Bridge) -> TokenPair | TextPair:
    """The pairing for a teacher→student bridge and its reverse."""
    return TextPair(bridge, reverse) if bridge.kind == "bridged" else TokenPair(bridge, reverse)


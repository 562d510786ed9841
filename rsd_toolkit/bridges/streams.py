"""Bridges: map a stream of token ids of tokenizer A onto tokenizer B, one sequence at a time.

::

    A ids ──bytes per id──▶ UTF-8 decoder ──committed text──▶ B's incremental encoder ──▶ (rollback, append)
                      (holds incomplete characters)          (ids == encode_B(committed text))

Three kinds share this pipeline:

* ``identical``  – ids pass through unchanged (text with non-ASCII bytes is re-encoded, so the
  invariant holds even mid-character);
* ``remappable`` – ids go through a 1:1 table; text near a token one side lacks (e.g. ``<think>``) is
  re-encoded so the invariant still holds there;
* ``bridged``    – every token is re-encoded at the byte level.

Special tokens map by role (EOS↔EOS, ``<|im_end|>``↔``<|eot_id|>``, ``<think>``…) or identical text and
close a segment; unmapped ones are expanded into B's encoding of their text. ``overrides`` lets users
fix any id: ``{a_id: b_id}`` maps it, ``{a_id: "text"}`` expands it.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field

from .incremental import IncrementalEncoder, Update
from .vocab import Vocab

KINDS = ("identical", "remappable", "bridged")
_WHITESPACE = (0x20, 0x09, 0x0A, 0x0D, 0x0B, 0x0C)


def special_map(src: Vocab, dst: Vocab) -> dict[int, int]:
    """Source special ids -> target ids, by role first, then by identical text."""
    dst_by_content = {c: i for i, c in dst.added.items()}
    out: dict[int, int] = {}
    src_role: dict[int, str] = {}
    for role in ("eos", "turn_end", "bos", "turn_start", *src.roles):  # an id with several roles: eos first
        if role in src.roles:
            src_role.setdefault(src.roles[role], role)
    for i in sorted(src.special_ids):
        role = src_role.get(i)
        if role is not None and role in dst.roles:
            out[i] = dst.roles[role]
        elif src.added.get(i) in dst_by_content:
            out[i] = dst_by_content[src.added[i]]
    return out


def remap_table(src: Vocab, dst: Vocab, specials: dict[int, int]) -> list[int]:
    """1:1 id table (``-1`` where the target has no such token): same pieces, same added-token text."""
    dst_pieces = dst.regular_pieces
    dst_added = {c: i for i, c in dst.added.items()}
    table = [-1] * src.size
    for piece, i in src.regular_pieces.items():
        if i < src.size:
            table[i] = dst_pieces.get(piece, -1)
    for i, content in src.added.items():
        if i < src.size:
            table[i] = specials.get(i, dst_added.get(content, -1))
    return table


@dataclass(eq=False)
class Bridge:
    """A directed mapping from ``src`` tokens to ``dst`` tokens. ``stream()`` gives per-sequence state."""

    src: Vocab
    dst: Vocab
    kind: str
    overrides: dict[int, int | str] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"bridge kind must be one of {KINDS}, got {self.kind!r}")
        self.specials = special_map(self.src, self.dst)
        self.expansions: dict[int, bytes] = {}
        for i, target in self.overrides.items():
            if isinstance(target, str):
                self.expansions[i] = target.encode()
                self.specials.pop(i, None)
            else:
                self.specials[i] = int(target)
        self.table: list[int] | None = None
        self.hazard_bytes: frozenset[int] = frozenset()
        if self.kind == "identical":
            self.table = list(range(self.src.size))
        elif self.kind == "remappable":
            self.table = remap_table(self.src, self.dst, self.specials)
            # First bytes of added tokens only one side has: near them segmentation can differ.
            one_sided = {c for i, c in self.src.added.items() if self.table[i] < 0 or i in self.expansions}
            src_contents = set(self.src.added.values())
            one_sided |= {c for c in self.dst.added.values() if c not in src_contents}
            self.hazard_bytes = frozenset(c.encode()[0] for c in one_sided if c)
        for i in self.expansions:
            if self.table is not None:
                self.table[i] = -1

    def stream(self) -> "BridgeStream":
        return BridgeStream(self)

    def reverse(self) -> "Bridge":
        return Bridge(self.dst, self.src, self.kind)

    def map_ids(self, ids: list[int]) -> list[int]:
        """Convenience: the target ids for a whole source sequence."""
        s = self.stream()
        s.feed(ids)
        return s.ids


class BridgeStream:
    """Per-sequence state. ``feed(src_ids)`` returns the target-side :class:`Update`.

    Invariant after every feed: ``ids`` equals, segment by segment, ``dst.encode(committed text)``,
    where committed text is the source's text without trailing incomplete UTF-8 bytes (for canonical
    source ids; the identity bridge passes any ids through unchanged).
    """

    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.encoder = IncrementalEncoder(bridge.dst)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._segment_start = True  # next source bytes open a segment (dummy-prefix strip applies)
        self._held: list[int] = []  # fast-path target ids waiting for their character to complete
        self._held_text: list[str] = []
        self._slow = False  # remap: re-encode until a stable word boundary passes a hazard
        self._last_byte = 0x20

    @property
    def ids(self) -> list[int]:
        return self.encoder.ids

    def copy(self) -> "BridgeStream":
        new = BridgeStream.__new__(BridgeStream)
        new.bridge = self.bridge
        new.encoder = self.encoder.copy()
        new._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        new._utf8.setstate(self._utf8.getstate())
        new._segment_start = self._segment_start
        new._held = list(self._held)
        new._held_text = list(self._held_text)
        new._slow = self._slow
        new._last_byte = self._last_byte
        return new

    @property
    def pending_bytes(self) -> bytes:
        """Source bytes held back because they end inside a UTF-8 character."""
        return self._utf8.getstate()[0]

    def feed(self, ids) -> Update:
        update = Update()
        for i in ids:
            update = update.then(self._feed_one(int(i)))
        return update

    def _feed_one(self, i: int) -> Update:
        bridge = self.bridge
        if not 0 <= i < bridge.src.size:
            raise ValueError(f"token id {i} is outside the source vocabulary (size {bridge.src.size})")
        target = bridge.specials.get(i)
        if target is not None:
            return self._flush().then(self.encoder.push_special(target)).then(self._open_segment())
        data = bridge.expansions.get(i, bridge.src.token_bytes[i])
        if self._segment_start and data:
            if bridge.src.strip_leading_space and data[:1] == b" ":
                data = data[1:]
            self._segment_start = False
        if bridge.table is not None and not self._hazard(i, data):
            return self._fast(bridge.table[i], data)
        return self._slow_path(data)

    def _open_segment(self) -> Update:
        self._segment_start, self._slow, self._last_byte = True, False, 0x20
        return Update()

    def _hazard(self, i: int, data: bytes) -> bool:
        bridge = self.bridge
        starts_word = data[:1] in (b" ", b"\t") and self._last_byte not in _WHITESPACE
        if self._slow and starts_word and not self._held:
            self._slow = False  # everything before this stable cut is final: fast path again
        # Non-ASCII bytes may end inside a character: its completed text must be re-encoded, not held.
        # Trailing whitespace is segmented differently once text follows (``\s+(?!\S)``): re-encode too.
        if (
            bridge.table[i] < 0
            or bridge.hazard_bytes.intersection(data)
            or not data.isascii()
            or (data and data[-1] in _WHITESPACE)
        ):
            self._slow = True
        return self._slow

    def _fast(self, target: int, data: bytes) -> Update:
        text = self._utf8.decode(data)
        if data:
            self._last_byte = data[-1]
        self._held.append(target)
        self._held_text.append(text)
        if self.pending_bytes:
            return Update()
        ids, text = self._held, "".join(self._held_text)
        self._held, self._held_text = [], []
        return self.encoder.push_known(ids, text)

    def _slow_path(self, data: bytes) -> Update:
        # Held fast-path ids are dropped: their text (and the bytes still in the decoder) re-encode now.
        text = "".join(self._held_text) + self._utf8.decode(data)
        self._held, self._held_text = [], []
        if data:
            self._last_byte = data[-1]
        return self.encoder.push_text(text)

    def _flush(self) -> Update:
        """Before a segment-closing special: incomplete bytes become U+FFFD text."""
        if not self.pending_bytes:
            return Update()
        text = "".join(self._held_text) + self._utf8.decode(b"", final=True)
        self._held, self._held_text = [], []
        return self.encoder.push_text(text)

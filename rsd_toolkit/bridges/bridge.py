"""What one tokenizer's ids mean on the other side: the static maps a :class:`~.pair.Pair` reads.

A :class:`Bridge` joins a teacher and a student vocabulary, both ways. Per direction (a :class:`Direction`):

* special tokens map by role (EOS↔EOS, ``<|im_end|>``↔``<|eot_id|>``, ``<think>``…) or identical text and
  close a segment; unmapped ones are text like any other token;
* ``overrides`` fix any id: ``{id: other_id}`` maps it, ``{id: "text"}`` writes it out as that text;
* ``identical`` and ``remappable`` pairs have a 1:1 id table (``NO_TOKEN`` where the other side lacks
  the piece); ``bridged`` pairs have none: every token goes through text.

``bridge.pair()`` gives the per-sequence state; ``map_ids`` (one direction, whole sequence) is its
simplest use. Pure tokenizer code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from .incremental import Update
from .pair import NO_TOKEN, STUDENT, TEACHER, Pair
from .vocab import Vocab

KINDS = ("identical", "remappable", "bridged")


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
    """1:1 id table (``NO_TOKEN`` where the target has no such token): same pieces, same added-token text."""
    dst_pieces = dst.regular_pieces
    dst_added = {c: i for i, c in dst.added.items()}
    table = [NO_TOKEN] * src.size
    for piece, i in src.regular_pieces.items():
        if i < src.size:
            table[i] = dst_pieces.get(piece, NO_TOKEN)
    for i, content in src.added.items():
        if i < src.size:
            table[i] = specials.get(i, dst_added.get(content, NO_TOKEN))
    return table


@dataclass(eq=False)
class Direction:
    """How ``src`` ids read on the ``dst`` side."""

    src: Vocab
    dst: Vocab
    kind: str
    overrides: dict[int, int | str] = field(default_factory=dict)

    def __post_init__(self):
        self.specials = special_map(self.src, self.dst)  # segment-closing ids -> the other side's id
        self.expansions: dict[int, bytes] = {}  # ids written out as text
        for i, target in self.overrides.items():
            if isinstance(target, str):
                self.expansions[i] = target.encode()
                self.specials.pop(i, None)
            else:
                self.specials[i] = int(target)
        self.table: list[int] | None = None
        if self.kind == "identical":
            self.table = list(range(self.src.size))
        elif self.kind == "remappable":
            self.table = remap_table(self.src, self.dst, self.specials)
        if self.table is not None:
            for i, target in self.specials.items():
                self.table[i] = target
            for i in self.expansions:
                self.table[i] = NO_TOKEN

    def data(self, token: int) -> bytes:
        """The bytes a token adds to the shared text."""
        return self.expansions.get(token, self.src.token_bytes[token])

    @cached_property
    def plain_text(self) -> list[str | None]:
        """Per id, its text when that is complete UTF-8, not empty, and the id closes no segment: after
        complete text such a token adds exactly this to both sides (``Pair.start``'s path without the
        UTF-8 decoder); ``None`` for the rest."""
        table = list(self.src.token_bytes)
        for i, data in self.expansions.items():
            table[i] = data
        out: list[str | None] = []
        for data in table:
            try:
                out.append(data.decode() or None)
            except UnicodeDecodeError:
                out.append(None)
        for i in self.specials:
            out[i] = None
        return out

    def image(self, token: int) -> int:
        """The other side's 1:1 counterpart, or ``NO_TOKEN``."""
        return NO_TOKEN if self.table is None else self.table[token]

    def image_ids(self, token: int) -> list[int]:
        """The counterpart, or (none) the other side's encoding of the token's text: token-level pairing."""
        target = self.image(token)
        if target != NO_TOKEN:
            return [target]
        return self.dst.encode(self.data(token).decode("utf-8", errors="replace"))


@dataclass(eq=False)
class Bridge:
    """A teacher and a student tokenizer joined both ways. ``pair()`` gives per-sequence state."""

    teacher: Vocab
    student: Vocab
    kind: str
    overrides: dict[int, int | str] = field(default_factory=dict)  # teacher ids
    reverse_overrides: dict[int, int | str] = field(default_factory=dict)  # student ids

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"bridge kind must be one of {KINDS}, got {self.kind!r}")
        self.maps = {
            TEACHER: Direction(self.teacher, self.student, self.kind, self.overrides),
            STUDENT: Direction(self.student, self.teacher, self.kind, self.reverse_overrides),
        }

    @property
    def specials(self) -> dict[int, int]:
        """Teacher special ids -> student ids."""
        return self.maps[TEACHER].specials

    @property
    def keeps_sampled_ids(self) -> bool:
        """Identical tokenizers: RSD runs on the sampled ids themselves (as single-tokenizer RSD does)."""
        return self.kind == "identical"

    def pair(self) -> Pair:
        return Pair(self)

    def map_ids(self, ids: list[int]) -> list[int]:
        """The student ids for a whole teacher sequence (the pair fed from the teacher side only)."""
        pair, update = self.pair(), Update()
        for i in ids:
            update = update.then(pair.push(TEACHER, int(i)).student)
        return update.append

"""What the bridges need to know about one tokenizer, as plain data: raw bytes per token, special
tokens and their roles, and the text convention that makes ``encode(text_of(ids)) == ids``.

Pure functions over a ``tokenizers.Tokenizer``; no model is ever loaded here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property

from tokenizers import Tokenizer

# Role names for special tokens, so that e.g. Qwen's <|im_end|> and Llama-3's <|eot_id|> correspond.
MARKER_ROLES = {
    "<|im_start|>": "turn_start",
    "<|start_header_id|>": "turn_start",
    "<|im_end|>": "turn_end",
    "<|eot_id|>": "turn_end",
    "<|end|>": "turn_end",
    "[INST]": "inst_start",
    "[/INST]": "inst_end",
    "<think>": "think_start",
    "</think>": "think_end",
    "<|endoftext|>": "end_of_text",
    "<|end_of_text|>": "end_of_text",
}
BASE_ROLES = ("bos", "eos", "pad", "unk")

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PROBES = ("Hello", " Hello", "  x", "\n a", "a  b", "1 2", "x")


class UnsupportedTokenizer(ValueError):
    """The tokenizer's pieces cannot be turned back into bytes (e.g. WordPiece's ``##``)."""


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte <-> printable-unicode table used by every byte-level BPE.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return bytes_to_unicode()


def _component_types(node) -> set[str]:
    """All ``type`` values in a normaliser/pre-tokeniser/decoder JSON tree."""
    if isinstance(node, dict):
        out = {node["type"]} if isinstance(node.get("type"), str) else set()
        for v in node.values():
            out |= _component_types(v)
        return out
    if isinstance(node, list):
        out = set()
        for v in node:
            out |= _component_types(v)
        return out
    return set()


def piece_bytes_table(spec: dict, vocab: dict[str, int], added: dict[int, str], size: int) -> list[bytes]:
    """Raw bytes of every token id (index = id), from the tokenizer's JSON spec.

    Byte-level BPE pieces go through the GPT-2 byte table; SentencePiece-style pieces turn ``▁`` into a
    space and ``<0xNN>`` into one byte; added tokens are their literal text.
    """
    types = _component_types(spec.get("decoder")) | _component_types(spec.get("pre_tokenizer"))
    model = spec["model"]
    table = [b""] * size
    if "ByteLevel" in types:
        decoder = {ch: b for b, ch in _bytes_to_unicode().items()}

        def to_bytes(piece: str) -> bytes:
            return bytes(decoder[c] for c in piece) if all(c in decoder for c in piece) else piece.encode()

    elif model["type"] in ("BPE", "Unigram") and ({"Metaspace", "Replace", "ByteFallback"} & types):
        byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types

        def to_bytes(piece: str) -> bytes:
            m = _BYTE_FALLBACK.fullmatch(piece) if byte_fallback else None
            return bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()

    else:
        raise UnsupportedTokenizer(
            f"cannot map {model['type']} pieces back to bytes (decoder types: {sorted(types) or 'none'})"
        )
    for piece, i in vocab.items():
        if i < size:
            table[i] = to_bytes(piece)
    for i, content in added.items():
        if i < size:
            table[i] = content.encode()
    return table


WINDOW_CACHE_SIZE = 1 << 16
BATCH_MIN = 4  # misses from which one encode_batch_fast call beats plain calls (benchmarks/bench_bridges.py)


def _without_dummy_prefix(node):
    """A tokenizer spec (JSON tree) whose Metaspace never prepends and that has no Prepend normaliser."""
    if isinstance(node, list):
        return [_without_dummy_prefix(n) for n in node if not (isinstance(n, dict) and n.get("type") == "Prepend")]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Prepend":
        return None
    out = {k: _without_dummy_prefix(v) for k, v in node.items()}
    if node.get("type") == "Metaspace":
        out["prepend_scheme"] = "never"
        if "add_prefix_space" in out:
            out["add_prefix_space"] = False
    return out


@dataclass(eq=False)
class Vocab:
    """Tokenizer facts for bridging. Build with :meth:`from_tokenizer`."""

    name: str
    backend: Tokenizer
    spec: dict
    token_bytes: list[bytes]
    added: dict[int, str]  # every added token: id -> content
    special_ids: frozenset[int]
    roles: dict[str, int]  # role -> id (bos/eos/pad/unk and MARKER_ROLES)
    model_vocab_size: int | None = None  # padded size of a model's embedding, when known
    strip_leading_space: bool = False  # text of ids drops one leading space (Prepend-style dummy prefix)
    lossless: bool = True  # encode(text_of(encode(x))) == encode(x) held on the probes
    _window_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_tokenizer(cls, tok, model_vocab_size: int | None = None, name: str | None = None) -> "Vocab":
        backend: Tokenizer = tok.backend_tokenizer
        spec = json.loads(backend.to_str())
        added = {i: t.content for i, t in backend.get_added_tokens_decoder().items()}
        size = len(tok)
        table = piece_bytes_table(spec, backend.get_vocab(with_added_tokens=False), added, size)
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        roles: dict[str, int] = {}
        for role in BASE_ROLES:
            tid = getattr(tok, f"{role}_token_id", None)
            if isinstance(tid, int):
                roles[role] = tid
                special.add(tid)
        for i, content in sorted(added.items()):
            role = MARKER_ROLES.get(content)
            if role and role not in roles:
                roles[role] = i
        vocab = cls(
            name=name or getattr(tok, "rsd_source", None) or getattr(tok, "name_or_path", "") or "tokenizer",
            backend=backend,
            spec=spec,
            token_bytes=table,
            added=added,
            special_ids=frozenset(special),
            roles=roles,
            model_vocab_size=model_vocab_size,
        )
        vocab.strip_leading_space, vocab.lossless = vocab._probe_text_convention()
        return vocab

    # -- encoding / text -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Canonical encoding: no BOS/EOS added, added tokens matched as the tokenizer does."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_continuation(self, text: str) -> list[int]:
        """Canonical ids of ``text`` read as the continuation of a segment: no dummy-prefix space.

        The incremental encoder re-encodes windows that start inside a segment. Memoised (bounded):
        the windows of a long whitespace run repeat, in one trace and across the rows of a batch.
        """
        return list(self.encode_window(text))

    def encode_window(self, text: str) -> tuple[int, ...]:
        """:meth:`encode_continuation` as the memoised tuple itself (not to be changed)."""
        hit = self._window_cache.get(text)
        if hit is None:
            if len(self._window_cache) >= WINDOW_CACHE_SIZE:
                self._window_cache.clear()
            hit = self._window_cache[text] = self._encode_window_uncached(text)
        return hit

    def _encode_window_uncached(self, text: str) -> tuple[int, ...]:
        """The continuation encoding, exact also across a restarting added token (:attr:`restart_ids`): the
        text from it on is encoded as the tokenizer encodes a split after an added token (dummy prefix)."""
        enc = self._continuation.encode(text, add_special_tokens=False)
        if self.restart_ids:
            for j, i in enumerate(enc.ids):
                if i in self.restart_ids:
                    return (*enc.ids[:j], *self.encode(text[enc.offsets[j][0] :]))
        return tuple(enc.ids)

    def encode_windows(self, texts: list[str]) -> list[tuple[int, ...]]:
        """:meth:`encode_window` of many windows: the cache first, the misses (each distinct text once) in one
        tokenizer call.

        One batched call (``encode_batch_fast``, Rust, across the ``RAYON_NUM_THREADS`` pool) replaces a
        Python-to-Rust round trip per window; below ``BATCH_MIN`` misses the plain calls are cheaper.
        """
        cache = self._window_cache
        out = [cache.get(t) for t in texts]
        miss = list(dict.fromkeys(t for t, hit in zip(texts, out) if hit is None))  # once each: rows may share a window
        if len(miss) >= BATCH_MIN and not self.restart_ids:
            if len(cache) + len(miss) >= WINDOW_CACHE_SIZE:
                cache.clear()
            for t, e in zip(miss, self._continuation.encode_batch_fast(miss, add_special_tokens=False)):
                cache[t] = tuple(e.ids)
            return [hit if hit is not None else cache[t] for t, hit in zip(texts, out)]
        return [hit if hit is not None else self.encode_window(t) for t, hit in zip(texts, out)]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` of many texts (one batched call from ``BATCH_MIN`` texts on)."""
        if len(texts) < BATCH_MIN:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    @cached_property
    def _continuation(self) -> Tokenizer:
        """The backend with SentencePiece's dummy prefix switched off (itself when there is none)."""
        parts = ("normalizer", "pre_tokenizer")
        changed = {k: _without_dummy_prefix(self.spec.get(k)) for k in parts}
        if all(changed[k] == self.spec.get(k) for k in parts):
            return self.backend
        return Tokenizer.from_str(json.dumps({**self.spec, **changed}))

    @cached_property
    def continues_exactly(self) -> bool:
        """Whether a window may start anywhere in a segment (not only at a space): the continuation
        encoding adds no dummy prefix (checked on probes)."""
        return all(self.raw_bytes(self._continuation.encode(p, add_special_tokens=False).ids) == p.encode()
                   for p in ("x", "机器", "12"))  # fmt: skip

    @cached_property
    def restart_contents(self) -> tuple[bytes, ...]:
        """UTF-8 contents of the added tokens that a window cannot read across: where their text occurs,
        what follows is encoded as a new start (legacy SentencePiece ``tokenizer.json``, e.g. Phi-3 or
        Llama-2: a dummy ``▁`` after a text-matched ``<s>`` or ``<unk>``), or spaces around them are
        absorbed (lstrip/rstrip). Probed per added token: ``encode(a + c + b)`` against the windows'
        concatenation. Empty for most vocabularies (then nothing changes for them)."""
        # a whitespace token (a code tokenizer's run of spaces) merges with spaces around it as any run does,
        # which windows handle: it is probed between letters only
        probes = [(c, a, b) for c in set(self.added.values()) if c
                  for a, b in ((("a", "b"),) if c.isspace() else (("a", "b"), ("a ", " b")))]  # fmt: skip
        if not probes:
            return ()
        wholes = self.backend.encode_batch_fast([a + c + b for c, a, b in probes], add_special_tokens=False)
        texts = sorted({t for c, a, b in probes for t in (c, b)})
        parts = {t: e.ids for t, e in zip(texts, self._continuation.encode_batch_fast(texts, add_special_tokens=False))}
        starts = {a: self.encode(a) for a in ("a", "a ")}
        found = {c for (c, a, b), whole in zip(probes, wholes) if whole.ids != starts[a] + parts[c] + parts[b]}
        return tuple(sorted(c.encode() for c in found))

    @cached_property
    def restart_ids(self) -> frozenset[int]:
        """The ids of :attr:`restart_contents` (what a window encoding yields where one matched)."""
        contents = set(self.restart_contents)
        return frozenset(i for i, c in self.added.items() if c.encode() in contents)

    @cached_property
    def restart_marks(self) -> frozenset[str]:
        """Last characters of :attr:`restart_contents`: text without any of them completes none."""
        return frozenset(c.decode()[-1] for c in self.restart_contents)

    @cached_property
    def strip_window(self) -> bool:
        """A window that starts with a space loses it: the continuation encoding still adds a dummy prefix."""
        return self.strip_leading_space and not self.continues_exactly

    @cached_property
    def cut_flags(self) -> tuple[bytearray, bytearray]:
        """Per id: whether its bytes start with a space or tab, and whether they end in a non-space
        (a stable cut is a token of the first kind after one of the second)."""
        starts = bytearray(b[:1] in (b" ", b"\t") for b in self.token_bytes)
        ends = bytearray(bool(b) and b[-1] not in b" \t\n\r\x0b\x0c" for b in self.token_bytes)
        return starts, ends

    @cached_property
    def token_lens(self) -> list[int]:
        """Per id, its byte length (the incremental encoder's token ends, without a call per token)."""
        return [len(b) for b in self.token_bytes]

    def raw_bytes(self, ids) -> bytes:
        table = self.token_bytes
        return b"".join(table[i] for i in ids)

    def text_of(self, ids) -> str:
        """The text whose canonical encoding is ``ids`` (for canonical ids); U+FFFD for broken UTF-8."""
        text = self.raw_bytes(ids).decode("utf-8", errors="replace")
        return text[1:] if self.strip_leading_space and text.startswith(" ") else text

    def committed_text(self, ids) -> str:
        """``text_of(ids)`` without trailing incomplete UTF-8 bytes: what a bridge has committed so far."""
        import codecs

        text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(self.raw_bytes(ids), final=False)
        return text[1:] if self.strip_leading_space and text.startswith(" ") else text

    def _probe_text_convention(self) -> tuple[bool, bool]:
        def round_trips(strip: bool) -> bool:
            for p in _PROBES:
                ids = self.encode(p)
                text = self.raw_bytes(ids).decode("utf-8", errors="replace")
                if strip and text.startswith(" "):
                    text = text[1:]
                if self.encode(text) != ids:
                    return False
            return True

        if round_trips(False):
            return False, True
        if round_trips(True):
            return True, True
        return False, False

    # -- descriptive facts (used by the compatibility report) ------------------------------------
    @property
    def size(self) -> int:
        return len(self.token_bytes)

    @cached_property
    def model_type(self) -> str:
        return self.spec["model"]["type"]

    @cached_property
    def byte_level(self) -> bool:
        return "ByteLevel" in (_component_types(self.spec.get("pre_tokenizer")) | _component_types(self.spec.get("decoder")))

    @cached_property
    def unicode_normalization(self) -> str | None:
        """"NFC"/"NFKC"/… when the normaliser applies one (token bytes are then in that form)."""
        found = _component_types(self.spec.get("normalizer")) & {"NFC", "NFKC", "NFD", "NFKD"}
        return next(iter(found)) if found else None

    @cached_property
    def byte_fallback(self) -> bool:
        return bool(self.spec["model"].get("byte_fallback"))

    @cached_property
    def regular_pieces(self) -> dict[str, int]:
        """Model vocabulary without added tokens: piece -> id."""
        return {p: i for p, i in self.backend.get_vocab(with_added_tokens=False).items() if i not in self.added}

    @cached_property
    def piece_of(self) -> dict[int, str]:
        return {i: p for p, i in self.regular_pieces.items()}

    def describe_component(self, key: str) -> str:
        node = self.spec.get(key)
        if node is None:
            return "none"
        types = _component_types(node)
        return "+".join(sorted(types))

"""How two tokenizers relate, and which bridge RSD needs between them.

``classify`` decides from structure (normaliser, pre-tokeniser, model, merges, pieces) and confirms on
sample text; ``analyse`` adds everything the ``rsd compat`` report shows. Pure tokenizer code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .bridge import NO_TOKEN, Bridge, remap_table, special_map
from .vocab import BASE_ROLES, MARKER_ROLES, Vocab

# Built-in multilingual sample: prose, math/LaTeX, code, digits, whitespace runs, CJK, emoji, combining marks.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 3:45 pm and the answer is 1234567.\n"
    "Let x = \\frac{1}{2} + \\sqrt{3}; then x^2 = 3.1415926 and \\boxed{42}.\n"
    "def f(n):\n    return [i * i for i in range(n)]  # squares\n"
    "Über die Brücke gehen zwölf Männer.  Café, naïve, façade.\n"
    "Привет, мир! Это тест токенизатора.\n"
    "机器学习是人工智能的一个分支。日本語のテキストも含まれます。한국어 문장입니다.\n"
    "مرحبا بالعالم. नमस्ते दुनिया।\n"
    "Emoji: 🦙🚀👍🏽 and combining: e\u0301 a\u0308.\n"
    "\t\tTabs,   spaces,\n\n\nnewlines — and    more.   \n"
)


def classify(a: Vocab, b: Vocab, sample: str = SAMPLE_TEXT) -> str:
    """``identical``, ``remappable`` or ``bridged`` (see module docs of ``bridges``)."""
    same_pipeline = all(a.spec.get(k) == b.spec.get(k) for k in ("normalizer", "pre_tokenizer", "decoder"))
    ma, mb = dict(a.spec["model"]), dict(b.spec["model"])
    va, vb = ma.pop("vocab", None), mb.pop("vocab", None)
    if (
        same_pipeline
        and ma == mb
        and va == vb
        and a.added == b.added
        and a.size == b.size
        and a.model_vocab_size == b.model_vocab_size
    ):
        return "identical"
    if not same_pipeline or ma.get("merges") != mb.get("merges") or ma.get("type") != mb.get("type"):
        return "bridged"
    pieces_a = {p for p in a.regular_pieces if p not in b.added.values()}
    pieces_b = {p for p in b.regular_pieces if p not in a.added.values()}
    if pieces_a != pieces_b:
        return "bridged"
    # Same segmentation must also show on text (except right next to one-sided tokens).
    table = remap_table(a, b, special_map(a, b))
    for line in sample.splitlines():
        mapped = [table[i] for i in a.encode(line)]
        if NO_TOKEN not in mapped and mapped != b.encode(line):
            return "bridged"
    return "remappable"


def make_bridge(
    teacher: Vocab, student: Vocab, kind: str | None = None, overrides: dict | None = None, reverse_overrides: dict | None = None
) -> Bridge:
    """The bridge between ``teacher`` and ``student``: classified automatically unless ``kind`` forces one.
    ``overrides`` fix teacher ids, ``reverse_overrides`` student ids (``{id: other_id or "text"}``)."""
    return Bridge(teacher, student, kind or classify(teacher, student), dict(overrides or {}), dict(reverse_overrides or {}))


# ------------------------------------------------------------------------------------------- report
@dataclass
class SideFacts:
    name: str
    vocab_size: int
    model_vocab_size: int | None
    model_type: str
    normalizer: str
    pre_tokenizer: str
    decoder: str
    byte_level: bool
    byte_fallback: bool
    added_tokens: int
    special_tokens: dict[str, str | None]
    round_trip: float  # share of sample lines with decode(encode(x)) == x
    fertility: float  # tokens per 1000 characters of the sample
    warnings: list[str] = field(default_factory=list)


@dataclass
class CompatReport:
    teacher: SideFacts
    student: SideFacts
    verdict: str
    piece_overlap_teacher: float  # share of teacher pieces (as bytes) the student also has
    piece_overlap_student: float
    id_agreement: float  # share of shared pieces with the same id on both sides
    special_map: list[dict]  # teacher special -> student token (or expansion)
    boundary_agreement: float  # share of token boundaries (byte offsets in the text) both sides have
    bridge_exact: float  # share of sample lines where bridged ids == student's encoding of the teacher's text
    sample_chars: int
    meaning: str

    def to_dict(self) -> dict:
        return asdict(self)


_MEANING = {
    "identical": "Same tokenizer: RSD compares the two models token by token (identity bridge, no overhead).",
    "remappable": (
        "Same segmentation, different ids: RSD uses an exact 1:1 id map; tokens only one side has are "
        "expanded into the other side's tokens for their text."
    ),
    "bridged": (
        "Different segmentation: each teacher token is re-tokenised into a span of student tokens, accepted "
        "only if every token of the span has p_s >= pth; student fallbacks are re-tokenised for the teacher."
    ),
}


def _side_facts(v: Vocab, lines: list[str], text: str) -> SideFacts:
    roles = {r: v.roles.get(r) for r in (*BASE_ROLES, *sorted(set(MARKER_ROLES.values())))}
    specials = {r: (v.added.get(i) if i in v.added else v.piece_of.get(i)) if i is not None else None for r, i in roles.items()}
    specials = {r: s for r, s in specials.items() if s is not None or r in BASE_ROLES}
    ok = 0
    for line in lines:
        ok += v.backend.decode(v.encode(line), skip_special_tokens=False) == line
    n_tokens = len(v.encode(text))
    warnings = []
    if "eos" not in v.roles:
        warnings.append("no EOS token: generation can only stop at max_new_tokens or a stop string")
    if not v.lossless:
        warnings.append("encode(text(ids)) does not round-trip on probes: bridging from it may not be exact")
    if v.model_vocab_size and v.model_vocab_size != v.size:
        warnings.append(f"model embedding has {v.model_vocab_size} rows for {v.size} tokens (padding)")
    return SideFacts(
        name=v.name,
        vocab_size=v.size,
        model_vocab_size=v.model_vocab_size,
        model_type=v.model_type,
        normalizer=v.describe_component("normalizer"),
        pre_tokenizer=v.describe_component("pre_tokenizer"),
        decoder=v.describe_component("decoder"),
        byte_level=v.byte_level,
        byte_fallback=v.byte_fallback,
        added_tokens=len(v.added),
        special_tokens=specials,
        round_trip=ok / max(1, len(lines)),
        fertility=1000 * n_tokens / max(1, len(text)),
        warnings=warnings,
    )


def _boundaries(v: Vocab, ids: list[int], line: str) -> set[int]:
    """Byte offsets in ``line`` where tokens end (a dummy-prefix space is not counted)."""
    lead = max(0, len(v.raw_bytes(ids)) - len(line.encode()))
    out, pos = set(), -lead
    for i in ids:
        pos += len(v.token_bytes[i])
        out.add(pos)
    return out


def _how(teacher: Vocab, student: Vocab, tid: int, sid: int | None) -> str:
    """How a teacher special token reaches the student: ``by role (eos)`` names the role both tokens share
    (a GPT-2 ``<|endoftext|>`` is BOS and EOS at once, and maps to the student's EOS, not its BOS)."""
    if sid is None:
        return "expanded as text"
    shared = [r for r, i in teacher.roles.items() if i == tid and student.roles.get(r) == sid]
    return f"by role ({', '.join(sorted(shared))})" if shared else "by text"


def differences(a: Vocab, b: Vocab, id_agreement: float) -> list[str]:
    """What keeps a pair from being identical, each as a short phrase with both sides' values."""
    out = []
    for key, label in (("normalizer", "normaliser"), ("pre_tokenizer", "pre-tokeniser"), ("decoder", "decoder")):
        if a.spec.get(key) != b.spec.get(key):
            out.append(f"{label} {a.describe_component(key)} vs {b.describe_component(key)}")
    ma, mb = dict(a.spec["model"]), dict(b.spec["model"])
    if ma.get("type") != mb.get("type"):
        out.append(f"model {ma.get('type')} vs {mb.get('type')}")
    elif ma.get("merges") != mb.get("merges"):
        out.append("different merges")
    if id_agreement < 1:
        out.append(f"{100 * (1 - id_agreement):.1f}% of shared pieces have other ids")
    if a.added != b.added:
        only_a = len(set(a.added.values()) - set(b.added.values()))
        only_b = len(set(b.added.values()) - set(a.added.values()))
        out.append(f"added tokens {len(a.added)} vs {len(b.added)} ({only_a} only in the teacher, {only_b} only in the "
                   "student)" if only_a or only_b else f"added tokens at other ids ({len(a.added)} on each side)")  # fmt: skip
    if a.size != b.size:
        out.append(f"vocab {a.size} vs {b.size}")
    if a.model_vocab_size != b.model_vocab_size:
        out.append(f"model embedding rows {a.model_vocab_size} vs {b.model_vocab_size}")
    return out


def analyse(teacher: Vocab, student: Vocab, text: str | None = None) -> CompatReport:
    """Everything ``rsd compat`` reports about a teacher/student tokenizer pair."""
    text = text if text is not None else SAMPLE_TEXT
    lines = [ln for ln in text.splitlines() if ln.strip()]
    verdict = classify(teacher, student, text)
    bytes_t = {b: i for i, b in enumerate(teacher.token_bytes) if b and i not in teacher.added}
    bytes_s = {b: i for i, b in enumerate(student.token_bytes) if b and i not in student.added}
    shared = bytes_t.keys() & bytes_s.keys()
    same_id = sum(bytes_t[b] == bytes_s[b] for b in shared)
    bridge = make_bridge(teacher, student, verdict)
    exact = 0
    shared_cuts = all_cuts = 0
    for line in lines:
        t_ids, s_ids = teacher.encode(line), student.encode(line)
        exact += bridge.map_ids(t_ids) == student.encode(teacher.text_of(t_ids))
        cuts_t, cuts_s = _boundaries(teacher, t_ids, line), _boundaries(student, s_ids, line)
        shared_cuts += len(cuts_t & cuts_s)
        all_cuts += len(cuts_t | cuts_s)
    smap = []
    for role, tid in sorted(teacher.roles.items(), key=lambda kv: kv[1]):
        sid = bridge.specials.get(tid)
        smap.append(
            {
                "role": role,
                "teacher": teacher.added.get(tid, teacher.piece_of.get(tid)),
                "teacher_id": tid,
                "student": student.added.get(sid, student.piece_of.get(sid)) if sid is not None else None,
                "student_id": sid,
                "how": _how(teacher, student, tid, sid),
            }
        )
    return CompatReport(
        teacher=_side_facts(teacher, lines, text),
        student=_side_facts(student, lines, text),
        verdict=verdict,
        piece_overlap_teacher=len(shared) / max(1, len(bytes_t)),
        piece_overlap_student=len(shared) / max(1, len(bytes_s)),
        id_agreement=same_id / max(1, len(shared)),
        special_map=smap,
        boundary_agreement=shared_cuts / max(1, all_cuts),
        bridge_exact=exact / max(1, len(lines)),
        sample_chars=len(text),
        meaning=_meaning(verdict, differences(teacher, student, same_id / max(1, len(shared)))),
    )


def _meaning(verdict: str, diffs: list[str]) -> str:
    """The verdict's meaning, with the differences that caused it (not a generic sentence that may not apply)."""
    if verdict == "identical" or not diffs:
        return _MEANING[verdict]
    if verdict == "remappable":
        return (f"Same segmentation; differs in: {'; '.join(diffs)}. RSD uses an exact 1:1 id map; tokens only one "
                "side has are expanded into the other side's tokens for their text.")  # fmt: skip
    return f"{_MEANING[verdict]} Differs in: {'; '.join(diffs)}."

"""Property tests: random text, real tokenizers, random chunking; the bridge invariant never breaks.

Invariant after every feed: target ids == target.encode(committed text), where the committed text is
what the source ids spell without trailing incomplete UTF-8 bytes.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsd_toolkit.bridges import classify, load_vocab, make_bridge

# Pieces that stress tokenizers: LaTeX, code, CJK, emoji (multi-byte, ZWJ, skin tone), combining marks,
# whitespace runs, digits, punctuation followed by newlines.
ATOMS = [
    "a", "b", "Z", "the", " ", "  ", "   ", "\t", "\n", "\n\n", " \n", "\r\n", "0", "1", "7", "42", "12345",
    ".", ",", "!", "?", "'s", "'", '"', "(", ")", "{", "}", "\\frac", "\\boxed{", "^", "_", "$", "=", "+", "-",
    "def ", "x", ":", "    return", "#", "é", "e\u0301", "a\u0308", "ß", "ü", "日本", "語", "机器学习", "。",
    "한국어", "Привет", "мир", "🦙", "🚀", "👍🏽", "👨\u200d👩\u200d👧", "\u00a0", "—", "…", "<", ">", "<think>", "</think>",
]  # fmt: skip
EXAMPLES = int(os.environ.get("RSD_HYPOTHESIS_EXAMPLES", "120"))  # raise for a thorough local run
texts = st.lists(st.sampled_from(ATOMS), min_size=1, max_size=40).map("".join)
chunkings = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=60)


def check_stream(bridge, text: str, chunks: list[int]) -> None:
    src, dst = bridge.src, bridge.dst
    ids = src.encode(text)
    stream, mirror, pos, k = bridge.stream(), [], 0, 0
    while pos < len(ids):
        step = chunks[k % len(chunks)]
        k += 1
        update = stream.feed(ids[pos : pos + step])
        pos += step
        mirror = update.apply(mirror)
        expected = dst.encode(src.committed_text(ids[:pos]))
        assert mirror == stream.ids, "updates must reproduce the stream's ids"
        assert mirror == expected, f"invariant broken after {pos}/{len(ids)} ids of {text!r}"
    if "eos" in src.roles and "eos" in dst.roles:  # EOS maps by role and closes the segment
        update = stream.feed([src.roles["eos"]])
        assert update.append and update.append[-1] == dst.roles["eos"]


PAIRS = [
    ("qwen2", "llama-bpe", "bridged"),
    ("qwen2", "gpt-2", "bridged"),
    ("llama-bpe", "mistral-v1", "bridged"),
    ("gpt-2", "tekken", "bridged"),
    ("mistral-v1", "mistral-v3", "remappable"),
]


@pytest.mark.parametrize("a,b,kind", PAIRS, ids=[f"{a}<->{b}" for a, b, _ in PAIRS])
def test_pair_both_directions(a, b, kind, vocab):
    va, vb = vocab(a), vocab(b)
    assert classify(va, vb) == kind and classify(vb, va) == kind
    for src, dst in ((va, vb), (vb, va)):
        bridge = make_bridge(src, dst)

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(text=texts, chunks=chunkings)
        def prop(text, chunks):
            check_stream(bridge, text, chunks)

        prop()


def test_qwen2_padded_with_think_is_remappable(vocab, qwen2_think_dir):
    base = vocab("qwen2")
    think = load_vocab(str(qwen2_think_dir))
    assert think.model_vocab_size == 152064 and think.size == base.size + 2
    assert classify(base, think) == "remappable" and classify(think, base) == "remappable"
    for src, dst in ((base, think), (think, base)):
        bridge = make_bridge(src, dst)
        assert bridge.kind == "remappable"

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
        @given(text=texts, chunks=chunkings)
        def prop(text, chunks):
            check_stream(bridge, text, chunks)

        prop()
    # the one-sided token really is a single token on one side and several on the other
    assert len(think.encode("<think>")) == 1 and len(base.encode("<think>")) > 1


def test_forced_retokenising_bridge_equals_identity_on_identical_pair(vocab):
    v = vocab("qwen2")
    assert classify(v, v) == "identical"
    ids = v.encode("Let x = \\frac{1}{2}. 日本語 🦙  spaces\n\nend 12345")
    assert make_bridge(v, v, "identical").map_ids(ids) == make_bridge(v, v, "bridged").map_ids(ids) == ids

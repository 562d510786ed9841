"""One step's pushes for a whole batch: ``push_all(pairs, side, tokens) -> list[Step]``.

Each :meth:`Pair.push <.pair.Pair.push>` starts with :meth:`~.pair.Pair.start`: the Step when no tokenizer
call is needed (most pushes), else a generator of the calls it needs (:class:`~.incremental.Encode`).
Here the rows' generators run in lock-step: a round collects one request per row still working, answers
them per tokenizer together (memoised windows first, then the misses in one ``encode_batch_fast`` call),
and sends each row its ids. The pushes run exactly the code a single push runs, so the Steps are the
same; only the tokenizer calls are grouped.
"""

from __future__ import annotations

from collections.abc import Sequence

from .incremental import Encode, Steps
from .pair import Pair, Step


def push_all(pairs: Sequence[Pair], side: str, tokens: Sequence[int]) -> list[Step]:
    """``[pair.push(side, token) for pair, token in zip(pairs, tokens)]`` with the encodes batched.

    ``pairs`` must be distinct objects. Every push is checked before any pair changes (``Pair.check``).
    """
    if len(pairs) != len(tokens):
        raise ValueError(f"{len(pairs)} pairs for {len(tokens)} tokens")
    bridge, size = None, 0
    for pair, token in zip(pairs, tokens):
        if pair.bridge is not bridge:
            bridge, size = pair.bridge, pair.bridge.maps[side].src.size
        if pair.held or not 0 <= token < size:  # only these rows can fail the check
            pair.check(side, token)
    out: list[Step | Steps] = [pair.start(side, token) for pair, token in zip(pairs, tokens)]  # Steps: not done
    gens: dict[int, Steps] = {}
    waiting: list[tuple[int, Encode]] = []
    for k, started in enumerate(out):
        if isinstance(started, Step):
            continue
        gens[k] = started
        try:
            waiting.append((k, next(started)))
        except StopIteration as stop:
            out[k] = stop.value
    while waiting:
        answers = encode_all([request for _, request in waiting])
        still = []
        for (k, _), ids in zip(waiting, answers):
            try:
                still.append((k, gens[k].send(ids)))
            except StopIteration as stop:
                out[k] = stop.value
        waiting = still
    return out  # type: ignore[return-value]


def encode_all(requests: Sequence[Encode]) -> list[Sequence[int]]:
    """Answer encode requests, grouped by tokenizer and kind: one batched call per group."""
    if len(requests) == 1:
        return [requests[0].run()]
    groups: dict[tuple[int, bool], list[int]] = {}
    for k, r in enumerate(requests):
        groups.setdefault((id(r.vocab), r.whole), []).append(k)
    out: list[Sequence[int]] = [()] * len(requests)
    for (_, whole), ks in groups.items():
        vocab = requests[ks[0]].vocab
        texts = [requests[k].text for k in ks]
        for k, ids in zip(ks, vocab.encode_many(texts) if whole else vocab.encode_windows(texts)):
            out[k] = ids
    return out

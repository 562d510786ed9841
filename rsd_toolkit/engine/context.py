"""A batch of sequences in one model's KV cache: ragged appends, per-row rollback, no re-prefill.

Cache *slots* never move when a row rolls back: the slot is masked (a "hole") and later tokens take
the row's next *position*, so rotary positions stay contiguous per row. A block of appends is padded
on the left (holes), which puts every row's newest token in the last column, so one column of logits
serves the whole batch. ``maybe_compact`` gathers the live slots when holes pile up; ``select`` drops rows.

Besides each row's next-token logits, the context keeps the logits that predicted its newest token, as long
as its forwards computed them: after a one-token rollback those are the row's next-token logits again, so a
caller can score a token that replaces the newest one without a forward (``logits_after_rollback``).

``extend`` is the only place a model runs: decoding, span scoring and (in ``rsd surprisal``) trace
scoring all call it. With ``static``, a block of one token per row (the common decode step) runs at fixed
shapes through ``static.StaticStep``, as a CUDA graph on CUDA; the general path below serves every other block.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..models import UnsupportedModel  # noqa: F401 - re-exported by rsd_toolkit.engine
from .kv import SlotCache
from .packed import PackedLinears
from .static import StaticStep, _cache_keyword


PREFILL_CHUNK = 1024  # columns per forward when a block is long (bounds the attention-mask size)
# Long appends run as their own sub-batch only when the padded block is large (a second forward re-reads
# every weight, which costs more than a few padded columns: on 2 CPU cores a [16, 1] teacher step took
# 149 ms and [16, 3] 211 ms) and the sub-batch computes < 60 % of the padded cells.
SPLIT_MIN_CELLS = 1024
SPLIT_BELOW = 0.6
# When at most this share of the rows append anything (a probe scoring a few rows' spans), only those rows
# run: a block over the whole batch would compute a column of holes for every idle row.
FEW_ROWS = 0.5


# transformers' SDPA repeats the key/value heads of a grouped-query model (Qwen2: 7 query heads per KV head) for
# every forward over 2+ positions with a mask on CPU, then runs SDPA on the copies; torch's own grouped-query
# SDPA (``enable_gqa``) gives the same numbers without the copy, 7-10x faster at batch 64 on 2 cores
# (a [64, 9, 2, 64] query over 300 cached positions: 58 vs 8 ms). transformers takes it when this is set.
FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@contextlib.contextmanager
def grouped_query_sdpa(device: torch.device):
    """For the length of one forward on CPU: SDPA on the grouped key/value heads. Not on CUDA, where a masked
    grouped-query SDPA falls back to the math kernel. The variable is restored after the forward (and on error)."""
    if device.type != "cpu" or os.environ.get(FORCE_GQA) == "1":
        yield
        return
    before = os.environ.get(FORCE_GQA)
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FORCE_GQA, None)
        else:
            os.environ[FORCE_GQA] = before


def static_default(model) -> bool:
    """The fixed-shape step pays off where kernel launches dominate: on CUDA, as graphs."""
    return model.get_input_embeddings().weight.device.type == "cuda"


class BatchedContext:
    """``static``: run one-token-per-row blocks at fixed shapes (CUDA graphs on CUDA): a ``StaticStep`` to
    share, or True for a new one. Off by default: the engine decides, once per model (``static_default``).
    ``packed``: a ``PackedLinears`` of this model (CPU): forwards over 2+ positions run inside it, at about one
    pass over the weights (``packed.py``). None by default: the engine makes one per model (``packed_default``)."""

    def __init__(self, model, batch_size: int, static: bool | StaticStep = False, packed: PackedLinears | None = None):
        self.model = model
        self.packed = packed
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        if static is True:
            static = StaticStep.for_model(model)
        self.static: StaticStep | None = static or None
        # preallocated: appends write in place (sized for the static step's buckets when it runs)
        self.cache = SlotCache.for_model(model.config, self.static.shapes if self.static else None)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.slots: list[list[int]] = [[] for _ in range(batch_size)]
        self.last_logits: torch.Tensor | None = None  # [B, V]: logits predicting each row's next token
        # per row: the logits [V] that predicted its newest token, when a forward computed them (references
        # into earlier logits tensors, not copies: they pin at most the last logits of a row's last few blocks)
        self._newest: list[torch.Tensor | None] = [None] * batch_size
        # rows rolled back since their last block, so their ``last_logits`` are stale: their next-token logits
        # when known (a one-token rollback: the logits that predicted the token it removed), else None
        self._stale: dict[int, torch.Tensor | None] = {}
        self.positions = {"real": 0, "computed": 0}  # tokens appended vs block cells computed (padding included)
        self._cache_kw = _cache_keyword(model)

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    def lengths(self) -> list[int]:
        return [len(s) for s in self.slots]

    # -- per-row edits ---------------------------------------------------------------------------
    @torch.inference_mode()
    def rollback(self, row: int, count: int) -> None:
        if count <= 0:
            return
        if count > len(self.slots[row]):
            raise ValueError(f"row {row}: cannot roll back {count} of {len(self.slots[row])} tokens")
        gone = self.slots[row][-count:]
        del self.slots[row][-count:]
        self.valid[row, gone] = False
        self._stale[row] = self._newest[row] if count == 1 and row not in self._stale else None
        self._newest[row] = None

    def logits_after_rollback(self, row: int, count: int) -> torch.Tensor | None:
        """The logits [V] predicting row ``row``'s next token once its last ``count`` tokens are rolled back,
        when this context has them without a forward (``count`` 0, or 1 while the logits that predicted the
        newest token are known); else None."""
        if count == 0:
            return self._stale[row] if row in self._stale else self.last_logits[row]
        if count == 1 and row not in self._stale:
            return self._newest[row]
        return None

    def checkpoint(self, rows: list[int]) -> dict:
        """What ``restore`` needs to undo later edits of ``rows`` (``last_logits`` is never written in place:
        a reference keeps it)."""
        return {"rows": {r: (list(self.slots[r]), self._newest[r], self._stale.get(r, _FRESH)) for r in rows},
                "last": self.last_logits}  # fmt: skip

    @torch.inference_mode()
    def restore(self, saved: dict, rows: list[int]) -> None:
        """Undo rollbacks and appends made to ``rows`` since ``checkpoint`` (slots are still in the cache)."""
        if not rows:
            return
        for r in rows:
            slots, self._newest[r], stale = saved["rows"][r]
            if stale is _FRESH:
                self._stale.pop(r, None)
            else:
                self._stale[r] = stale
            self.valid[r] = False
            self.valid[r, slots] = True
            self.slots[r] = slots
        index = torch.tensor(rows, device=saved["last"].device)  # a new tensor, as in extend
        self.last_logits = self.last_logits.index_copy(0, index, saved["last"][index])

    # -- the forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def extend(self, appends: list[list[int]], scores: bool = False) -> list[torch.Tensor | None] | None:
        """Append ``appends[b]`` to row b (rows with ``[]`` are untouched); updates ``last_logits``.

        With ``scores``, returns per row the logits [len(appends[b]), V] predicting each appended token
        (the first one's are the row's previous ``last_logits``). When a few rows append many
        tokens and the rest one (e.g. a long catch-up), those rows run as a second, smaller forward
        instead of padding the whole batch to their width; when only a few rows append at all, only they run.
        """
        if scores and self.last_logits is None:
            raise ValueError("scores need a context that already holds a token of every row (prefill first)")
        B = self.batch_size
        n = max((len(a) for a in appends), default=0)
        touched = [b for b, a in enumerate(appends) if a]
        if not scores and n == 1 and len(touched) == B and self.static and self.static.shapes.covers(B) and self.valid.shape[1]:
            self._static_step([a[0] for a in appends])
            return None
        if 0 < len(touched) <= B * FEW_ROWS:  # e.g. a probe of a few spans: the idle rows compute nothing
            out_few = self._extend_rows(touched, [appends[b] for b in touched], scores)
            if not scores:
                return None
            out = [None] * B
            for j, b in enumerate(touched):
                out[b] = out_few[j]
            return out
        long = [b for b, a in enumerate(appends) if len(a) > 1]
        if 0 < len(long) < B and B * n >= SPLIT_MIN_CELLS and B + len(long) * n <= SPLIT_BELOW * B * n:
            short = [a if len(a) <= 1 else [] for a in appends]
            out = self._extend_rows(None, short, scores)
            out_long = self._extend_rows(long, [appends[b] for b in long], scores)
            if not scores:
                return None
            for j, b in enumerate(long):
                out[b] = out_long[j]
            return out
        return self._extend_rows(None, appends, scores)

    def _static_step(self, ids: list[int]) -> None:
        """Every row appends one token, at fixed shapes (``static.StaticStep``)."""
        B, past = self.valid.shape
        positions = torch.tensor([len(s) for s in self.slots], device=self.device)
        self._note_newest(self.last_logits, list(range(B)), [1] * B, {})
        self.last_logits = self.static.step(self.cache, torch.tensor(ids, device=self.device), positions, self.valid)
        self.valid = torch.cat([self.valid, torch.ones(B, 1, dtype=torch.bool, device=self.device)], dim=1)
        for slots in self.slots:
            slots.append(past)
        self.positions["real"] += B
        self.positions["computed"] += self.static.shapes.rows(B)  # padded rows are computed too

    def _note_newest(self, prev: torch.Tensor | None, rows: list[int], counts: list[int], computed: dict) -> None:
        """Before ``last_logits`` moves on: ``rows`` appended ``counts`` tokens. The logits that predicted a
        row's new newest token are its next-token logits before the block when it appended one token, else
        ``computed[row]`` [V] when the block kept them; unknown otherwise."""
        for r, k in zip(rows, counts):
            if k == 1:
                self._newest[r] = self._stale[r] if r in self._stale else None if prev is None else prev[r]
            else:
                self._newest[r] = computed.get(r)
            self._stale.pop(r, None)

    def _extend_rows(self, rows: list[int] | None, appends: list[list[int]], scores: bool):
        """One padded block for ``rows`` (``None``: every row); other rows get a column of holes."""
        n = max((len(a) for a in appends), default=0)
        if n == 0:
            return [None] * len(appends) if scores else None
        rows_list = list(range(self.batch_size)) if rows is None else rows
        R = len(rows_list)
        prev = self.last_logits  # [B, V]: predicts each row's first appended token (read before it changes)
        ids = torch.zeros(R, n, dtype=torch.long)
        real = torch.zeros(R, n, dtype=torch.bool)
        pos = torch.zeros(R, n, dtype=torch.long)
        for j, (row, a) in enumerate(zip(rows_list, appends)):
            if a:
                ids[j, n - len(a) :] = torch.tensor(a)
                real[j, n - len(a) :] = True
                pos[j, n - len(a) :] = torch.arange(len(self.slots[row]), len(self.slots[row]) + len(a))
        self.positions["real"] += sum(len(a) for a in appends)
        self.positions["computed"] += R * n
        ids, real, pos = ids.to(self.device), real.to(self.device), pos.to(self.device)
        index = None if rows is None else torch.tensor(rows, device=self.device)
        cache = self.cache if index is None else self._gather(index)
        valid = self.valid if index is None else self.valid[index]
        outputs = []
        for c0 in range(0, n, PREFILL_CHUNK):
            c1 = min(n, c0 + PREFILL_CHUNK)
            keep = (c1 - c0) if scores else 1
            logits, valid = self._forward(cache, valid, ids[:, c0:c1], real[:, c0:c1], pos[:, c0:c1], keep)
            if scores or c1 == n:
                outputs.append(logits)
        start = self.valid.shape[1]
        if index is None:
            self.valid = valid
        else:
            self._scatter(index, cache, n)
            new = torch.zeros(self.batch_size, n, dtype=torch.bool, device=self.device)
            new[index] = real
            self.valid = torch.cat([self.valid, new], dim=1)
        touched = [j for j, a in enumerate(appends) if a]
        for j in touched:
            a = appends[j]
            self.slots[rows_list[j]].extend(range(start + n - len(a), start + n))
        # the logits that predicted each row's new newest token: known for one appended token (its first-token
        # logits), and for several when every column's logits were kept (the one before the block's last)
        before_last = {j: outputs[-1][j, -2].clone() for j in touched if len(appends[j]) > 1 and scores and outputs[-1].shape[1] > 1}
        self._note_newest(prev, [rows_list[j] for j in touched], [len(appends[j]) for j in touched],
                          {rows_list[j]: v for j, v in before_last.items()})  # fmt: skip
        last = outputs[-1][:, -1]
        if self.last_logits is None or (rows is None and len(touched) == len(appends)):
            self.last_logits = last  # every row advanced: no [batch, vocab] copy
        elif touched:  # a new tensor: callers may still hold the previous logits (never written in place)
            dst = torch.tensor([rows_list[j] for j in touched], device=self.last_logits.device)
            src = last[torch.tensor(touched, device=last.device)].to(self.last_logits.dtype)
            self.last_logits = self.last_logits.index_copy(0, dst, src)
        if not scores:
            return None
        # [R, n+1, V]: column c + 1 holds the logits after block column c; column n - len(a) of a row holds its
        # previous last logits, which predict its first appended token (one copy for all rows, no per-row cat)
        block = torch.cat([outputs[0].new_empty(R, 1, outputs[0].shape[-1]), *outputs], dim=1)
        first = torch.tensor([n - len(appends[j]) for j in touched], device=block.device)
        block[torch.tensor(touched, device=block.device), first] = prev[torch.tensor([rows_list[j] for j in touched], device=prev.device)].to(block.device, block.dtype)
        return [block[j, n - len(a) : n] if a else None for j, a in enumerate(appends)]

    def _forward(self, cache, valid, ids, real, pos, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = ids.shape[1]
        past = valid.shape[1]
        key_valid = torch.cat([valid, real], dim=1)  # [R, past + n]
        q_slot = torch.arange(past, past + n, device=self.device)
        k_slot = torch.arange(past + n, device=self.device)
        allowed = key_valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])
        allowed |= k_slot[None, None, :] == q_slot[None, :, None]  # a hole attends to itself: never all-masked
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        packed = self.packed if self.packed is not None and ids.numel() >= self.packed.min_rows else contextlib.nullcontext()
        with packed, grouped_query_sdpa(self.device):
            out = self.model(
                input_ids=ids,
                attention_mask=mask[:, None],
                position_ids=pos,
                use_cache=True,
                logits_to_keep=keep,
                **{self._cache_kw: cache},
            )
        return out.logits, key_valid

    def _gather(self, index: torch.Tensor) -> SlotCache:
        """A cache holding copies of some rows (for a sub-batch forward)."""
        return self.cache.rows(index)

    def _scatter(self, index: torch.Tensor, sub: SlotCache, n: int) -> None:
        """Write a sub-batch's rows back; every other row gets ``n`` hole columns."""
        self.cache.put_rows(index, sub, n)

    # -- housekeeping -----------------------------------------------------------------------------
    def maybe_compact(self, slack: int = 64, ahead: int = 0) -> None:
        """Compact when the cache, with the ``ahead`` columns the next block appends, would be over 1.25x the
        longest row + ``slack`` slots (never between checkpoint and restore). Speculation passes ``slack=0``
        and its round's width: rejected drafts leave holes every round, and the cache stays within 1.25x."""
        longest = max(self.lengths(), default=0)
        width = self.valid.shape[1]
        if width > longest and width + ahead > 1.25 * longest + slack:
            self.compact()

    @torch.inference_mode()
    def compact(self) -> None:
        """Gather each row's live slots to the right end; drops every hole."""
        longest = max(self.lengths(), default=0)
        B = self.batch_size
        index = torch.zeros(B, longest, dtype=torch.long)
        valid = torch.zeros(B, longest, dtype=torch.bool)
        for b, slots in enumerate(self.slots):
            if slots:
                index[b, longest - len(slots) :] = torch.tensor(slots)
                valid[b, longest - len(slots) :] = True
            self.slots[b] = list(range(longest - len(slots), longest))
        self.cache.gather_columns(index)
        self.valid = valid.to(self.device)

    @torch.inference_mode()
    def select(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order): finished sequences leave the batch."""
        index = torch.tensor(rows, dtype=torch.long)
        self.cache.select_rows(index)
        self.valid = self.valid[index.to(self.device)]
        self.slots = [self.slots[r] for r in rows]
        self._newest = [self._newest[r] for r in rows]
        self._stale = {b: self._stale[r] for b, r in enumerate(rows) if r in self._stale}
        if self.last_logits is not None:
            self.last_logits = self.last_logits[index.to(self.last_logits.device)]

    @torch.inference_mode()
    def merge(self, other: "BatchedContext") -> None:
        """Append ``other``'s rows (same model) after ours: how new prompts join a running batch."""
        a, b = self.valid.shape[1], other.valid.shape[1]
        width, own_rows = max(a, b), self.batch_size
        self.cache.concat_rows(other.cache, width)
        pad = lambda v, w: torch.cat([torch.zeros(v.shape[0], w - v.shape[1], dtype=v.dtype, device=v.device), v], 1)  # noqa: E731
        self.valid = torch.cat([pad(self.valid, width), pad(other.valid.to(self.device), width)], dim=0)
        self.slots = [[s + width - a for s in row] for row in self.slots] + [
            [s + width - b for s in row] for row in other.slots
        ]
        self.last_logits = torch.cat([self.last_logits, other.last_logits.to(self.last_logits.device)], dim=0)
        self._newest += other._newest
        self._stale.update({own_rows + r: v for r, v in other._stale.items()})


_FRESH = object()  # checkpoint: the row's last_logits were current (it was not in ``_stale``)

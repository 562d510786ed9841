"""Batched Reverse Speculative Decoding.

Per sequence and step (arXiv 2509.22230, §3): the teacher samples a candidate; the student accepts it
if its probability p_s ≥ pth, otherwise the student samples its own token. Across tokenizers the
candidate is the span of student tokens its text becomes, accepted only if every token of the span
passes; a student token is carried back into the teacher's context as text.

Each step is one teacher forward and one student forward over the whole batch (``BatchedContext``
applies every row's pending tokens at once); spans longer than one token are scored in one more
batched student forward. Modes ``teacher`` and ``student`` run the same loop with the decision fixed.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

import torch

from ..bridges import Update, make_bridge
from ..bridges.pair import TextPair, make_pair
from ..config import RSDConfig
from ..models import LM
from . import sampling
from .context import BatchedContext

log = logging.getLogger("rsd_toolkit.engine")
TEACHER, STUDENT = "teacher", "student"


@dataclass
class TokenRecord:
    id: int
    source: str  # "teacher" (accepted proposal) or "student" (fallback / student-only)
    p_s: float | None  # the student's acceptance probability of this token (None without a student model)
    p_t: float | None = None  # the teacher's probability (temperature 1) of the token it proposed, when 1:1


@dataclass
class Trace:
    index: int
    text: str  # generated text, without the final stop token
    ids: list[int]  # student token ids, including the stop token when the trace ended with one
    records: list[TokenRecord]
    finish_reason: str  # "eos", "length" or "stop"
    accepted: int  # teacher proposals the student accepted
    decisions: int  # steps where the teacher proposed (rsd mode)
    pth: float
    student_prompt: str = ""
    teacher_prompt: str = ""

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.decisions if self.decisions else None

    @property
    def sub_pth(self) -> int:
        """Tokens whose student probability is below pth."""
        return sum(1 for r in self.records if r.p_s is not None and r.p_s < self.pth)

    def to_dict(self, token_stats: bool = False) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "records"}
        d.update(acceptance_rate=self.acceptance_rate, sub_pth=self.sub_pth, n_tokens=len(self.ids))
        if token_stats:
            d["records"] = [asdict(r) for r in self.records]
        return d


@dataclass(eq=False)
class _Decision:
    """A decided step for one row: the pair state after it, the updates, who chose the token."""

    pair: object
    step: object
    source: str
    teacher_token: int | None = None
    span_probs: list[float] | None = None  # set when the span was scored (and cached) by a probe


@dataclass(eq=False)
class _Row:
    """One sequence being generated."""

    index: int
    rng: torch.Generator
    pair: object
    ids: dict[str, list[int]]  # side -> prompt + generated ids (what that model's context holds)
    prompt_len: dict[str, int]
    prompts: dict[str, str]
    pending: dict[str, Update | None] = field(default_factory=lambda: {TEACHER: None, STUDENT: None})
    records: list[TokenRecord] = field(default_factory=list)
    accepted: int = 0
    decisions: int = 0
    finish: str | None = None

    def generated(self) -> list[int]:
        return self.ids[STUDENT][self.prompt_len[STUDENT] :]


class RSDEngine:
    """``RSDEngine(teacher, student, config).generate(prompts) -> list[Trace]``.

    ``teacher`` may be ``None`` in mode ``student``; ``student`` may be ``None`` in mode ``teacher``
    (then traces are in the teacher's tokens and carry no p_s). ``bridge_kind`` forces the pairing
    (``identical`` / ``remappable`` / ``bridged``); by default the tokenizers decide.
    """

    def __init__(
        self,
        teacher: LM | None,
        student: LM | None,
        config: RSDConfig | None = None,
        bridge_kind: str | None = None,
        overrides: dict | None = None,
    ):
        self.config = config = config or RSDConfig()
        if config.mode == "rsd" and (teacher is None or student is None):
            raise ValueError("mode 'rsd' needs both a teacher and a student model")
        if teacher is None and student is None:
            raise ValueError("need at least one model")
        self.run_teacher = config.mode != "student" and teacher is not None
        self.run_student = student is not None and (config.mode != "teacher" or teacher is not None)
        if config.mode == "student" and student is None:
            raise ValueError("mode 'student' needs a student model")
        self.teacher = teacher if teacher is not None else student
        self.student = student if student is not None else teacher
        # The teacher's stop tokens become the student's and back, whatever the special-token maps say.
        t2s = {i: self.student.primary_stop for i in self.teacher.stop_ids}
        s2t = {i: self.teacher.primary_stop for i in self.student.stop_ids}
        self.bridge = make_bridge(self.teacher.vocab, self.student.vocab, bridge_kind, {**t2s, **(overrides or {})})
        self.reverse = make_bridge(self.student.vocab, self.teacher.vocab, self.bridge.kind, s2t)
        self.kind = self.bridge.kind
        if self.run_teacher and self.run_student:
            t_dev = self.teacher.model.get_input_embeddings().weight.device
            s_dev = self.student.model.get_input_embeddings().weight.device
            if t_dev != s_dev:
                log.info("teacher on %s, student on %s: logits are moved to the student's device", t_dev, s_dev)
        self.uniforms = sampling.uniforms_per_step(config)
        self.batch_cap: int | None = None  # set when the GPU ran out of memory
        self.stats: Counter = Counter()  # engine events of the last generate(): probed spans, mid-character proposals…

    # -- public ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list, seeds: list[int] | None = None, batch_size: int = 16, progress=None) -> list[Trace]:
        """One trace per prompt. ``seeds[i]`` (default ``i``) fixes prompt i's randomness together with
        ``config.seed``: a trace does not depend on batch size or on the other prompts."""
        if seeds is None:
            seeds = list(range(len(prompts)))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        self.stats = Counter()
        batch_size = min(batch_size, self.batch_cap or batch_size)
        results: list[Trace | None] = [None] * len(prompts)
        todo = deque(range(len(prompts)))
        while todo:
            out_of_memory = False
            try:
                self._run(prompts, seeds, todo, results, batch_size, progress)
            except torch.cuda.OutOfMemoryError:
                out_of_memory = True
                if batch_size == 1:
                    raise
                batch_size //= 2
                self.batch_cap = batch_size  # later calls start at the size that fitted
                log.warning("out of GPU memory: batch size halved to %d, unfinished prompts restart", batch_size)
                todo = deque(i for i in range(len(prompts)) if results[i] is None)
            if out_of_memory and torch.cuda.is_available():
                torch.cuda.empty_cache()  # outside the except block: its traceback no longer pins the cache
        return results  # type: ignore[return-value]

    # -- the loop -------------------------------------------------------------------------------
    def _run(self, prompts, seeds, todo: deque, results, batch_size: int, progress) -> None:
        rows: list[_Row] = []
        ctx: dict[str, BatchedContext | None] = {TEACHER: None, STUDENT: None}
        while todo or rows:
            if todo and len(rows) <= batch_size * 3 // 4:
                new = [self._new_row(i, prompts[i], seeds[i]) for i in _take(todo, batch_size - len(rows))]
                self._join(ctx, rows, new)
            self._step(rows, ctx)
            done = [b for b, r in enumerate(rows) if r.finish]
            if done:
                if self.run_student and any(r.pending[STUDENT] for r in rows):
                    self._apply(ctx[STUDENT], rows, STUDENT)  # score the last tokens before rows leave
                for b in done:
                    results[rows[b].index] = self._trace(rows[b])
                keep = [b for b, r in enumerate(rows) if not r.finish]
                self._count_positions(ctx)
                for c in ctx.values():
                    if c is not None:
                        c.select(keep)
                rows_done, rows = rows, [rows[b] for b in keep]
                if progress is not None:
                    for b in done:
                        progress(results[rows_done[b].index])

    def _count_positions(self, ctx: dict) -> None:
        """Accumulate decode-time forward cells per side (prompt prefill is counted separately)."""
        for side, c in ctx.items():
            if c is not None:
                for k, v in c.positions.items():
                    self.stats[f"{side}_{k}_positions"] += v
                    c.positions[k] = 0

    def _new_row(self, index: int, prompt, seed: int) -> _Row:
        rng = torch.Generator().manual_seed((self.config.seed * 0x9E3779B1 + int(seed) * 0x85EBCA77) % (2**63))
        t_text, t_ids = self.teacher.prompt(prompt, self.config)
        s_text, s_ids = self.student.prompt(prompt, self.config)
        return _Row(
            index=index,
            rng=rng,
            pair=make_pair(self.bridge, self.reverse),
            ids={TEACHER: t_ids, STUDENT: s_ids},
            prompt_len={TEACHER: len(t_ids), STUDENT: len(s_ids)},
            prompts={TEACHER: t_text, STUDENT: s_text},
        )

    def _join(self, ctx: dict, rows: list[_Row], new: list[_Row]) -> None:
        """Prefill new rows' prompts and add them to the running batch."""
        for side, lm, active in ((TEACHER, self.teacher, self.run_teacher), (STUDENT, self.student, self.run_student)):
            if not active:
                continue
            fresh = BatchedContext(lm.model, len(new))
            fresh.extend([r.ids[side] for r in new])
            self.stats[f"{side}_prompt_positions"] += fresh.positions["computed"]
            fresh.positions = {"real": 0, "computed": 0}
            if ctx[side] is None or not rows:
                ctx[side] = fresh
            else:
                ctx[side].merge(fresh)
        rows.extend(new)

    def _step(self, rows: list[_Row], ctx: dict) -> None:
        cfg = self.config
        for c in ctx.values():
            if c is not None:
                c.maybe_compact()
        if self.run_teacher:
            self._apply(ctx[TEACHER], rows, TEACHER)
        if self.run_student:
            self._apply(ctx[STUDENT], rows, STUDENT)
        u = torch.stack([torch.rand(self.uniforms, generator=r.rng) for r in rows])
        split = sampling.UNIFORMS_PER_DRAW * cfg.teacher_draws
        s_logits = self._logits(ctx[STUDENT], self.student) if self.run_student else None
        t_logits = self._logits(ctx[TEACHER], self.teacher) if self.run_teacher else None
        acc = sampling.TokenProbs.acceptance(s_logits, cfg) if s_logits is not None else None

        decided: dict[int, _Decision] = {}
        if cfg.mode == "student":
            probs = sampling.tempered_probs(s_logits, cfg.temperature)
            picks = sampling.sample(probs, u[:, split:].to(s_logits.device), cfg.top_p).tolist()
            for b, s in enumerate(picks):
                decided[b] = _Decision(rows[b].pair, rows[b].pair.push_student(s), STUDENT)
        else:
            cands = sampling.propose(t_logits, u[:, :split].to(t_logits.device), cfg).cpu()
            if cfg.mode == "teacher":
                for b, row in enumerate(rows):
                    c = int(cands[b, 0])
                    decided[b] = _Decision(row.pair, row.pair.push_teacher(c), TEACHER, teacher_token=c)
            else:
                decided = self._decide(rows, ctx[STUDENT], cands, s_logits, acc)
                rejected = [b for b in range(len(rows)) if b not in decided]
                if rejected:
                    idx = torch.tensor(rejected, device=s_logits.device)
                    picks = sampling.fallback(s_logits[idx], u[rejected, split:].to(s_logits.device), cfg).tolist()
                    for b, s in zip(rejected, picks):
                        decided[b] = _Decision(rows[b].pair, rows[b].pair.push_student(s), STUDENT)
        self._commit(rows, decided, acc, t_logits)

    def _decide(self, rows, s_ctx: BatchedContext, cands, s_logits, acc) -> dict[int, "_Decision"]:
        """RSD acceptance, draw by draw: rows still undecided try their next teacher candidate."""
        cfg = self.config
        undecided = [b for b, r in enumerate(rows) if r.pair.holder != STUDENT]  # mid-character: student goes on
        for b in undecided:
            rows[b].decisions += 1
        decided: dict[int, _Decision] = {}
        for j in range(cfg.teacher_draws):
            trials, single, spans = {}, [], []
            for b in undecided:
                trial = rows[b].pair.copy()
                c = int(cands[b, j])
                step = trial.push_teacher(c)
                if trial.holder == TEACHER:
                    self.stats["proposal_mid_character"] += 1
                    continue  # ends inside a character the student cannot judge yet: not proposable
                trials[b] = _Decision(trial, step, TEACHER, teacher_token=c)
                su = step.student
                (single if su.rollback == 0 and len(su.append) == 1 else spans).append(b)
            if single:
                rows_t = torch.tensor(single, device=s_logits.device)
                tok = torch.tensor([trials[b].step.student.append[0] for b in single], device=s_logits.device)
                passed = acc.at(rows_t, tok) >= cfg.pth
                if cfg.student_topk_gate:
                    passed &= sampling.in_topk(s_logits[rows_t], tok, cfg.k)
                decided.update({b: trials[b] for b, flag in zip(single, passed.tolist()) if flag})
            if spans:
                for b, probs in self._probe(rows, s_ctx, {b: trials[b].step.student for b in spans}).items():
                    trials[b].span_probs = probs
                    decided[b] = trials[b]
            undecided = [b for b in undecided if b not in decided]
            if not undecided:
                break
        for b in decided:
            rows[b].accepted += 1
        return decided

    def _commit(self, rows: list[_Row], decided: dict[int, "_Decision"], acc, t_logits) -> None:
        """Apply decided steps to id lists and records; the models see them at the next forward."""
        first = [(b, d.step.student.append[0]) for b, d in decided.items()
                 if d.span_probs is None and d.step.student.rollback == 0 and d.step.student.append]  # fmt: skip
        p_first = {}
        if first and acc is not None:
            idx = torch.tensor([b for b, _ in first], device=acc.logits.device)
            tok = torch.tensor([t for _, t in first], device=acc.logits.device)
            p_first = dict(zip((b for b, _ in first), acc.at(idx, tok).tolist()))
        p_t = {}
        if t_logits is not None and not isinstance(rows[0].pair, TextPair):
            proposed = [(b, d.teacher_token) for b, d in decided.items() if d.teacher_token is not None]
            if proposed:
                idx = torch.tensor([b for b, _ in proposed], device=t_logits.device)
                tok = torch.tensor([t for _, t in proposed], device=t_logits.device)
                p_t = dict(zip((b for b, _ in proposed), sampling.TokenProbs(t_logits).at(idx, tok).tolist()))
        for b, d in decided.items():
            row, su, tu = rows[b], d.step.student, d.step.teacher
            row.pair = d.pair
            row.ids[STUDENT] = su.apply(row.ids[STUDENT])
            if su.rollback:
                del row.records[len(row.records) - su.rollback :]
            probs = d.span_probs or [p_first.get(b) if k == 0 else None for k in range(len(su.append))]
            for tid, p in zip(su.append, probs):
                row.records.append(TokenRecord(tid, d.source, p))
            if len(su.append) == 1 and b in p_t:
                row.records[-1].p_t = p_t[b]
            if d.span_probs is None and self.run_student:  # probed spans are already in the student's cache
                row.pending[STUDENT] = su if row.pending[STUDENT] is None else row.pending[STUDENT].then(su)
            row.ids[TEACHER] = tu.apply(row.ids[TEACHER])
            if self.run_teacher:  # a side with no model keeps no pending work
                row.pending[TEACHER] = tu if row.pending[TEACHER] is None else row.pending[TEACHER].then(tu)
            self._check_finished(row, d)

    def _check_finished(self, row: _Row, d: "_Decision") -> None:
        if any(i in self.student.stop_ids for i in d.step.student.append) or (
            d.source == TEACHER and d.teacher_token in self.teacher.stop_ids
        ):
            row.finish = "eos"
        elif len(row.generated()) >= self.config.max_new_tokens:
            row.finish = "length"
        elif self.config.stop_strings:
            tail = self.student.vocab.text_of(row.generated()[-32:])
            if any(s in tail for s in self.config.stop_strings):
                row.finish = "stop"

    # -- model calls ------------------------------------------------------------------------------
    def _logits(self, c: BatchedContext, lm: LM) -> torch.Tensor:
        """Last logits cut (or padded) to the tokenizer's size: padded embedding rows are never sampled."""
        return fit_vocab(c.last_logits, lm.vocab.size).to(self._decision_device)

    @property
    def _decision_device(self):
        lm = self.student if self.run_student else self.teacher
        return lm.model.get_input_embeddings().weight.device

    def _apply(self, c: BatchedContext, rows: list[_Row], side: str) -> None:
        """Bring one model's context up to date with every row's pending update (one forward)."""
        updates = {b: r.pending[side] for b, r in enumerate(rows) if r.pending[side] is not None}
        for r in rows:
            r.pending[side] = None
        if not updates:
            return
        scored = self._extend(c, rows, side, updates, score=side == STUDENT)
        if side == STUDENT:
            for b, (probs, _) in scored.items():
                recs = rows[b].records[len(rows[b].records) - len(probs) :] if probs else []
                for rec, p in zip(recs, probs):
                    if rec.p_s is None:
                        rec.p_s = p

    def _extend(self, c: BatchedContext, rows, side: str, updates: dict, score: bool) -> dict[int, tuple[list, list]]:
        """Roll back and append per row; with ``score``, the acceptance probability of every appended token.

        A row that rolls back re-feeds the token before its new ones, so that every new token's
        predicting logits come out of this same forward.
        """
        appends = [[] for _ in rows]
        refed = set()
        for b, upd in updates.items():
            ids = rows[b].ids[side]
            if not upd.rollback and not upd.append:
                continue
            if upd.rollback:
                c.rollback(b, upd.rollback + 1)
                appends[b] = ids[len(ids) - len(upd.append) - 1 :]
                refed.add(b)
            else:
                appends[b] = list(upd.append)
        need = score and any(appends)
        prev = c.last_logits
        outs = c.extend(appends, scores=need)
        if not need:
            return {}
        lm = self.student if side == STUDENT else self.teacher
        result = {}
        for b, upd in updates.items():
            if not upd.append:
                result[b] = ([], [])
                continue
            preds = outs[b] if b in refed else torch.cat([prev[b : b + 1], outs[b]], dim=0)
            preds = fit_vocab(preds, lm.vocab.size).to(self._decision_device)
            tok = torch.tensor(upd.append, device=preds.device)
            p = sampling.TokenProbs.acceptance(preds, self.config).at(torch.arange(len(tok), device=preds.device), tok)
            gates = sampling.in_topk(preds, tok, self.config.k).tolist() if self.config.student_topk_gate else [True] * len(tok)
            result[b] = (p.tolist(), gates)
        return result

    def _probe(self, rows, c: BatchedContext, spans: dict[int, Update]) -> dict[int, list[float]]:
        """Score candidate spans in one batched student forward; keep the KV of the accepted ones.

        Returns the acceptance probability of each span token for the rows whose spans pass.
        """
        saved = c.checkpoint(list(spans))
        last = c.last_logits.clone()
        old_ids = {b: rows[b].ids[STUDENT] for b in spans}
        for b, su in spans.items():
            rows[b].ids[STUDENT] = su.apply(old_ids[b])
        scored = self._extend(c, rows, STUDENT, spans, score=True)
        ok, undo = {}, {}
        self.stats["probed"] += len(spans)
        for b in spans:
            probs, gates = scored[b]
            if all(p >= self.config.pth for p in probs) and all(gates):
                ok[b] = probs
            else:
                undo[b] = saved[b]
            rows[b].ids[STUDENT] = old_ids[b]
        if undo:
            c.restore(undo, last)
        self.stats["probe_accepted"] += len(ok)
        return ok

    def _trace(self, row: _Row) -> Trace:
        ids = row.generated()
        body = ids[:-1] if row.finish == "eos" and ids and ids[-1] in self.student.stop_ids else ids
        return Trace(
            index=row.index,
            text=self.student.vocab.text_of(body),
            ids=list(ids),
            records=row.records,
            finish_reason=row.finish or "length",
            accepted=row.accepted,
            decisions=row.decisions,
            pth=self.config.pth,
            student_prompt=row.prompts[STUDENT],
            teacher_prompt=row.prompts[TEACHER] if self.run_teacher else "",
        )


def fit_vocab(logits: torch.Tensor, size: int) -> torch.Tensor:
    """Logits cut (or padded with -inf) to the tokenizer's size: padded embedding rows are never sampled."""
    if logits.shape[-1] > size:
        return logits[..., :size]
    if logits.shape[-1] < size:
        pad = logits.new_full((*logits.shape[:-1], size - logits.shape[-1]), torch.finfo(logits.dtype).min)
        return torch.cat([logits, pad], dim=-1)
    return logits


def _take(q: deque, n: int) -> list:
    return [q.popleft() for _ in range(min(n, len(q)))]

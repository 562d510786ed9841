"""Batched Reverse Speculative Decoding.

Per sequence and step (arXiv 2509.22230, §3): the teacher samples a candidate; the student accepts it
if its probability p_s ≥ pth, otherwise the student samples its own token. Across tokenizers the
candidate is the span of student tokens its text becomes, accepted only if every token of the span
passes (``sampling.accepts``, the one place the rule is written); a student token is carried back into
the teacher's context as text.

Each step is one teacher forward and one student forward over the whole batch (``BatchedContext``
applies every row's pending tokens at once); spans longer than one token are scored in one more
batched student forward (a *probe*) whose cache entries are kept for the spans that enter the trace. No
probe is needed where the logits predicting a span's first token are at hand: the current ones for a span
appended to the context, and, for a span that replaces the newest token (a merge: "▁th" + "e" -> "▁the"),
those that predicted the replaced token, which the context keeps (``BatchedContext.logits_after_rollback``).
There a one-token span is scored without a forward and a longer one whose first token fails is rejected.
Modes ``teacher`` and ``student`` run the same loop with the decision fixed.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
import torch

from ..bridges import NO_TOKEN, STUDENT, TEACHER, Step, Update, make_bridge, push_all
from ..config import RSDConfig
from ..models import LM
from . import packed, sampling, speculative, strict
from .context import BatchedContext, static_default
from .packed import PackedLinears
from .static import StaticStep
from .sampling import fit_vocab
from .trace import Candidate, Generation, Row, TokenRecord, Trace

log = logging.getLogger("rsd_toolkit.engine")

# From this many rows on, a catch-up of several tokens runs one token per step (the row sits out the steps in
# between) instead of widening the block for every row. Measured on 2 CPU cores (SmolLM2-135M teacher): a
# [16, 1] block 73 ms, [16, 2] 95 ms, [16, 3] 113 ms, so at batch 16 padding costs a third of a step where a
# row sitting out costs 1/16 of one; at batch 4 ([4, 2] 59 ms) padding is the cheaper. On CUDA it also keeps
# the step at one token per row, the shape the captured graph replays.
DEFER_FROM_ROWS = 8
# Free slots are refilled once the batch has run this many steps' worth of empty rows since the last join (a
# ski-rental rule): a join costs a prefill forward per model, about a decode step, and an empty slot wastes 1/B
# of every step. One free slot waits B steps, a quarter of the batch 4. The rule it replaces (join when a quarter
# is free) left 3 of 16 slots empty for 150+ steps when traces run to the same budget.
JOIN_AFTER_STEPS = 1


class RSDEngine:
    """``RSDEngine(teacher, student, config).generate(prompts) -> Generation`` (the traces and the call's stats).

    ``teacher`` may be ``None`` in mode ``student``; ``student`` may be ``None`` in mode ``teacher``
    (then traces are in the teacher's tokens and carry no p_s). ``bridge_kind`` forces the pairing
    (``identical`` / ``remappable`` / ``bridged``); by default the tokenizers decide. ``static_step``: run
    the one-token-per-row decode step at fixed shapes, as CUDA graphs (default: on CUDA; see ``static.py``).
    ``packed_gemm``: run the models' linear layers on prepacked oneDNN weights, so a forward over a few positions
    costs about one weight pass (default: on CPU where the packed copy fits in memory; see ``packed.py``); or
    ``{"teacher": PackedLinears | None, "student": …}`` to reuse packs across engines over the same models.
    """

    def __init__(
        self,
        teacher: LM | None,
        student: LM | None,
        config: RSDConfig | None = None,
        bridge_kind: str | None = None,
        overrides: dict | None = None,
        static_step: bool | None = None,
        packed_gemm: bool | None | dict[str, PackedLinears | None] = None,
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
        self.bridge = make_bridge(self.teacher.vocab, self.student.vocab, bridge_kind, {**t2s, **(overrides or {})}, s2t)
        self.kind = self.bridge.kind
        if self.run_teacher and self.run_student:
            t_dev = self.teacher.model.get_input_embeddings().weight.device
            s_dev = self.student.model.get_input_embeddings().weight.device
            if t_dev != s_dev:
                log.info("teacher on %s, student on %s: logits are moved to the student's device", t_dev, s_dev)
        self.draft_map = self._draft_map() if config.draft_tokens and config.mode != "student" else None
        self.speculative = self.draft_map is not None
        if config.draft_tokens and not self.speculative:
            log.warning("draft_tokens=%d needs a teacher, a student and a same-tokenizer pair (%s here): decoding "
                        "step by step", config.draft_tokens, self.kind if self.run_teacher and self.run_student else config.mode)  # fmt: skip
        self.uniforms = speculative.uniforms_per_round(config.draft_tokens) if self.speculative else sampling.uniforms_per_step(config)
        # one fixed-shape step per model, kept across batches and calls: its CUDA graphs are reused
        self.static: dict[str, StaticStep | None] = {}
        for side, lm in ((TEACHER, self.teacher), (STUDENT, self.student)):
            on = static_default(lm.model) if static_step is None else static_step
            self.static[side] = StaticStep.for_model(lm.model) if on else None
        # one packed copy of each CPU model's linear weights, kept across calls (the student once when shared)
        self.packed: dict[str, PackedLinears | None] = dict(packed_gemm) if isinstance(packed_gemm, dict) else {}
        for side, lm in ((TEACHER, self.teacher), (STUDENT, self.student)) if not isinstance(packed_gemm, dict) else ():
            same = side == STUDENT and lm.model is self.teacher.model
            on = packed.default(lm.model) if packed_gemm is None else packed_gemm and packed.available(lm.model)
            self.packed[side] = self.packed[TEACHER] if same else PackedLinears(lm.model) if on else None

    # -- public ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list, seeds: list[int] | None = None, batch_size: int = 16, progress=None,
                 keep: bool = True) -> Generation:  # fmt: skip
        """One trace per prompt, with the call's stats (``Generation``). ``seeds[i]`` (default ``i``) fixes
        prompt i's randomness together with ``config.seed``: a trace does not depend on batch size or on the
        other prompts. Out of GPU memory, the batch size halves and the unfinished prompts restart.

        ``progress(trace)`` is called as each trace finishes. ``keep=False`` hands each trace to it alone (the
        Generation holds None in its place), so a call over many prompts holds only the rows still decoding:
        one call keeps the batch full to the end, where calls over slices each drain it."""
        if seeds is None:
            seeds = list(range(len(prompts)))
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if not keep and progress is None:
            raise ValueError("keep=False needs a progress callback to receive the traces")
        for st in self.static.values():
            if st is not None:
                st.counts.clear()
        self.events = stats = Counter()  # this call's events; handed back in the Generation, not kept
        results: list[Trace | None] = [None] * len(prompts)
        todo = deque(range(len(prompts)))
        try:
            while todo:
                out_of_memory = False
                try:
                    self._run(prompts, seeds, todo, results, batch_size, progress, keep)
                except torch.cuda.OutOfMemoryError:
                    out_of_memory = True
                    if batch_size == 1:
                        raise
                    batch_size //= 2
                    log.warning("out of GPU memory: batch size halved to %d, unfinished prompts restart", batch_size)
                    todo = deque(i for i in range(len(prompts)) if results[i] is None)
                if out_of_memory and torch.cuda.is_available():
                    torch.cuda.empty_cache()  # outside the except block: its traceback no longer pins the cache
        finally:
            del self.events
        for side, st in self.static.items():
            for k, v in (st.counts if st is not None else {}).items():
                stats[f"{side}_static_{k}"] += v  # replayed / captured / eager / failed steps
        return Generation([None if t is _HANDED_OVER else t for t in results], stats, batch_size)  # type: ignore[arg-type]

    # -- the loop -------------------------------------------------------------------------------
    def _run(self, prompts, seeds, todo: deque, results, batch_size: int, progress, keep: bool = True) -> None:
        rows: list[Row] = []
        ctx: dict[str, BatchedContext | None] = {TEACHER: None, STUDENT: None}
        empty = 0  # row-steps the batch has run short since the last join
        while todo or rows:
            empty += batch_size - len(rows)
            if todo and (not rows or empty >= batch_size * JOIN_AFTER_STEPS):
                new = [self._new_row(i, prompts[i], seeds[i]) for i in _take(todo, batch_size - len(rows))]
                self._join(ctx, rows, new)
                self.events["joins"] += 1
                empty = 0
            (self._speculate if self.speculative else self._step)(rows, ctx)
            self.events["steps"] += 1
            done = [b for b, r in enumerate(rows) if r.finish]
            if done:
                traces = [rows[b].trace(self.student, self.config.pth, with_teacher_prompt=self.run_teacher) for b in done]
                for b, trace in zip(done, traces):
                    results[rows[b].index] = trace if keep else _HANDED_OVER  # (not None: a restart skips it)
                left = [b for b, r in enumerate(rows) if not r.finish]
                self._count_positions(ctx)
                for c in ctx.values():
                    if c is not None:
                        c.select(left)
                rows = [rows[b] for b in left]
                if progress is not None:
                    for trace in traces:
                        progress(trace)

    def _count_positions(self, ctx: dict) -> None:
        """Accumulate decode-time forward cells per side (prompt prefill is counted separately)."""
        for side, c in ctx.items():
            if c is not None:
                for k, v in c.positions.items():
                    self.events[f"{side}_{k}_positions"] += v
                    c.positions[k] = 0

    def _new_row(self, index: int, prompt, seed: int) -> Row:
        rng = torch.Generator().manual_seed((self.config.seed * 0x9E3779B1 + int(seed) * 0x85EBCA77) % (2**63))
        t_text, t_ids = self.teacher.prompt(prompt, self.config)
        s_text, s_ids = self.student.prompt(prompt, self.config)
        return Row(
            index=index,
            rng=rng,
            pair=self.bridge.pair(),
            ids={TEACHER: t_ids, STUDENT: s_ids},
            prompt_len={TEACHER: len(t_ids), STUDENT: len(s_ids)},
            prompts={TEACHER: t_text, STUDENT: s_text},
        )

    def _join(self, ctx: dict, rows: list[Row], new: list[Row]) -> None:
        """Prefill new rows' prompts and add them to the running batch."""
        for side, lm, active in ((TEACHER, self.teacher, self.run_teacher), (STUDENT, self.student, self.run_student)):
            if not active:
                continue
            becomes_ctx = ctx[side] is None or not rows
            static = (self.static[side] or False) if becomes_ctx else False  # merged: ours
            fresh = BatchedContext(lm.model, len(new), static=static, packed=self.packed[side])
            fresh.extend([r.ids[side] for r in new])
            self.events[f"{side}_prompt_positions"] += fresh.positions["computed"]
            fresh.positions = {"real": 0, "computed": 0}
            if becomes_ctx:
                ctx[side] = fresh
            else:
                ctx[side].merge(fresh)
        rows.extend(new)

    def _step(self, rows: list[Row], ctx: dict) -> None:
        """One token decision for every row whose models are caught up: catch up, decide (the mode's
        policy), commit. A row still catching up sits the step out and draws no randomness."""
        ready = self._catch_up(rows, ctx)
        self.events["row_steps"] += len(ready)  # decisions made (a bridged row's may add 0, 1 or more tokens)
        draws = set(ready)
        u = torch.stack([torch.rand(self.uniforms, generator=r.rng) if b in draws else torch.zeros(self.uniforms)
                         for b, r in enumerate(rows)])  # [B, uniforms]  # fmt: skip
        s_logits = self._logits(ctx[STUDENT], self.student) if self.run_student else None  # [B, V_s]
        t_logits = self._logits(ctx[TEACHER], self.teacher) if self.run_teacher else None  # [B, V_t]
        policy = {"student": self._student_only, "teacher": self._teacher_only, "rsd": self._rsd}[self.config.mode]
        decided = policy(rows, ready, ctx[STUDENT], t_logits, s_logits, u)
        if self.run_student:  # every entering token is scored once (judged candidates already are)
            self._score(rows, ctx[STUDENT], s_logits, {b: c for b, c in decided.items() if c.p_s is None}, judge=False)
        self._set_teacher_probs(decided, t_logits)
        for b, c in decided.items():
            self._commit(rows[b], c)

    def _catch_up(self, rows: list[Row], ctx: dict) -> list[int]:
        """Feed the rows' pending updates to each running model (one forward per model); returns the rows
        whose models are both up to date. In a batch of ``DEFER_FROM_ROWS`` or more, a row feeds at most one
        token per step and sits out the steps it needs for the rest (``stats["catch_up_deferred"]``): one
        row's two-token catch-up would otherwise widen the block for every row."""
        width = 1 if len(rows) >= DEFER_FROM_ROWS else None
        for side, active in ((TEACHER, self.run_teacher), (STUDENT, self.run_student)):
            if active:
                ctx[side].maybe_compact()
                self._feed(ctx[side], rows, side, width)
        ready = [b for b, r in enumerate(rows) if r.pending[TEACHER] is None and r.pending[STUDENT] is None]
        self.events["catch_up_deferred"] += len(rows) - len(ready)
        return ready

    def _student_only(self, rows: list[Row], ready: list[int], s_ctx, t_logits, s_logits, u) -> dict[int, Candidate]:
        """Mode ``student``: the student samples every ready row's token (tempered, top-p)."""
        cfg, split = self.config, sampling.UNIFORMS_PER_DRAW * self.config.teacher_draws
        picks = sampling.sample(sampling.tempered_probs(s_logits, cfg.temperature), u[:, split:].to(s_logits.device), cfg.top_p)
        return self._trials(rows, STUDENT, _only(ready, picks.tolist()))

    def _teacher_only(self, rows: list[Row], ready: list[int], s_ctx, t_logits, s_logits, u) -> dict[int, Candidate]:
        """Mode ``teacher`` (direct distillation): the teacher's proposal always enters."""
        split = sampling.UNIFORMS_PER_DRAW * self.config.teacher_draws
        cands = sampling.propose(t_logits, u[:, :split].to(t_logits.device), self.config)[:, 0].tolist()  # [B]
        return self._trials(rows, TEACHER, _only(ready, cands))

    # -- speculative RSD (config.draft_tokens > 0, same-tokenizer pairs) ---------------------------
    def _draft_map(self) -> torch.Tensor | None:
        """Teacher id of each student id [V_s] when the pair is token for token (identical, or remappable
        with a 1:1 table both ways): drafts are then the teacher's tokens too. None: no speculation."""
        if not (self.run_teacher and self.run_student):
            return None
        if self.bridge.keeps_sampled_ids:
            return torch.arange(self.student.vocab.size)
        s2t, t2s = self.bridge.maps[STUDENT].table, self.bridge.maps[TEACHER].table
        if self.kind != "remappable" or s2t is None or t2s is None or len(s2t) != len(t2s):
            return None
        if any(t == NO_TOKEN or t2s[t] != s for s, t in enumerate(s2t)):
            return None  # one-sided tokens: a draft could have no teacher counterpart
        return torch.tensor(s2t)

    def _speculate(self, rows: list[Row], ctx: dict) -> None:
        """One speculative round for every row (``speculative``: exact RSD, or teacher sampling):

        draft     the student samples K tokens from g, one one-token forward each      drafts D [B, K]
        verify    one teacher forward scores all K+1 positions                          T [B, K+1, V_t]
        target    RSD's distribution q at each position, in closed form                 ``speculative.rsd_target``
        accept    each draft with prob min(1, q/g) until the first rejection            ``speculative.verify``
        commit    the kept drafts and one corrected (or bonus) token; the rejected drafts are rolled back
        """
        cfg, K = self.config, self.config.draft_tokens
        s_ctx, t_ctx = ctx[STUDENT], ctx[TEACHER]
        for c in (s_ctx, t_ctx):  # a round appends K+1 columns to every row: the cache stays within 1.25x
            c.maybe_compact(slack=0, ahead=K + 1)
        self._feed(s_ctx, rows, STUDENT)  # the teacher catches up in the verify forward
        u = torch.stack([torch.rand(self.uniforms, generator=r.rng) for r in rows]).to(self._decision_device)  # [B, uniforms]
        s_logits, g, drafts = [self._logits(s_ctx, self.student)], [], []  # s_logits[j] predicts draft position j
        for j in range(K):
            g.append(speculative.draft_probs(s_logits[-1], cfg))  # [B, V_s]
            drafts.append(sampling.inverse_cdf(g[-1], u[:, j : j + 1])[:, 0])
            s_ctx.extend([[d] for d in drafts[-1].tolist()])
            s_logits.append(self._logits(s_ctx, self.student))
        g.append(speculative.draft_probs(s_logits[-1], cfg))  # after the last draft: the sample fallback there
        S, G, D = torch.stack(s_logits, 1), torch.stack(g, 1), torch.stack(drafts, 1)  # [B, K+1, V_s] x2, [B, K]
        T = self._verify_forward(rows, t_ctx, D)  # [B, K+1, V_t]
        B, V = S.shape[0], S.shape[-1]
        t = speculative.teacher_probs(T.flatten(0, 1), cfg)  # [B(K+1), V_t]
        if not self.bridge.keeps_sampled_ids:
            t = t[:, self.draft_map.to(T.device)]  # [B(K+1), V_s]: on the student's ids
        q, q_teacher = speculative.rsd_target(t, S.flatten(0, 1), cfg, G.flatten(0, 1))
        accepted, tokens, from_teacher = speculative.verify(q.view(B, K + 1, V), q_teacher.view(B, K + 1, V), G[:, :K], D, u[:, K:])
        for c in (s_ctx, t_ctx):
            for b, n in enumerate(accepted.tolist()):
                c.rollback(b, K - n)  # the rejected drafts leave both caches
        self._count_widths(ctx)
        self.events["spec_rounds"] += 1  # teacher forwards
        self.events["row_rounds"] += B  # rounds x rows: teacher forwards per row
        self.events["drafted"] += B * K
        self.events["draft_accepted"] += int(accepted.sum())
        self._commit_round(rows, S, T, accepted, tokens, from_teacher)

    def _commit_round(self, rows: list[Row], S, T, accepted, tokens, from_teacher) -> None:
        """Commit each row's kept drafts and its last token (p_s, p_t and sources as verified); the drafts
        are in both caches already. S [B, K+1, V_s], T [B, K+1, V_t]; accepted [B]; tokens, from_teacher [B, K+1]."""
        cfg = self.config
        kept = accepted.tolist()
        at = [(b, j) for b, n in enumerate(kept) for j in range(n + 1)]  # the committed cells, row by row
        bi, ji = (torch.tensor(x, device=S.device) for x in zip(*at))
        ys = tokens[bi, ji]  # [C]
        S_c = S[bi, ji]  # [C, V_s]: only the committed cells are scored
        p_s = sampling.token_scores(S_c, ys, cfg)[0].tolist()
        p_t = sampling.TokenProbs(T[bi, ji]).at(torch.arange(len(at), device=T.device), self.draft_map.to(T.device)[ys]).tolist()
        strict_none = (~speculative.acceptable(S_c, cfg).any(-1)).tolist() if cfg.fallback == "strict" and cfg.mode == "rsd" else None
        ys, sources = ys.tolist(), from_teacher[bi, ji].tolist()
        for k, (b, j) in enumerate(at):
            row = rows[b]
            if row.finish:  # EOS, the budget or a stop string came earlier in this run: the rest is cut
                continue
            y, source = ys[k], TEACHER if sources[k] else STUDENT
            c = Candidate(row.pair, Step(student=Update(0, [y]), teacher=Update(0, [int(self.draft_map[y])])), source, y,
                          p_s=[p_s[k]], in_cache=j < kept[b], in_teacher_cache=j < kept[b], p_t=p_t[k] if source == TEACHER else None)  # fmt: skip
            if cfg.mode == "rsd":
                row.decisions += 1
                row.accepted += source == TEACHER
                if strict_none is not None and source == STUDENT and strict_none[k]:
                    c.last_resort = True  # S was empty: the student's argmax, whatever its p_s
                    self.events["strict_last_resort"] += 1
            self._commit(row, c)

    def _count_widths(self, ctx: dict) -> None:
        """How wide each cache runs against its longest row after a round (a rejected draft leaves a hole)."""
        for side, c in ctx.items():
            width, longest = c.valid.shape[1], max(c.lengths(), default=0)
            self.events[f"{side}_cache_width"] += width
            self.events[f"{side}_cache_longest"] += longest
            key = f"{side}_cache_width_over_longest_max"
            self.events[key] = max(self.events[key], width / max(1, longest))

    def _verify_forward(self, rows: list[Row], t_ctx: BatchedContext, drafts: torch.Tensor) -> torch.Tensor:
        """The teacher's pending token and the drafts [B, K] in one forward; returns the teacher logits
        [B, K+1, V_t] predicting each draft position and the one after the last."""
        K = drafts.shape[1]
        appends = []
        for b, row in enumerate(rows):
            pending, row.pending[TEACHER] = row.pending[TEACHER], None
            assert pending is None or not pending.rollback, "speculative rows only ever append"
            appends.append((list(pending.append) if pending is not None else []) + self.draft_map[drafts[b]].tolist())
        outs = t_ctx.extend(appends, scores=True)  # per row: logits predicting each appended token
        T = torch.cat([torch.stack([o[len(o) - K :] for o in outs]), t_ctx.last_logits[:, None]], dim=1)
        return fit_vocab(T, self.teacher.vocab.size).to(self._decision_device)

    def _rsd(self, rows: list[Row], ready: list[int], s_ctx: BatchedContext, t_logits, s_logits, u) -> dict[int, Candidate]:
        """RSD for every ready row (the paper's algorithm, batched):

        propose   the teacher samples candidates                       cands [B, teacher_draws]
        score     p_s of each candidate's student tokens              (current logits; spans: a probe forward)
        accept    iff every token passes (``sampling.accepts``)        next draw for rows still open
        else      the student samples its own token                    ``_fall_back``
        """
        cfg = self.config
        split = sampling.UNIFORMS_PER_DRAW * cfg.teacher_draws
        cands = sampling.propose(t_logits, u[:, :split].to(t_logits.device), cfg).tolist()  # [B, teacher_draws]
        open_rows = [b for b in ready if rows[b].pair.may_push(TEACHER)]  # a student mid-character goes on
        for b in open_rows:
            rows[b].decisions += 1
        decided: dict[int, Candidate] = {}
        for j in range(cfg.teacher_draws):
            trials = self._trials(rows, TEACHER, {b: cands[b][j] for b in open_rows})
            judged = {b: c for b, c in trials.items() if c.pair.may_push(STUDENT)}  # else it ends mid-character
            self.events["proposal_mid_character"] += len(trials) - len(judged)
            decided.update(self._score(rows, s_ctx, s_logits, self._first_token_passes(s_ctx, s_logits, judged), judge=True))
            open_rows = [b for b in open_rows if b not in decided]
            if not open_rows:
                break
        for b in decided:
            rows[b].accepted += 1
        rest = [b for b in ready if b not in decided]
        decided.update(self._fall_back(rows, s_ctx, s_logits, u[:, split:], rest))
        return decided

    def _first_token_passes(self, s_ctx: BatchedContext, s_logits, cands: dict[int, Candidate]) -> dict[int, Candidate]:
        """The proposals that may still pass: a span whose first token fails already, on logits the student
        context holds (``_first_logits``), is rejected without its probe forward (``stats["probe_skipped"]``);
        the decision is the same, a rejected proposal leaves no trace."""
        first = {b: self._first_logits(s_ctx, s_logits, b, c.step.student) for b, c in cands.items() if len(c.step.student.append) > 1}
        early = [b for b, f in first.items() if f is not None]
        if not early:
            return cands
        tok = torch.tensor([cands[b].step.student.append[0] for b in early], device=s_logits.device)
        passed = sampling.passes(*sampling.token_scores(torch.stack([first[b] for b in early]), tok, self.config), self.config).tolist()
        failed = {b for b, ok in zip(early, passed) if not ok}
        self.events["probe_skipped"] += len(failed)
        return {b: c for b, c in cands.items() if b not in failed}

    def _first_logits(self, s_ctx: BatchedContext, s_logits, b: int, su: Update) -> torch.Tensor | None:
        """The student logits [V_s] predicting the first token of row b's update ``su``, when no forward is
        needed: the current ones (``s_logits`` [B, V_s]) for an append, and for a one-token rollback those that
        predicted the token it replaces, which the context keeps (``logits_after_rollback``)."""
        if su.rollback == 0:
            return s_logits[b]
        kept = s_ctx.logits_after_rollback(b, su.rollback)
        return None if kept is None else fit_vocab(kept, self.student.vocab.size).to(self._decision_device)

    def _fall_back(self, rows: list[Row], s_ctx, s_logits, u, rest: list[int]) -> dict[int, Candidate]:
        """The student samples its own token (``config.fallback``) for rows ``rest``; u [B, UNIFORMS_PER_DRAW].

        ``strict``: the choice is judged like a teacher proposal, on the span of student tokens its text
        becomes (a merge with earlier tokens can make a token nobody chose); a rejected choice is excluded
        and the student draws again. When a rejected span re-splits held text (``strict.split_point``), the
        next choices come from the probe's logits at the choice's own first token: the student's
        distribution in the canonical context. Draws are sampled while uniforms last, then the most likely
        untried choice, up to ``strict.MAX_TRIES``. Last resort, when every passing choice of both contexts
        was tried (or the cap is hit): the tried choice whose least likely token is the most likely; its
        failing tokens are marked ``TokenRecord.last_resort`` (``stats["strict_last_resort"]``).
        """
        cfg = self.config
        if not rest:
            return {}
        logits = s_logits[torch.tensor(rest, device=s_logits.device)]  # [R, V_s]
        u = u[rest].to(s_logits.device)
        if cfg.fallback != "strict":
            picks = sampling.fallback(logits, u, cfg).tolist()
            return self._trials(rows, STUDENT, dict(zip(rest, picks)))
        decided: dict[int, Candidate] = {}
        tried: dict[int, list[Candidate]] = {b: [] for b in rest}
        excluded = torch.zeros_like(logits, dtype=torch.bool)  # [R, V_s]: choices tried (same push, same span)
        split: dict[int, torch.Tensor] = {}  # position in ``rest`` -> [V_s] logits of the canonical context
        todo = list(range(len(rest)))  # positions in ``rest``
        for k in range(strict.MAX_TRIES):
            idx = torch.tensor(todo, device=logits.device)
            src = logits[idx].clone()  # [n, V_s]: each row's current source of choices
            for n, i in enumerate(todo):
                if i in split and sampling.strict_choices(split[i][None], cfg, excluded[i : i + 1]).any():
                    src[n] = split[i]
            col = strict.draw_column(k, sampling.UNIFORMS_PER_DRAW)
            if col is not None:
                picks = sampling.fallback(src, u[idx, col:], cfg, excluded[idx] if k else None).tolist()
            else:
                allowed = sampling.strict_choices(src, cfg, excluded[idx])
                picks = strict.most_likely(allowed, sampling.acceptance_probs(src, cfg)).tolist()
            trials = self._trials(rows, STUDENT, {rest[i]: s for i, s in zip(todo, picks)})
            decided.update(self._score(rows, s_ctx, s_logits, trials, judge=True))
            for i, s in zip(todo, picks):
                b = rest[i]
                if b not in decided:
                    tried[b].append(trials[b])
                    excluded[i, s] = True
                    if i not in split:
                        found = self._split_logits(rows[b], trials[b])
                        if found is not None:
                            split[i] = found
                            self.events["strict_split_context"] += 1
            todo = [i for i in todo if rest[i] not in decided]
            if todo:  # rows with no untried choice left in either context stop here (unavoidable)
                t_idx = torch.tensor(todo, device=logits.device)
                own_left = sampling.strict_choices(logits[t_idx], cfg, excluded[t_idx]).any(-1).tolist()
                todo = [i for i, ok in zip(todo, own_left)
                        if ok or (i in split and sampling.strict_choices(split[i][None], cfg, excluded[i : i + 1]).any())]  # fmt: skip
            if not todo:
                break
        for b in rest:
            if b not in decided:
                c = strict.last_resort(tried[b], key=lambda c: min(c.p_s, default=1.0))
                c.last_resort = True
                decided[b] = c
                self.events["strict_last_resort"] += 1
        return decided

    def _split_logits(self, row: Row, c: Candidate) -> torch.Tensor | None:
        """For a rejected strict choice whose span re-splits the held text: the probe's logits [V_s] at the
        choice's own first token, when the re-split tokens before it pass (else None)."""
        su = c.step.student
        if not su.rollback or c.span_logits is None:
            return None
        table = self.student.vocab.token_bytes
        held = row.ids[STUDENT][len(row.ids[STUDENT]) - su.rollback :]
        j = strict.split_point([table[i] for i in held], [table[i] for i in su.append])
        if j is None:
            return None
        tok = torch.tensor(su.append[:j], device=c.span_logits.device)
        if not bool(sampling.passes(*sampling.token_scores(c.span_logits[:j], tok, self.config), self.config).all()):
            return None
        return c.span_logits[j]

    def _trials(self, rows: list[Row], side: str, tokens: dict[int, int]) -> dict[int, Candidate]:
        """Each row's token pushed on a trial copy of its pair, as one bridge call for the step (``push_all``
        groups the rows' tokenizer calls); its time goes to ``stats["bridge_s"]``."""
        t0 = time.perf_counter()
        pairs = [rows[b].pair.copy() for b in tokens]
        steps = push_all(pairs, side, list(tokens.values()))
        self.events["bridge_s"] += time.perf_counter() - t0
        return {b: Candidate(p, st, side, t) for (b, t), p, st in zip(tokens.items(), pairs, steps)}

    def _score(self, rows: list[Row], s_ctx: BatchedContext, s_logits, cands: dict[int, Candidate], judge: bool) -> dict[int, Candidate]:
        """Set p_s of every student token each candidate appends; return the candidates that enter.

        One token whose predicting logits the context holds (``_first_logits``: no rollback, or a one-token
        rollback) is scored on them; anything else by a probe forward (one for all rows) whose cache entries
        stay for the candidates that enter. With ``judge`` only the candidates RSD accepts enter
        (``sampling.accepts``), otherwise all of them.
        """
        cfg = self.config
        first = {b: self._first_logits(s_ctx, s_logits, b, c.step.student) for b, c in cands.items() if len(c.step.student.append) == 1}
        single = [b for b, f in first.items() if f is not None]
        spans = {b: c.step.student for b, c in cands.items() if b not in single}
        gates: dict[int, torch.Tensor] = {}
        if single:
            logits = torch.stack([first[b] for b in single])  # [n, V_s]
            tok = torch.tensor([cands[b].step.student.append[0] for b in single], device=s_logits.device)
            p_s, gate = sampling.token_scores(logits, tok, cfg)  # [n], [n]
            for k, b in enumerate(single):
                cands[b].p_s, gates[b] = p_s[k : k + 1].tolist(), gate[k : k + 1]
                if cands[b].step.student.rollback:  # (a strict split reads the span's logits)
                    cands[b].span_logits = logits[k : k + 1]
                    self.events["scored_on_kept_logits"] += 1
        if spans:
            saved = s_ctx.checkpoint(list(spans))
            kept = {b: _last_kept(rows[b].ids[STUDENT], su.rollback) for b, su in spans.items() if su.rollback}
            preds = self._extend(s_ctx, self.student, spans, kept, score=True)  # b -> [len(append), V_s]
            for b, su in spans.items():
                tok = torch.tensor(su.append, device=s_logits.device)
                p_s, gates[b] = sampling.token_scores(preds[b], tok, cfg) if su.append else (tok.float(), tok.bool())
                cands[b].p_s, cands[b].in_cache, cands[b].span_logits = p_s.tolist(), True, preds[b]
        enter = {b: c for b, c in cands.items() if not judge or sampling.accepts(torch.tensor(c.p_s), gates[b].cpu(), cfg)}
        if judge and spans:
            self.events["probed"] += len(spans)
            self.events["probe_accepted"] += sum(b in enter for b in spans)
        undo = [b for b in spans if b not in enter]
        if undo:
            s_ctx.restore(saved, undo)
            for b in undo:
                cands[b].in_cache = False
        return enter

    def _commit(self, row: Row, c: Candidate) -> bool:
        """Apply one decided candidate to its row: ids, records (p_s as scored; a strict last resort's
        sub-pth tokens marked), the models' pending updates (none for a side whose cache holds the tokens
        already). True when the row is finished."""
        su, tu = c.step.student, c.step.teacher
        row.pair = c.pair
        row.ids[STUDENT] = su.apply(row.ids[STUDENT])
        if su.rollback:
            del row.records[len(row.records) - su.rollback :]
        row.records += [TokenRecord(t, c.source, p, last_resort=c.last_resort and p is not None and p < self.config.pth)
                        for t, p in zip(su.append, c.p_s or [None] * len(su.append))]  # fmt: skip
        if c.p_t is not None:
            row.records[-1].p_t = c.p_t
        if self.run_student and not c.in_cache:  # probed or drafted tokens are in the student's cache already
            row.pending[STUDENT] = su if row.pending[STUDENT] is None else row.pending[STUDENT].then(su)
        row.ids[TEACHER] = tu.apply(row.ids[TEACHER])
        if self.run_teacher and not c.in_teacher_cache:  # a side with no model keeps no pending work
            row.pending[TEACHER] = tu if row.pending[TEACHER] is None else row.pending[TEACHER].then(tu)
        self._check_finished(row, c)
        return row.finish is not None

    def _set_teacher_probs(self, decided: dict[int, Candidate], t_logits) -> None:
        """p_t of accepted teacher tokens that became one student token 1:1 (their 1:1 counterpart)."""
        image = self.bridge.maps[TEACHER].image
        one_to_one = [b for b, c in decided.items()
                      if c.source == TEACHER and c.step.student == Update(0, [image(c.token)])]  # fmt: skip
        if t_logits is None or not one_to_one:
            return
        idx = torch.tensor(one_to_one, device=t_logits.device)
        tok = torch.tensor([decided[b].token for b in one_to_one], device=t_logits.device)
        for b, p in zip(one_to_one, sampling.TokenProbs(t_logits).at(idx, tok).tolist()):
            decided[b].p_t = p

    def _check_finished(self, row: Row, c: Candidate) -> None:
        if any(i in self.student.stop_ids for i in c.step.student.append) or (
            c.source == TEACHER and c.token in self.teacher.stop_ids
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

    def _feed(self, c: BatchedContext, rows: list[Row], side: str, width: int | None = None) -> None:
        """Bring one model's context up to date with every row's pending update (one forward). ``width``:
        append at most this many tokens per row; the rest stays pending."""
        updates: dict[int, Update] = {}
        kept: dict[int, int] = {}
        for b, r in enumerate(rows):
            upd, r.pending[side] = r.pending[side], None
            if upd is None:
                continue
            if upd.rollback and not upd.append:  # its next-token logits are those of the token it keeps last
                kept[b] = r.ids[side][-1]  # (the ids hold the update already)
            if width is not None and len(upd.append) > width:
                upd, r.pending[side] = Update(upd.rollback, upd.append[:width]), Update(0, upd.append[width:])
            updates[b] = upd
        if updates:
            self._extend(c, self.teacher if side == TEACHER else self.student, updates, kept, score=False)

    def _extend(self, c: BatchedContext, lm: LM, updates: dict[int, Update], kept: dict[int, int], score: bool) -> dict[int, torch.Tensor]:
        """Roll back and append per row, in one forward. ``kept[b]``: the token a rolling-back row keeps last.
        It is fed again when ``score`` (so every new token's predicting logits come out of this same forward)
        or when the row appends nothing after its rollback (its next-token logits are that token's). With
        ``score``, returns per row the logits [len(append), V] predicting each appended token."""
        appends: list[list[int]] = [[] for _ in range(c.batch_size)]
        refed = set()
        for b, upd in updates.items():
            if upd.rollback and (score or not upd.append):
                c.rollback(b, upd.rollback + 1)
                appends[b] = [kept[b], *upd.append]
                refed.add(b)
            else:
                c.rollback(b, upd.rollback)
                appends[b] = list(upd.append)
        need = score and any(appends)
        outs = c.extend(appends, scores=need)  # per row: logits predicting each appended token
        if not need:
            return {}
        return {b: fit_vocab(outs[b][1:] if b in refed else outs[b], lm.vocab.size).to(self._decision_device)
                for b, upd in updates.items() if upd.append}  # fmt: skip


_HANDED_OVER = object()  # results[i] of a trace given to ``progress`` only (``generate(keep=False)``)


def _last_kept(ids: list[int], rollback: int) -> int:
    """The token that ends ``ids`` once ``rollback`` tokens are removed."""
    return ids[len(ids) - rollback - 1]


def _only(rows: list[int], values: list) -> dict:
    """``{b: values[b]}`` for the rows ``rows``."""
    return {b: values[b] for b in rows}


def _take(q: deque, n: int) -> list:
    return [q.popleft() for _ in range(min(n, len(q)))]

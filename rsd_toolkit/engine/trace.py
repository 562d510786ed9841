"""What the engine returns – one :class:`Trace` per prompt, one :class:`TokenRecord` per student token –
and the per-sequence state it keeps while decoding (:class:`Row`, :class:`Candidate`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from ..bridges import STUDENT, TEACHER, Pair, Step, Update

@dataclass
class TokenRecord:
    id: int
    source: str  # "teacher" (accepted proposal) or "student" (fallback / student-only)
    p_s: float | None  # the student's acceptance probability of this token (None without a student model)
    p_t: float | None = None  # the teacher's probability (temperature 1) of the token it proposed, when 1:1
    last_resort: bool = False  # a sub-pth token let in by the strict fallback's last resort


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
        """Tokens whose student probability is below pth (the stop token that ends a trace included)."""
        return sub_pth(self.records, self.pth)

    @property
    def last_resorts(self) -> int:
        """Sub-pth tokens the strict fallback let in as its last resort (in a strict trace: all of them)."""
        return sum(1 for r in self.records if r.last_resort)

    def to_dict(self, token_stats: bool = False) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "records"}
        d.update(acceptance_rate=self.acceptance_rate, sub_pth=self.sub_pth, last_resorts=self.last_resorts, n_tokens=len(self.ids))
        if token_stats:
            d["records"] = [asdict(r) for r in self.records]
        return d


class Generation(list):
    """What one ``RSDEngine.generate`` call returns: its traces (a list, in prompt order) and what the call
    did. ``stats`` counts engine events (probed spans, mid-character proposals, drafts, computed positions,
    bridge seconds…); ``batch_size`` is the batch size that fitted (halved on running out of GPU memory):
    pass it to the next call. The engine keeps neither between calls."""

    def __init__(self, traces: list[Trace], stats: Counter, batch_size: int):
        super().__init__(traces)
        self.stats = stats
        self.batch_size = batch_size


def sub_pth(records: list[TokenRecord], pth: float) -> int:
    """Records whose p_s is below pth (records without a student probability do not count)."""
    return sum(1 for r in records if r.p_s is not None and r.p_s < pth)


@dataclass(eq=False)
class Candidate:
    """A token one side offers for one row, pushed on a trial copy of the row's pair."""

    pair: Pair  # the row's pair after the push
    step: Step  # how both sides' ids change
    source: str  # TEACHER (a proposal) or STUDENT (its own token)
    token: int
    p_s: list[float] | None = None  # acceptance probability of each appended student token, set when scored
    in_cache: bool = False  # in the student's cache already (a probe forward's entries, or a draft)
    in_teacher_cache: bool = False  # in the teacher's cache already (a verified draft)
    span_logits: torch.Tensor | None = None  # [len(append), V_s] the probe's logits predicting each appended token
    last_resort: bool = False  # the strict fallback's last resort (no tried choice passed)
    p_t: float | None = None  # the teacher's probability of its proposal, when 1:1


@dataclass(eq=False)
class Row:
    """One sequence being generated."""

    index: int
    rng: torch.Generator
    pair: Pair
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

    def trace(self, student, pth: float, with_teacher_prompt: bool) -> Trace:
        """The finished sequence; its text leaves out a final stop token of the ``student`` LM."""
        ids = self.generated()
        body = ids[:-1] if self.finish == "eos" and ids and ids[-1] in student.stop_ids else ids
        return Trace(
            index=self.index, text=student.vocab.text_of(body), ids=list(ids), records=self.records,
            finish_reason=self.finish or "length", accepted=self.accepted, decisions=self.decisions, pth=pth,
            student_prompt=self.prompts[STUDENT], teacher_prompt=self.prompts[TEACHER] if with_teacher_prompt else "",
        )  # fmt: skip

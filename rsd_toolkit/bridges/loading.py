"""One function to load a tokenizer from whatever a user has: hub id, model folder, ``tokenizer.json``,
SentencePiece ``.model``, GGUF file, Tekken JSON, or a fetched asset (``asset:qwen2``).

Conversions that are slow (GGUF, Tekken) are done once and cached as a plain tokenizer folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

from .. import assets


class TokenizerLoadError(ValueError):
    """No loader could read the given tokenizer; the message lists what was tried."""


_MEMO: dict[tuple[str, bool], object] = {}


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return transformers


@contextlib.contextmanager
def quiet_progress():
    """Library progress bars (transformers' GGUF conversion writes a raw tqdm bar) only with ``RSD_VERBOSE``:
    the commands show their own progress."""
    if os.environ.get("RSD_VERBOSE"):
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _converted_dir(path: Path, kind: str) -> Path:
    """Cache folder for a converted file, keyed on its name, size and mtime."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v1".encode()).hexdigest()[:12]
    return assets.cache_dir() / "converted" / f"{kind}-{path.name}-{key}"


def _cached_conversion(path: Path, kind: str, convert) -> object:
    """Convert once into the cache, then always load from the cached folder.

    A freshly converted tokenizer and the same tokenizer reloaded from its saved folder can differ (a
    tokenizer class may add its normaliser on load: Qwen2's NFC), so the first, converting load returns the
    reloaded one too: cold and warm caches give the identical tokenizer.
    """
    transformers = _quiet_transformers()
    target = assets.build_once(_converted_dir(path, kind), lambda out: convert().save_pretrained(str(out)),
                               "tokenizer_config.json")  # fmt: skip
    return transformers.AutoTokenizer.from_pretrained(str(target))


def _load_gguf(path: Path):
    transformers = _quiet_transformers()
    def convert():
        with quiet_progress():
            return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    return _cached_conversion(path, "gguf", convert)


def _load_sentencepiece(path: Path):
    """A bare ``.model`` file: load it from a folder (``LlamaTokenizerFast(vocab_file=…)`` breaks in v5)."""
    transformers = _quiet_transformers()

    def convert():
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(path, os.path.join(tmp, "tokenizer.model"))
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "LlamaTokenizer"}, f)
            return transformers.AutoTokenizer.from_pretrained(tmp)

    return _cached_conversion(path, "spm", convert)


def _load_tokenizer_json(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path))


def _is_tekken(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return b'"config"' in head and b'"pattern"' in head and b'"vocab"' in head


def _load_tekken(path: Path):
    from .tekken import tekken_to_tokenizer

    return _cached_conversion(path, "tekken", lambda: tekken_to_tokenizer(path))


def _load_file(path: Path):
    name = path.name.lower()
    if name.endswith(".gguf"):
        return _load_gguf(path), "gguf"
    if name.endswith(".json"):
        if _is_tekken(path):
            return _load_tekken(path), "tekken"
        return _load_tokenizer_json(path), "tokenizer.json"
    if ".model" in name:  # tokenizer.model, tokenizer.model.v3, spm.model
        return _load_sentencepiece(path), "sentencepiece"
    raise TokenizerLoadError(f"{path}: unknown tokenizer file type (expected .gguf, .json or a SentencePiece .model)")


def _load_dir(path: Path, trust_remote_code: bool):
    transformers = _quiet_transformers()
    files = {p.name for p in path.iterdir()}
    if files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tekken.json"}:
        if "tekken.json" in files and not files & {"tokenizer.json", "tokenizer_config.json"}:
            return _load_tekken(path / "tekken.json"), "tekken"
        return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code), "folder"
    ggufs = sorted(p for p in path.iterdir() if p.suffix == ".gguf")
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0]), "gguf"
    raise TokenizerLoadError(
        f"{path}: folder has no tokenizer (looked for tokenizer.json, tokenizer_config.json, tokenizer.model, "
        "vocab.json, tekken.json or exactly one .gguf)"
    )


def load_tokenizer(spec: str | os.PathLike, trust_remote_code: bool = False):
    """Load a Hugging Face tokenizer from any supported source.

    ``spec`` is ``asset:NAME`` (see ``rsd assets list``), a file (``.gguf``, ``tokenizer.json``, Tekken
    ``.json``, SentencePiece ``.model``), a folder, or a hub id. Raises TokenizerLoadError with one line
    listing what was tried. ``trust_remote_code`` is passed on only for folders and hub ids, and only
    when the caller asks.
    """
    key = (str(spec), trust_remote_code)
    if key in _MEMO:
        return _MEMO[key]
    tok = _load_uncached(str(spec), trust_remote_code)
    tok.rsd_source = str(spec)  # for reports: where this tokenizer came from
    _MEMO[key] = tok
    return tok


def _load_uncached(spec: str, trust_remote_code: bool):
    if spec.startswith("asset:"):
        try:
            path = assets.asset_path(spec[len("asset:") :])
        except assets.AssetError as e:
            raise TokenizerLoadError(str(e)) from None
        return _load_checked(path, trust_remote_code)
    path = Path(spec).expanduser()
    if path.exists():
        return _load_checked(path, trust_remote_code)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path or spec.endswith((".json", ".gguf", ".model")):
        raise TokenizerLoadError(f"{spec}: no such file or folder")
    transformers = _quiet_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; we report one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerLoadError(
            f"{spec}: not a local file or folder, and loading it as a hub id failed ({reason[:200]}); "
            "tried: asset:NAME, local path, hub id"
        ) from None


def _load_checked(path: Path, trust_remote_code: bool):
    try:
        if path.is_dir():
            tok, _ = _load_dir(path, trust_remote_code)
        else:
            tok, _ = _load_file(path)
    except TokenizerLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt files raise anything from protobuf to json errors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerLoadError(f"{path}: could not read tokenizer ({type(e).__name__}: {reason[:200]})") from None
    if getattr(tok, "backend_tokenizer", None) is None:
        raise TokenizerLoadError(f"{path}: loaded a tokenizer without a fast (tokenizers) backend; rsd needs one")
    return tok

"""Loading causal LMs for the engine: a model, its own tokenizer, its vocabulary facts and stop tokens.

Specs: a hub id or local folder (``from_pretrained``), a ``.gguf`` file or ``asset:smollm2``. GGUF
weights load dequantised but cannot be trained or saved, so they are rebuilt once with
``from_config`` + ``load_state_dict`` and cached as a safetensors folder.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import assets
from .bridges import Vocab, load_tokenizer
from .bridges.loading import _quiet_transformers, quiet_progress
from .config import RSDConfig


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what was tried."""


class UnsupportedModel(ValueError):
    """The model's cache layout cannot be rolled back per row."""


@dataclass(eq=False)
class LM:
    """A causal LM with its own tokenizer; ``stop_ids`` end a trace, ``primary_stop`` is the one emitted."""

    model: object
    tokenizer: object
    vocab: Vocab
    name: str
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    primary_stop: int | None = None

    @classmethod
    def wrap(cls, model, tokenizer, name: str | None = None, vocab: Vocab | None = None) -> "LM":
        """An LM from objects already in memory (tests, notebooks)."""
        name = name or getattr(tokenizer, "rsd_source", None) or getattr(model, "name_or_path", "") or "model"
        if vocab is None:
            vocab = Vocab.from_tokenizer(tokenizer, name=name)
        vocab.model_vocab_size = model.config.vocab_size
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        eos = [i for i in eos if i in vocab.special_ids]  # a config's default (e.g. Llama's 2) may not fit this tokenizer
        candidates = [*eos, tokenizer.eos_token_id, vocab.roles.get("turn_end")]
        stops = frozenset(i for i in candidates if isinstance(i, int))
        has_template = bool(getattr(tokenizer, "chat_template", None))
        primary = vocab.roles.get("turn_end") if has_template and "turn_end" in vocab.roles else None
        primary = primary if primary is not None else (eos[0] if eos else tokenizer.eos_token_id)
        return cls(model=model, tokenizer=tokenizer, vocab=vocab, name=name, stop_ids=stops, primary_stop=primary)

    @property
    def context_length(self) -> int | None:
        """Positions the model was trained for (None when its config does not say)."""
        config = getattr(self.model, "config", None)
        config = getattr(config, "text_config", None) or config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def prompt(self, prompt: str | list[dict], config: RSDConfig) -> tuple[str, list[int]]:
        """The prompt as this model sees it (its own chat template) and its ids."""
        tok = self.tokenizer
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if config.chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in messages)
            ids = tok(text)["input_ids"]
        if not ids:  # the first prediction needs a position to read logits from
            ids = [tok.bos_token_id if tok.bos_token_id is not None else self.primary_stop]
        return text, list(ids)


def _gguf_has_weights(path: Path) -> bool:
    """llama.cpp's ``ggml-vocab-*.gguf`` files carry a tokenizer and no tensors."""
    from gguf import GGUFReader

    return len(GGUFReader(str(path)).tensors) > 0


def resolve_model_dir(spec: str) -> str:
    """A folder or hub id ``from_pretrained`` can read; GGUF models are converted once."""
    path = assets.asset_path(spec.split(":", 1)[1]) if spec.startswith("asset:") else Path(os.path.expanduser(spec))
    if path.is_file() and path.suffix == ".gguf":
        if not _gguf_has_weights(path):
            raise ModelLoadError(f"{spec} holds a tokenizer only, no weights; model assets: {_model_assets()}")
        return str(_converted_gguf_model(path))
    if spec.startswith("asset:"):
        raise ModelLoadError(f"{spec} is not a model; model assets: {_model_assets()}")
    if path.is_file():
        raise ModelLoadError(f"{spec} is a file; pass a model folder, a .gguf file, a hub id or one of {_model_assets()}")
    return str(path) if path.exists() else spec


def _model_assets() -> str:
    return ", ".join(f"asset:{name}" for name in assets.MODELS)


def _converted_gguf_model(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|model-v1".encode()).hexdigest()[:12]
    target = assets.cache_dir() / "converted" / f"model-{path.stem}-{key}"
    transformers = _quiet_transformers()

    def build(out: Path) -> None:
        import torch

        with quiet_progress():
            gguf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        config = gguf.config
        if hasattr(config, "quantization_config"):  # dequantised weights: a plain fp32 model, Trainer may train it
            del config.quantization_config
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf.state_dict())
        model.save_pretrained(str(out))
        load_tokenizer(str(path)).save_pretrained(str(out))

    folder = assets.build_once(target, build, "config.json")
    _drop_stale_quantization(folder / "config.json")
    return folder


def _drop_stale_quantization(config_file: Path) -> None:
    """Caches converted before the fix kept ``"quantization_config": {"quant_method": "gguf"}`` although their
    weights are plain fp32: Trainer then refused to train them. Repair such a config in place (atomically)."""
    import json

    from .traces.store import write_atomic

    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        write_atomic(str(config_file), json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_lm(
    spec: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    tokenizer=None,
) -> LM:
    """Load a causal LM and its tokenizer (``device_map="auto"`` spreads a large teacher over GPUs).

    The tokenizer is loaded (and checked for bridging) before the weights, so a tokenizer we cannot use
    fails in seconds, not after a multi-GB download.
    """
    transformers = _quiet_transformers()
    import torch

    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    try:
        source = resolve_model_dir(spec)
    except (ModelLoadError, assets.AssetError):
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt GGUF raises anything from struct to numpy errors
        raise ModelLoadError(f"cannot read model {spec!r} ({_one_line(e)})") from None
    tok = tokenizer if tokenizer is not None else load_tokenizer(source, trust_remote_code=trust_remote_code)
    vocab = Vocab.from_tokenizer(tok, name=spec)  # raises UnsupportedTokenizer before any weights load
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
        )
    except Exception as e:  # noqa: BLE001 - truncated weights, bad configs, missing files: one line, not a traceback
        raise ModelLoadError(f"cannot load model {spec!r} ({_one_line(e)})") from None
    if device_map is None and device is not None:
        model.to(device)
    model.eval()
    lm = LM.wrap(model, tok, name=spec, vocab=vocab)
    if lm.primary_stop is None:
        raise ModelLoadError(f"{spec!r} has no EOS token (tokenizer or generation config) and no chat template with an "
                             "end-of-turn token, so a trace could never end; set eos_token in its tokenizer_config.json")  # fmt: skip
    return lm


def _one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_pair(teacher: str, student: str, *, trust_remote_code: bool = False) -> tuple[str, object, object]:
    """Check a teacher/student pair from tokenizers alone (no weights): returns (kind, teacher_tok, student_tok).

    Run this before loading models so a pair the bridges cannot handle fails before any download.
    """
    from .bridges import make_bridge

    tt = load_tokenizer(teacher, trust_remote_code=trust_remote_code)
    st = load_tokenizer(student, trust_remote_code=trust_remote_code)
    kind = make_bridge(Vocab.from_tokenizer(tt, name=teacher), Vocab.from_tokenizer(st, name=student)).kind
    return kind, tt, st

"""Vocabulary alignment between a teacher and a student tokenizer (tokenizers only, no models).

``load_tokenizer`` reads any tokenizer source; ``Vocab.from_tokenizer`` extracts what bridging needs;
``make_bridge`` classifies the pair (identical / remappable / bridged) and returns a :class:`Bridge`
whose ``pair()`` keeps one sequence's teacher and student ids in step (``Pair.push(side, id)`` ->
``Step``); ``analyse`` builds the compatibility report.

The per-push bookkeeping (``incremental``, ``pair``, ``batch``) runs compiled when the install could build
it (``setup.py``, Cython; ``compiled()`` says which); its ``.py`` files are the source either way.
"""

from pathlib import Path as _Path

from . import _compiled

_compiled.import_sources_if_needed(__name__, _Path(__file__).parent)  # before anything imports them

from .compat import SAMPLE_TEXT, CompatReport, analyse, classify, make_bridge
from .batch import push_all
from .bridge import KINDS, Bridge
from .incremental import IncrementalEncoder, Update
from .loading import TokenizerLoadError, load_tokenizer
from .pair import NO_TOKEN, STUDENT, TEACHER, Pair, Step
from .vocab import UnsupportedTokenizer, Vocab


def compiled() -> bool:
    """Whether the bridge's per-push bookkeeping runs compiled (``RSD_PURE_PYTHON=1``: never)."""
    from . import batch, incremental, pair

    return _compiled.compiled((incremental, pair, batch))


def load_vocab(spec: str, trust_remote_code: bool = False, model_vocab_size: int | None = None) -> Vocab:
    """``load_tokenizer`` + ``Vocab.from_tokenizer``; reads a padded size from a model folder's config."""
    import json
    import os

    tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    if model_vocab_size is None and os.path.isdir(os.path.expanduser(str(spec))):
        cfg = os.path.join(os.path.expanduser(str(spec)), "config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                model_vocab_size = json.load(f).get("vocab_size")
    try:
        return Vocab.from_tokenizer(tok, model_vocab_size=model_vocab_size, name=str(spec))
    except UnsupportedTokenizer as e:
        raise UnsupportedTokenizer(f"{spec}: {e}") from None


__all__ = [
    "KINDS", "NO_TOKEN", "SAMPLE_TEXT", "STUDENT", "TEACHER", "Bridge", "CompatReport", "IncrementalEncoder", "Pair",
    "Step", "TokenizerLoadError", "UnsupportedTokenizer", "Update", "Vocab", "analyse", "classify", "compiled", "load_tokenizer",
    "load_vocab", "make_bridge", "push_all",
]  # fmt: skip

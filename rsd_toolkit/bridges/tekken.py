"""Tekken (Mistral's tiktoken-style JSON) to a Hugging Face fast tokenizer.

Regular tokens keep their rank order and sit after ``default_num_special_tokens`` control tokens, as in
``mistral-common``. Merges are recovered from ranks with transformers' own tiktoken converter.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

# mistral-common's default control tokens for Tekken files that do not list their own (ranks 0..19);
# the rest up to default_num_special_tokens are "<SPECIAL_i>" fillers.
_DEFAULT_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip


def tekken_to_tokenizer(path: str | Path):
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers import Regex
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg = data["config"]
    n_special = cfg["default_num_special_tokens"]
    inner = cfg["default_vocab_size"] - n_special
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in data["vocab"][:inner]}

    class _Ranks(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_url):
            return ranks

    vocab, merges = _Ranks(pattern=cfg["pattern"]).extract_vocab_merges_from_model("")
    vocab = {piece: rank + n_special for piece, rank in vocab.items()}
    specials = [t["token_str"] for t in data.get("special_tokens") or []] or list(_DEFAULT_SPECIALS)
    specials += [f"<SPECIAL_{i}>" for i in range(len(specials), n_special)]
    for i, s in enumerate(specials):
        vocab[s] = i
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(cfg["pattern"]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )

"""Shared fixtures: real tokenizers from the pip-fetched assets (fetched in CI, skipped locally if absent)."""

from __future__ import annotations

import os

import pytest

from rsd_toolkit import assets


def require_assets(group: str = "tokenizers") -> None:
    probe = {"tokenizers": "qwen2", "smollm2": "smollm2", "benchmarks": "math500", "qwen-coder-0.5b": "qwen-coder-0.5b"}[group]
    try:
        assets.asset_path(probe)
        if group == "tokenizers":
            assets.asset_path("tekken")
    except assets.AssetError:
        if os.environ.get("CI"):
            assets.fetch((group,))  # CI must never skip: fetch through pip
        else:
            pytest.skip(f"real tokenizer assets missing: run `rsd assets fetch{'' if group == 'tokenizers' else ' --group ' + group}`")


_VOCABS: dict = {}


@pytest.fixture(scope="session")
def vocab():
    """vocab("qwen2") -> Vocab of a fetched asset (memoised for the session)."""
    require_assets()
    from rsd_toolkit.bridges import load_vocab

    def get(name: str):
        if name not in _VOCABS:
            _VOCABS[name] = load_vocab(f"asset:{name}")
        return _VOCABS[name]

    return get


@pytest.fixture(scope="session")
def qwen2_think_dir(tmp_path_factory, vocab):
    """qwen2 tokenizer plus <think>/</think> added tokens, in a model folder whose config pads the vocab."""
    import json

    from rsd_toolkit.bridges import load_tokenizer

    vocab("qwen2")
    tok = load_tokenizer("asset:qwen2")
    import copy

    tok = copy.deepcopy(tok)
    tok.add_tokens(["<think>", "</think>"])
    d = tmp_path_factory.mktemp("qwen2_think")
    tok.save_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({"vocab_size": 152064, "model_type": "qwen2"}))
    return d


# ---------------------------------------------------------------------------------------- small models
_LMS: dict = {}


def tiny_lm(tokenizer: str, arch: str = "llama", hidden: int = 64, layers: int = 2, seed: int = 0, init_scale: float = 1.0):
    """A small random causal LM (Llama or Qwen2 architecture) over a real tokenizer, memoised.

    ``init_scale`` multiplies the init std: large values make peaked next-token distributions, so both
    acceptances and rejections happen at ordinary thresholds.
    """
    key = (tokenizer, arch, hidden, layers, seed, init_scale)
    if key not in _LMS:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

        from rsd_toolkit.bridges import load_tokenizer
        from rsd_toolkit.models import LM

        require_assets()
        tok = load_tokenizer(tokenizer)
        config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
        config = config_cls(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            initializer_range=0.02 * init_scale, tie_word_embeddings=False,
        )  # fmt: skip
        torch.manual_seed(seed)
        _LMS[key] = LM.wrap(model_cls(config).eval(), tok, name=f"{tokenizer}/{arch}-{hidden}x{layers}-s{seed}")
    return _LMS[key]

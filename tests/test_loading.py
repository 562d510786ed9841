"""The tokenizer loader against llama.cpp's reference tokenisations, and its errors."""

from __future__ import annotations

import pytest

from rsd_toolkit import assets
from rsd_toolkit.bridges import TokenizerLoadError, load_tokenizer

# Match rates measured with transformers 5 (see README). qwen2, gpt-2 and phi-3 must match exactly;
# llama-spm differs on leading spaces (llama.cpp always adds the dummy prefix, HF does not before a space).
EXPECTED_MIN_RATE = {"qwen2": 1.0, "gpt-2": 1.0, "phi-3": 1.0, "llama-bpe": 0.97, "deepseek-llm": 0.97, "llama-spm": 0.68}


@pytest.mark.parametrize("family", assets.GGUF_FAMILIES)
def test_gguf_reference_vectors(family, vocab):
    vocab(family)  # ensures assets are there
    tok = load_tokenizer(f"asset:{family}")
    cases = assets.reference_cases(family)
    assert len(cases) >= 40
    matched = sum(tok.encode(text, add_special_tokens=False) == ids for text, ids in cases)
    rate = matched / len(cases)
    print(f"{family}: {matched}/{len(cases)} = {rate:.3f}")
    assert rate >= EXPECTED_MIN_RATE[family]


def test_every_source_kind_loads(vocab, tmp_path):
    vocab("qwen2")
    gguf = assets.asset_path("gpt-2")
    by_file = load_tokenizer(str(gguf))
    folder = tmp_path / "folder"
    by_file.save_pretrained(str(folder))
    by_folder = load_tokenizer(str(folder))
    by_json = load_tokenizer(str(folder / "tokenizer.json"))
    text = "Hello world, 12345 🦙"
    expected = by_file.encode(text, add_special_tokens=False)
    assert by_folder.encode(text, add_special_tokens=False) == expected
    assert by_json.encode(text, add_special_tokens=False) == expected
    spm = load_tokenizer(str(assets.asset_path("mistral-v1")))
    assert len(spm) == 32000 and spm.encode("Hello", add_special_tokens=False) == [22557]
    v3 = load_tokenizer("asset:mistral-v3")
    assert v3.encode("Hello", add_special_tokens=False) == [22557 + 768]


def test_tekken_matches_tiktoken(vocab):
    import base64
    import json

    tiktoken = pytest.importorskip("tiktoken")
    tok = load_tokenizer("asset:tekken")
    data = json.loads(assets.asset_path("tekken").read_text())
    cfg = data["config"]
    inner = cfg["default_vocab_size"] - cfg["default_num_special_tokens"]
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in data["vocab"][:inner]}
    enc = tiktoken.Encoding("tekken", pat_str=cfg["pattern"], mergeable_ranks=ranks, special_tokens={})
    for text in ["Hello world! 12345 héllo 🦙 日本語", "  spaces\n\n\ttabs", "def f(x):\n    return x**2", "\\frac{1}{2}"]:
        expected = [i + cfg["default_num_special_tokens"] for i in enc.encode(text)]
        assert tok.encode(text, add_special_tokens=False) == expected
    assert len(tok) == 131072 and tok.eos_token == "</s>"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("/definitely/not/here", "no such file or folder"),
        ("asset:nope", "unknown asset"),
    ],
)
def test_load_errors_are_one_line(spec, fragment):
    with pytest.raises(TokenizerLoadError) as e:
        load_tokenizer(spec)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_folder_without_tokenizer_and_corrupt_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerLoadError, match="folder has no tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="could not read tokenizer"):
        load_tokenizer(str(bad))
    bad_model = tmp_path / "broken.model"
    bad_model.write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerLoadError, match="could not read tokenizer"):
        load_tokenizer(str(bad_model))
    bad_gguf = tmp_path / "x.gguf"
    bad_gguf.write_bytes(b"GGUFxxxx")
    with pytest.raises(TokenizerLoadError, match="could not read tokenizer"):
        load_tokenizer(str(bad_gguf))


def test_hub_id_offline_fails_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TokenizerLoadError, match="hub id"):
        load_tokenizer("some-org/some-model-that-is-not-cached")


def _facts(tok) -> dict:
    """What must not depend on whether a conversion was cached: vocab, added tokens, normaliser, pre-tokeniser."""
    backend = tok.backend_tokenizer
    return {
        "vocab": tok.get_vocab(),
        "added": {i: str(t) for i, t in tok.added_tokens_decoder.items()},
        "normalizer": backend.normalizer.__getstate__() if backend.normalizer else None,
        "pre_tokenizer": backend.pre_tokenizer.__getstate__() if backend.pre_tokenizer else None,
        "special": tok.all_special_tokens,
    }


@pytest.mark.parametrize("family", ["qwen2", "llama-bpe", "mistral-v1"])
def test_cold_and_warm_conversion_give_the_identical_tokenizer(family, vocab, tmp_path, monkeypatch):
    """The first (converting) load and a load from the conversion cache are the same tokenizer, and the
    pair verdict `rsd compat` prints does not depend on whether the cache was warm."""
    import copy
    import json
    import shutil

    from rsd_toolkit.bridges import Vocab, analyse, classify
    from rsd_toolkit.bridges.loading import _load_uncached

    vocab(family)
    source = assets.asset_path(family)
    local = tmp_path / source.name
    shutil.copyfile(source, local)
    monkeypatch.setenv("RSD_CACHE", str(tmp_path / "empty-cache"))
    cold = _load_uncached(str(local), False)
    assert list((tmp_path / "empty-cache" / "converted").iterdir()), "the first load converts into the cache"
    warm = _load_uncached(str(local), False)
    assert _facts(cold) == _facts(warm)
    cold_v, warm_v = Vocab.from_tokenizer(cold, name="cold"), Vocab.from_tokenizer(warm, name="warm")
    assert analyse(cold_v, warm_v).verdict == "identical"
    # the case that once differed: the same tokenizer plus <think> tokens, in a folder whose config pads it
    think = copy.deepcopy(warm)
    think.add_tokens(["<think>", "</think>"])
    folder = tmp_path / "think"
    think.save_pretrained(str(folder))
    (folder / "config.json").write_text(json.dumps({"vocab_size": len(think) + 128}))
    think_v = Vocab.from_tokenizer(_load_uncached(str(folder), False), name="think", model_vocab_size=len(think) + 128)
    assert classify(cold_v, think_v) == classify(warm_v, think_v) == "remappable"

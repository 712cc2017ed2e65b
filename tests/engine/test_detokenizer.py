"""Incremental detokenization (byte-level BPE and SentencePiece-style) and stop strings."""
from __future__ import annotations

import json
import random

import pytest

from tests.engine.test_tokenizer import smol  # noqa: F401 - session fixture
from tokenmill.engine.detokenizer import IncrementalDetokenizer, StopChecker, backend_decode

TEXTS = [
    "Hello world, how are you today?",
    "Héllo wörld! naïve café — déjà vu, Ångström, ß and œ.",
    "你好，世界。日本語のテキストと한국어 문장도 있습니다。",
    "Emoji: 😀🎉 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 and skin tones 👍🏽!",
    "  leading spaces,\n\tnew lines\n\nand   runs   of   spaces  ",
    "mixed: café😀你好 x² ∑∫ →← ½",
]
SP_SPECIALS = ["<unk>", "<s>", "</s>"]
SP_CORPUS = ["Hello world, this is a tiny tokenizer for tests.", "The quick brown fox jumps over the lazy dog.",
             "Streaming text must keep the spaces between words intact!", "numbers 0123456789 and symbols ()[]{}<>?"]


def build_sentencepiece_style():
    """A Llama-2-like tokenizer: BPE over '▁'-marked words, byte fallback, strip-first-space decoder, BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base.train_from_iterator(SP_CORPUS * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=SP_SPECIALS,
                                                                show_progress=False))
    spec = json.loads(base.to_str())["model"]
    vocab = dict(spec["vocab"])
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SP_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def sp():
    return build_sentencepiece_style()


def stream(tok, prompt, ids, chunk=1, **kw):
    """Feed `ids` `chunk` at a time; return (deltas, final text)."""
    d = IncrementalDetokenizer(tok, prompt, **kw)
    deltas = [d.update(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(d.flush())
    assert d.output_text == "".join(deltas)
    return deltas, "".join(deltas)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_matches_full_decode(smol, text, chunk):  # noqa: F811
    ids = smol.encode(text)
    prompt = smol.encode(smol.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                  tokenize=False), add_special_tokens=False)
    for p in (prompt, []):
        deltas, out = stream(smol, p, ids, chunk)
        assert out == smol.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)  # never a partial character
    if chunk == 1 and any(ord(c) > 0x7FF for c in text):
        assert "" in deltas[:-1]  # some token ended inside a character and was held back


def test_byte_level_random_ids_match_full_decode(smol):  # noqa: F811
    rng = random.Random(0)
    for _ in range(5):
        ids = [rng.randrange(len(smol)) for _ in range(200)]
        prompt = [rng.randrange(len(smol)) for _ in range(10)]
        assert stream(smol, prompt, ids, rng.choice([1, 2, 5]))[1] == smol.decode(ids, skip_special_tokens=True)


def test_special_tokens_kept_or_skipped(smol):  # noqa: F811
    ids = smol.encode("Hi<|im_end|>\n<|im_start|>assistant\nthere 😀<|im_end|>")
    assert stream(smol, [], ids)[1] == "Hi\nassistant\nthere 😀"
    assert stream(smol, [], ids, skip_special_tokens=False)[1] == smol.decode(ids, skip_special_tokens=False)
    assert "<|im_end|>" in smol.decode(ids, skip_special_tokens=False)


def test_unfinished_character_is_held_until_flush(smol):  # noqa: F811
    ids = smol.encode("ok 😀")
    cut = ids[:-1]  # the emoji's last byte token is missing
    d = IncrementalDetokenizer(smol, [])
    streamed = "".join(d.update([t]) for t in cut)
    assert streamed == "ok" and "\ufffd" not in streamed
    tail = d.flush()
    assert streamed + tail == smol.decode(cut) and tail.endswith("\ufffd")


def test_window_stays_small(smol):  # noqa: F811
    """Each step decodes a few recent ids, never the whole output."""
    lengths = []

    class Recording:
        def __init__(self, tok):
            self.tok = tok

        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return self.tok.decode(ids, **kw)

    ids = smol.encode(" ".join(TEXTS) * 4)
    assert len(ids) > 400
    assert stream(Recording(smol), [], ids)[1] == smol.decode(ids)
    assert max(lengths) <= 8


@pytest.mark.parametrize("text", TEXTS + ["Hello world, this is a tiny test."])
def test_sentencepiece_style(sp, text):
    ids = sp.encode(text, add_special_tokens=False)
    if any(ord(c) > 127 for c in text):
        assert any(t.startswith("<0x") for t in sp.convert_ids_to_tokens(ids))  # byte fallback in play
    # With no prompt: exactly the full decode (first token's leading space stripped, later ones kept).
    for chunk in (1, 2):
        deltas, out = stream(sp, [], ids, chunk)
        assert out == sp.decode(ids, skip_special_tokens=True)
        assert not any("\ufffd" in d for d in deltas)
    # After a prompt: the continuation of the prompt's text, spaces between words intact.
    prompt = sp.encode("The quick brown fox")
    full, ref = sp.decode(prompt + ids, skip_special_tokens=True), sp.decode(prompt, skip_special_tokens=True)
    out = stream(sp, prompt, ids)[1]
    assert out == full[len(ref):]
    assert out == " " + sp.decode(ids, skip_special_tokens=True)  # every text starts with a '▁' word


def test_sentencepiece_spaces_survive_window_starts(sp):
    ids = sp.encode("Hello world this is a tiny tokenizer", add_special_tokens=False)
    pieces = sp.convert_ids_to_tokens(ids)
    assert sum(p.startswith("▁") for p in pieces) >= 6  # many windows begin with a leading-space token
    deltas, out = stream(sp, sp.encode("x"), ids)
    assert out == " Hello world this is a tiny tokenizer"
    assert deltas[:-1] == [p.replace("▁", " ") for p in pieces]  # one delta per token, its space kept
    assert stream(sp, [sp.bos_token_id], ids)[1] == "Hello world this is a tiny tokenizer"  # BOS is no text


def test_backend_decode_is_the_tokenizers_decode(smol, sp):  # noqa: F811
    """The Rust decode the detokenizer calls directly gives what tokenizer.decode gives, special tokens kept
    or skipped; a tokenizer that overrides decoding (or is no transformers one) keeps its own decode."""
    rng = random.Random(2)
    for tok in (smol, sp):
        fast = backend_decode(tok)
        assert fast is not None
        for _ in range(200):
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 9))]
            for skip in (True, False):
                assert fast(ids, skip_special_tokens=skip) == tok.decode(
                    ids, skip_special_tokens=skip, spaces_between_special_tokens=True,
                    clean_up_tokenization_spaces=False)

    class Shouting(type(smol)):
        def _decode(self, token_ids, **kw):
            return super()._decode(token_ids, **kw).upper()

    loud = Shouting.__new__(Shouting)
    loud.__dict__.update(smol.__dict__)
    assert backend_decode(loud) is None
    ids = smol.encode("hello there")
    assert stream(loud, [], ids)[1] == "HELLO THERE"
    assert backend_decode(object()) is None


# ---------------------------------------------------------------- stop strings

def run_stop(deltas, stop, include=False):
    sc = StopChecker(stop, include)
    shown, stopped = [], False
    for d in deltas:
        text, stopped = sc.process(d)
        shown.append(text)
        if stopped:
            break
    if not stopped:
        shown.append(sc.flush())
    return shown, stopped


def test_stop_across_deltas():
    shown, stopped = run_stop(["Hel", "lo ST", "OP more"], ["STOP"])
    assert stopped and "".join(shown) == "Hello "
    assert shown == ["Hel", "lo ", ""]  # "ST" was withheld, never shown
    shown, stopped = run_stop(["Hel", "lo ST", "OP more"], ["STOP"], include=True)
    assert stopped and "".join(shown) == "Hello STOP"


def test_withheld_tail_is_released_when_not_a_stop():
    sc = StopChecker(["</answer>"], False)
    assert sc.process("x </ans") == ("x ", False)
    assert sc.process("w") == ("", False)  # "</answ" still may become the stop string
    assert sc.process("x") == ("</answx", False)  # no longer a prefix of it
    assert sc.process("er </") == ("er ", False)
    assert sc.flush() == "</"
    assert sc.flush() == ""


def test_earliest_match_wins():
    assert run_stop(["hello world"], ["world", "lo w"]) == (["hel"], True)
    assert run_stop(["hello world"], ["lo w", "lo"], include=True) == (["hello w"], True)  # list order at a tie
    sc = StopChecker(["b"], False)
    assert sc.process("abab") == ("a", True)
    assert sc.process("more") == ("", True) and sc.flush() == ""


def test_no_stop_strings_pass_through():
    sc = StopChecker([], True)
    assert sc.process("anything") == ("anything", False) and sc.flush() == ""


@pytest.mark.parametrize("include", [False, True])
def test_stop_random_splits_match_reference(include):
    rng = random.Random(1)
    alphabet = "ab\n<|>"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        stop = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 3))]
        hits = [(text.find(s), k, s) for k, s in enumerate(stop) if s in text]
        if hits:
            i, _, s = min(hits)
            ref = text[: i + len(s)] if include else text[:i]
        else:
            ref = text
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randrange(0, 6))))
        deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        shown, stopped = run_stop(deltas, stop, include)
        assert "".join(shown) == ref and stopped == bool(hits)
        so_far = ""
        for piece in shown:  # the stream never shows text it would take back
            so_far += piece
            assert ref.startswith(so_far)


def test_detokenizer_and_stop_together(smol):  # noqa: F811
    text = "The answer is 42 😀.\nUser: next question"
    ids = smol.encode(text)
    d, sc = IncrementalDetokenizer(smol, []), StopChecker(["\nUser:"], False)
    shown = []
    for t in ids:
        piece, stopped = sc.process(d.update([t]))
        shown.append(piece)
        if stopped:
            break
    assert stopped and "".join(shown) == "The answer is 42 😀."
    assert "".join(shown) == smol.decode(ids)[: smol.decode(ids).index("\nUser:")]

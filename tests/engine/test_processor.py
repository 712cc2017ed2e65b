"""Processor: chat template rendering, tokenization and request validation."""
from __future__ import annotations

import pytest

from tests.engine.test_detokenizer import sp  # noqa: F401 - session fixture
from tests.engine.test_tokenizer import smol  # noqa: F401 - session fixture
from tokenmill.engine.processor import Processor
from tokenmill.errors import InvalidRequestError, PromptTooLongError
from tokenmill.sampling_params import SamplingParams

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture()
def proc(smol):  # noqa: F811
    return Processor(smol, max_model_len=64, vocab_size=49152)


def test_smollm2_chatml(proc, smol):  # noqa: F811
    ids = proc.apply_chat_template([{"role": "user", "content": "Hi there"}])
    expected = SMOL_SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert smol.decode(ids, skip_special_tokens=False) == expected
    assert ids == smol.encode(expected, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> / <|im_end|> single tokens


def test_chatml_system_and_no_generation_prompt(proc, smol):  # noqa: F811
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    text = smol.decode(proc.apply_chat_template(msgs, add_generation_prompt=False), skip_special_tokens=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4<|im_end|>\n")


def test_content_parts_are_joined(proc, smol):  # noqa: F811
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    text = smol.decode(proc.apply_chat_template([{"role": "user", "content": parts}]), skip_special_tokens=False)
    assert "<|im_start|>user\nline one\nline two<|im_end|>" in text


@pytest.mark.parametrize("messages", [
    [],
    "hello",
    [{"content": "no role"}],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": 3, "content": "x"}],
    [{"role": "user", "content": 5}],
    ["not an object"],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"role": "user", "content": [{"type": "text"}]}],
])
def test_bad_messages(proc, messages):
    with pytest.raises(InvalidRequestError):
        proc.apply_chat_template(messages)


def test_template_errors_become_request_errors(proc):
    raising = "{{ raise_exception('only user turns, please') }}"
    with pytest.raises(InvalidRequestError, match="only user turns"):
        proc.apply_chat_template([{"role": "user", "content": "x"}], chat_template=raising)
    with pytest.raises(InvalidRequestError):  # SmolLM2's template concatenates the content
        proc.apply_chat_template([{"role": "assistant", "content": None,
                                   "tool_calls": [{"id": "1", "type": "function"}]}])
    with pytest.raises(InvalidRequestError):  # the sandbox refuses attribute access to internals
        proc.apply_chat_template([{"role": "user", "content": "x"}],
                                 chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")


def test_no_template_is_an_error_unless_given(sp):  # noqa: F811
    p = Processor(sp, max_model_len=32, vocab_size=len(sp))
    msgs = [{"role": "user", "content": "Hello world"}]
    with pytest.raises(InvalidRequestError, match="no chat template"):
        p.apply_chat_template(msgs)
    template = "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
    ids = p.apply_chat_template(msgs, chat_template=template)
    assert ids[0] == sp.bos_token_id and ids.count(sp.bos_token_id) == 1  # the template's BOS, not twice
    assert sp.decode(ids, skip_special_tokens=True) == "[user] Hello world"


def test_extra_template_kwargs(proc, smol):  # noqa: F811
    template = "{% if shout %}LOUD {% endif %}{{ messages[0].content }}"
    ids = proc.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, shout=True)
    assert smol.decode(ids) == "LOUD hi"


def test_tokenize(proc, sp):  # noqa: F811
    assert proc.tokenize("hello") == [28120]  # SmolLM2 adds no BOS
    assert proc.tokenize([5, 6, 7]) == [5, 6, 7]
    p = Processor(sp, max_model_len=32, vocab_size=len(sp))
    bos = sp.bos_token_id
    ids = p.tokenize("Hello world")
    assert ids[0] == bos and ids.count(bos) == 1
    assert sp.encode("<s>Hello world")[:2] == [bos, bos]  # what a plain encode does
    with_bos = p.tokenize("<s>Hello world")  # a BOS already in the text is not doubled
    assert with_bos == sp.encode("<s>Hello world", add_special_tokens=False) and with_bos.count(bos) == 1
    with pytest.raises(InvalidRequestError):
        proc.tokenize([1, "2"])
    with pytest.raises(InvalidRequestError):
        proc.tokenize([True, 2])
    with pytest.raises(InvalidRequestError):
        proc.tokenize(12)


def test_validate_max_tokens(proc):
    prompt = list(range(10, 20))
    assert proc.validate(prompt, SamplingParams(max_tokens=None)) == 54
    assert proc.validate(prompt, SamplingParams(max_tokens=54)) == 54
    assert proc.validate(prompt, SamplingParams(max_tokens=7)) == 7
    with pytest.raises(PromptTooLongError, match="64") as e:
        proc.validate(prompt, SamplingParams(max_tokens=55))
    assert "10" in e.value.message and "55" in e.value.message and e.value.param == "max_tokens"
    assert e.value.http_status == 400 and e.value.code == "context_length_exceeded"


def test_validate_prompt_errors(proc):
    params = SamplingParams()
    with pytest.raises(InvalidRequestError, match="empty"):
        proc.validate([], params)
    for bad in ([1, -1], [1, 49152], [1, 2.0]):
        with pytest.raises(InvalidRequestError, match="out of range"):
            proc.validate(bad, params)
    with pytest.raises(PromptTooLongError) as e:
        proc.validate([1] * 64, params)
    assert "64 tokens" in e.value.message and "64" in e.value.message.split("length is")[1]
    with pytest.raises(PromptTooLongError, match="70"):
        proc.validate([1] * 70, SamplingParams(max_tokens=None))
    assert proc.validate([1] * 63, SamplingParams(max_tokens=None)) == 1
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        proc.validate([1, 2], SamplingParams(stop_token_ids=[49152]))
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        proc.validate([1, 2], SamplingParams(logit_bias={60000: 1.0}))

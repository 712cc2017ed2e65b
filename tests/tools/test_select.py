"""Choosing the tool-call parser from the chat template."""
from __future__ import annotations

import pytest

from tests.tools.templates import LLAMA31, MISTRAL_V3, MISTRAL_V11, QWEN25
from tokenmill.tools.select import detect_parser, template_supports_tools


@pytest.mark.parametrize("template,expected", [
    (QWEN25, "hermes"), (LLAMA31, "llama3_json"), (MISTRAL_V3, "mistral"), (MISTRAL_V11, "mistral"),
])
def test_tool_templates(template, expected):
    assert template_supports_tools(template)
    assert detect_parser(template) == expected
    assert detect_parser(template, "some_other_type") == expected  # the template wins over the model type


def test_smollm2_template_has_no_tool_support(smollm2_template):
    t = smollm2_template
    assert "im_start" in t
    assert not template_supports_tools(t)
    assert detect_parser(t, "llama") == "generic"


def test_no_template_or_no_tools():
    assert detect_parser(None) == "generic" and not template_supports_tools(None)
    assert not template_supports_tools("{{ messages[0].content }} <tool_call> mentioned in text only")
    assert detect_parser("{{ messages[0].content }} <tool_call>") == "generic"  # tools never reach it


def test_unknown_tool_format_falls_back_to_model_type():
    t = "{% for t in tools %}{{ t | tojson }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert template_supports_tools(t)
    assert detect_parser(t, "qwen2") == "hermes"
    assert detect_parser(t, "mistral") == "mistral"
    assert detect_parser(t, "gpt2") == "generic"
    assert detect_parser(t) == "generic"


def test_unparsable_template_uses_text_search():
    assert template_supports_tools("{% generation %}{{ tools }}{% endgeneration %}")  # HF-only tag
    assert not template_supports_tools("{% generation %}{{ messages }}{% endgeneration %}")

"""Which tool-call format a model speaks, from its chat template (and model type as a hint)."""
from __future__ import annotations

import re
from typing import Optional

# markers a template uses to render tool calls, checked in this order
_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hermes", ("<tool_call>",)),
    ("mistral", ("[TOOL_CALLS]", "[AVAILABLE_TOOLS]")),
    ("llama3_json", ("<|python_tag|>", "Environment: ipython")),
)
# model types whose tool-aware templates use an unrecognized spelling of the family's format
_MODEL_TYPES = {"qwen2": "hermes", "qwen2_moe": "hermes", "qwen3": "hermes", "qwen3_moe": "hermes",
                "llama": "llama3_json", "mistral": "mistral", "mixtral": "mistral"}


def template_supports_tools(chat_template: Optional[str]) -> bool:
    """True when the Jinja template reads a `tools` variable (so OpenAI `tools` reach the prompt
    through it); False for templates like SmolLM2's that only render role and content."""
    if not chat_template:
        return False
    try:
        from jinja2 import meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
        return "tools" in meta.find_undeclared_variables(env.parse(chat_template))
    except Exception:  # a template jinja2 cannot parse here (HF-specific tags): fall back to the text
        return re.search(r"\btools\b", chat_template) is not None


def detect_parser(chat_template: Optional[str], model_type: Optional[str] = None) -> str:
    """The name of the tool-call parser for a model (a key of `TOOL_PARSERS`).

    A template without tool support gets `generic`: tokenmill then renders its own tool prompt, so the
    model answers in the generic format whatever its family."""
    if not template_supports_tools(chat_template):
        return "generic"
    assert chat_template is not None
    for name, markers in _MARKERS:
        if any(m in chat_template for m in markers):
            return name
    return _MODEL_TYPES.get((model_type or "").lower(), "generic")

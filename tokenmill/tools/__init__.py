"""Tool calling (OpenAI `tools` / `tool_choice`): output parsers per model family, parser selection
from the chat template, the generic tool prompt for templates without tool support, request
validation, and the xgrammar constraints that make a required call parse.

Nothing here imports torch; xgrammar and jsonschema are imported only when a request is validated or a
constraint is built."""
from tokenmill.tools.constraints import ToolConstraint, build_tool_constraint
from tokenmill.tools.parsers import TOOL_PARSER_NAMES, ToolCallParser, get_tool_parser
from tokenmill.tools.prompt import (format_call, generic_messages, needs_generic_prompt, render_tool_prompt,
                                    template_messages)
from tokenmill.tools.select import detect_parser, template_supports_tools
from tokenmill.tools.stream import StreamingToolParser
from tokenmill.tools.types import (ContentDelta, Delta, ParsedOutput, ToolCall, ToolCallDelta, assemble,
                                   random_call_id)
from tokenmill.tools.validate import FunctionTool, ToolRequest, ToolValidationError, validate_tools

__all__ = [
    "TOOL_PARSER_NAMES", "ContentDelta", "Delta", "FunctionTool", "ParsedOutput", "StreamingToolParser",
    "ToolCall", "ToolCallDelta", "ToolCallParser", "ToolConstraint", "ToolRequest", "ToolValidationError",
    "assemble", "build_tool_constraint", "detect_parser", "format_call", "generic_messages", "get_tool_parser",
    "needs_generic_prompt", "random_call_id", "render_tool_prompt", "template_messages",
    "template_supports_tools", "validate_tools",
]

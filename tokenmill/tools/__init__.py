"""Tool calling (OpenAI `tools` / `tool_choice`): output parsers per model family, parser selection
from the chat template, the generic tool prompt for templates without tool support, and the grammars
that make a required call parse."""

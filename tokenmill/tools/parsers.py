"""Public face of the tool-call parsers: `get_tool_parser(name)` -> `ToolCallParser` (formats and the
streaming rules are described in `tools/formats.py`)."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from tokenmill.tools.formats import TOOL_PARSERS
from tokenmill.tools.stream import StreamingToolParser
from tokenmill.tools.types import ParsedOutput, assemble

TOOL_PARSER_NAMES: tuple[str, ...] = tuple(TOOL_PARSERS)


class ToolCallParser:
    """Parses one format. `tool_names`: when given, a call to any other name is not a call (its text
    stays content). `id_factory`: makes call ids (default `call_` + 24 alphanumerics; 9 alphanumerics
    for `mistral`, whose templates require that). `stream_arguments`: see `StreamingToolParser`."""

    def __init__(self, name: str, tool_names: Optional[Iterable[str]] = None,
                 id_factory: Optional[Callable[[], str]] = None, stream_arguments: bool = True):
        self.stream_arguments = stream_arguments
        if name not in TOOL_PARSERS:
            raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(TOOL_PARSER_NAMES)}")
        self.name = name
        self._fmt = TOOL_PARSERS[name]()
        self._names = frozenset(tool_names) if tool_names is not None else None
        self._new_id = id_factory or self._fmt.new_id

    @property
    def triggers(self) -> tuple[str, ...]:
        """The strings that may start a call (text is held back while it could be one of them)."""
        return self._fmt.triggers

    def streaming(self) -> StreamingToolParser:
        """A fresh parser for one streamed output."""
        return StreamingToolParser(self._fmt, self._names, self._new_id, self.stream_arguments)

    def parse(self, text: str) -> ParsedOutput:
        """Split a whole output into (content or None, [ToolCall, ...])."""
        sp = self.streaming()
        return assemble(sp.feed(text) + sp.finish())


def get_tool_parser(name: str, tool_names: Optional[Iterable[str]] = None,
                    id_factory: Optional[Callable[[], str]] = None, stream_arguments: bool = True) -> ToolCallParser:
    return ToolCallParser(name, tool_names, id_factory, stream_arguments)

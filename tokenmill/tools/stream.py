"""The streaming tool-call state machine shared by every format (rules in `tools/formats.py`)."""
from __future__ import annotations

from typing import Callable, Optional

from tokenmill.tools.formats import NEED, _Format, parse_call_header
from tokenmill.tools.json_scan import ERR, OK, WS, JsonScanner, compact
from tokenmill.tools.types import ContentDelta, Delta, ToolCallDelta

_TEXT, _OPEN, _HEADER, _ARGS, _OBJ_TAIL, _AFTER_CALL, _BUFFERED = range(7)


class StreamingToolParser:
    """Feed the text deltas of one output; get content and tool-call deltas back.

    `feed(text)` returns the deltas that text completes; `finish()` (once, at the end of the output)
    returns the rest. Their concatenation is the same for any split of the same text.
    `stream_arguments=False` sends each call whole once its JSON is complete and valid (a call whose
    arguments turn out malformed is then content, like any other malformed call)."""

    def __init__(self, fmt: _Format, tool_names: Optional[frozenset], new_id: Callable[[], str],
                 stream_arguments: bool = True):
        self._fmt = fmt
        self._stream_args = stream_arguments
        self._named: Optional[str] = None  # the name of a `name[ARGS]{...}` call being read whole
        self._names = tool_names
        self._new_id = new_id
        self._buf = ""
        self._pos = 0            # text before it is consumed
        self._state = _TEXT
        self._trigger = ""
        self._start = 0          # where the open trigger is (rescanned from start + 1 when no call follows)
        self._obj = 0            # start of the call object or buffered value being read
        self._committed = False  # a call of the open trigger group has been sent
        self._scanner = JsonScanner()
        self._args_depth = 0
        self._ncalls = 0
        self._pending_ws = ""    # trailing whitespace of the content so far (dropped if a call follows)
        self._after_call = False
        self._finished = False
        self._out: list[Delta] = []
        self.in_list = False     # format flag (mistral: inside `[TOOL_CALLS][...]`)

    @property
    def num_calls(self) -> int:
        """Calls started so far (their ids and names were sent)."""
        return self._ncalls

    def feed(self, text: str) -> list[Delta]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._run(eof=False)

    def finish(self) -> list[Delta]:
        if self._finished:
            raise RuntimeError("finish() called twice")
        out = self._run(eof=True)
        self._finished = True
        if self._pending_ws:
            out.append(ContentDelta(self._pending_ws))
            self._pending_ws = ""
        return out

    # ------------------------------------------------------------------ the loop
    def _run(self, eof: bool) -> list[Delta]:
        step = {_TEXT: self._text, _OPEN: self._open, _HEADER: self._header, _ARGS: self._args,
                _OBJ_TAIL: self._obj_tail, _AFTER_CALL: self._after, _BUFFERED: self._buffered}
        while step[self._state](eof):
            pass
        self._trim()
        out, self._out = self._out, []
        return out

    def _trim(self) -> None:
        if self._state in (_OPEN, _HEADER, _BUFFERED) and not self._committed:
            keep = self._start
        elif self._state in (_HEADER, _BUFFERED):
            keep = self._obj
        else:
            keep = self._pos
        if keep > 0:
            self._buf = self._buf[keep:]
            self._pos -= keep
            self._start -= keep
            self._obj -= keep

    # ------------------------------------------------------------------ emitting
    def _content(self, text: str) -> None:
        if not text:
            return
        if self._after_call:
            text = text.lstrip(WS)
            if not text:
                return
            self._after_call = False
        text = self._pending_ws + text
        body = text.rstrip(WS)
        self._pending_ws = text[len(body):]
        if body:
            self._out.append(ContentDelta(body))

    def _start_call(self, name: str) -> None:
        self._pending_ws = ""
        self._committed = True
        self._out.append(ToolCallDelta(self._ncalls, self._new_id(), name, ""))
        self._ncalls += 1

    def _arguments(self, piece: str) -> None:
        if piece:
            self._out.append(ToolCallDelta(self._ncalls - 1, arguments=piece))

    def _to_text(self, pos: int) -> bool:
        """Close the trigger group; ordinary text resumes at `pos`."""
        if self._committed:
            self._after_call = True
        self._committed = False
        self._state, self._pos = _TEXT, pos
        return True

    def _fail(self, pos: int) -> bool:
        """What follows the trigger is not a call: before a commit the trigger's first character is
        content and scanning resumes after it; after one, text resumes at `pos`."""
        if self._committed:
            return self._to_text(pos)
        self._content(self._buf[self._start])
        self._state, self._pos = _TEXT, self._start + 1
        return True

    # ------------------------------------------------------------------ states
    def _text(self, eof: bool) -> bool:
        s, i = self._buf, self._pos
        best, trig = -1, ""
        for t in self._fmt.triggers:
            k = s.find(t, i)
            if k != -1 and (best == -1 or k < best or (k == best and len(t) > len(trig))):
                best, trig = k, t
        if best != -1:
            self._content(s[i:best])
            self._state, self._start, self._trigger = _OPEN, best, trig
            self._pos = best + len(trig)
            return True
        hold = 0
        if not eof:
            tail = s[i:]
            for t in self._fmt.triggers:
                for k in range(min(len(t) - 1, len(tail)), hold, -1):
                    if tail.endswith(t[:k]):
                        hold = k
                        break
        self._content(s[i:len(s) - hold])
        self._pos = len(s) - hold
        return False

    def _open(self, eof: bool) -> bool:
        return self._act(self._fmt.open(self, self._buf, self._trigger, self._pos, eof), eof)

    def _after(self, eof: bool) -> bool:
        return self._act(self._fmt.close(self, self._buf, self._pos, eof), eof)

    def _act(self, action: tuple, eof: bool) -> bool:
        kind = action[0]
        if kind == "need":
            if not eof:
                return False
            if self._state == _AFTER_CALL:  # the output ended inside a call's closing syntax
                return self._to_text(len(self._buf))
            return self._fail(self._pos)
        if kind == "fail":
            return self._fail(self._pos)
        if kind in ("text", "error"):
            return self._to_text(action[1])
        if kind == "call":
            self._state, self._obj = _HEADER, action[1]
            return True
        if kind == "buffer":
            return self._begin_buffer(action[1])
        # ("named", name, index of the arguments' `{`)
        _, name, at = action
        if self._names is not None and name not in self._names:
            return self._fail(at)
        if not self._stream_args:
            self._begin_buffer(at)
            self._named = name
            return True
        self._start_call(name)
        self._begin_args(at, at, 1)
        return True

    def _header(self, eof: bool) -> bool:
        r = parse_call_header(self._buf, self._obj, self._names)
        if r == NEED and not eof:
            return False
        if isinstance(r, tuple) and not self._stream_args:
            return self._begin_buffer(self._obj)
        if isinstance(r, tuple):
            name, at = r
            self._start_call(name)
            self._begin_args(self._obj, at, 2)
            return True
        if self._fmt.fallback:
            return self._begin_buffer(self._obj)
        return self._fail(self._obj)

    def _begin_args(self, obj: int, at: int, depth: int) -> None:
        """Feed the scanner the call object up to and including the arguments' `{` at `at`."""
        sc = self._scanner = JsonScanner()
        for c in self._buf[obj:at + 1]:
            sc.feed(c)
        self._arguments("{")
        self._args_depth, self._pos, self._state = depth, at + 1, _ARGS

    def _args(self, eof: bool) -> bool:
        s, sc, d = self._buf, self._scanner, self._args_depth
        i, piece = self._pos, []
        while i < len(s):
            c = s[i]
            r = sc.feed(c)
            if r == ERR:
                self._arguments("".join(piece))
                return self._to_text(i)
            i += 1
            if r == OK:
                piece.append(c)
                if sc.depth < d:  # the arguments closed
                    self._arguments("".join(piece))
                    self._pos = i
                    self._state = _AFTER_CALL if sc.done else _OBJ_TAIL
                    return True
        self._arguments("".join(piece))
        self._pos = i
        return self._to_text(i) if eof else False

    def _obj_tail(self, eof: bool) -> bool:
        """The rest of the call object after its arguments (other keys are read and ignored)."""
        s, sc, i = self._buf, self._scanner, self._pos
        while i < len(s):
            if sc.feed(s[i]) == ERR:
                return self._to_text(i)
            i += 1
            if sc.done:
                self._state, self._pos = _AFTER_CALL, i
                return True
        self._pos = i
        return self._to_text(i) if eof else False

    def _begin_buffer(self, at: int) -> bool:
        self._state, self._obj, self._pos, self._named = _BUFFERED, at, at, None
        self._scanner = JsonScanner()
        return True

    def _buffered(self, eof: bool) -> bool:
        """A call in an unusual shape: read the whole JSON value, then decide."""
        s, sc, i = self._buf, self._scanner, self._pos
        while i < len(s):
            if sc.feed(s[i]) == ERR:
                return self._fail(self._obj)
            i += 1
            if sc.done:
                text = compact(s[self._obj:i])
                if self._named is not None:
                    calls = [(self._named, text)] if text.startswith("{") else None
                else:
                    calls = self._fmt.calls_from_text(text, self._names)
                if calls is None:
                    return self._fail(self._obj)
                for name, args in calls:
                    self._start_call(name)
                    self._arguments(args)
                self._state, self._pos = _AFTER_CALL, i
                return True
        self._pos = i
        return self._fail(self._obj) if eof else False

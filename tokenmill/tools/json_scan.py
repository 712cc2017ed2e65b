"""A character-at-a-time JSON validator for streamed tool-call arguments.

`JsonScanner.feed(ch)` says whether `ch` keeps the text a valid prefix of one JSON object or array
(strict RFC 8259: no NaN, no single quotes, no trailing commas), whether it is insignificant whitespace
(dropped from compact arguments), and tracks the nesting depth, so a caller knows the exact character
where a value closes or goes wrong without waiting for more text.
"""
from __future__ import annotations

import json
from typing import Optional, Union

WS = " \t\n\r"
OK, SKIP, ERR = 1, 2, 0  # feed() results: significant char, insignificant whitespace, invalid

# states
_VALUE, _KEY_OR_END, _KEY, _COLON, _AFTER, _ARR_FIRST, _STRING, _NUMBER, _LITERAL, _DONE = range(10)
_HEX = set("0123456789abcdefABCDEF")
# number sub-states; the terminal ones may end the number
_N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_E, _N_ESIGN, _N_EXP = range(8)
_N_TERMINAL = {_N_ZERO, _N_INT, _N_FRAC, _N_EXP}


def _number_step(sub: int, c: str) -> Optional[int]:
    digit = "0" <= c <= "9"
    if sub == _N_MINUS:
        return _N_ZERO if c == "0" else _N_INT if digit else None
    if sub in (_N_ZERO, _N_INT):
        if digit:
            return _N_INT if sub == _N_INT else None
        return _N_DOT if c == "." else _N_E if c in "eE" else None
    if sub in (_N_DOT, _N_FRAC):
        if digit:
            return _N_FRAC
        return _N_E if sub == _N_FRAC and c in "eE" else None
    if sub == _N_E:
        return _N_ESIGN if c in "+-" else _N_EXP if digit else None
    return _N_EXP if digit else None  # _N_ESIGN, _N_EXP


class JsonScanner:
    """Validates one top-level JSON object or array, one character at a time."""

    __slots__ = ("stack", "state", "key", "esc", "num", "lit")

    def __init__(self) -> None:
        self.stack: list[str] = []   # open containers, "{" or "["
        self.state = _VALUE
        self.key = False             # the string being read is an object key
        self.esc = 0                 # 0 none, 1 after backslash, 2..5 hex digits of \\u left + 1
        self.num = 0
        self.lit = ""                # rest of true/false/null

    @property
    def depth(self) -> int:
        return len(self.stack)

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def _end_value(self) -> None:
        self.state = _AFTER if self.stack else _DONE

    def feed(self, c: str) -> int:
        st = self.state
        if st == _STRING:
            if self.esc == 1:
                if c == "u":
                    self.esc = 5
                elif c in '"\\/bfnrt':
                    self.esc = 0
                else:
                    return ERR
                return OK
            if self.esc:
                if c not in _HEX:
                    return ERR
                self.esc = 0 if self.esc == 2 else self.esc - 1
                return OK
            if c == '"':
                if self.key:
                    self.state = _COLON
                else:
                    self._end_value()
            elif c == "\\":
                self.esc = 1
            elif c < " ":
                return ERR
            return OK
        if st == _NUMBER:
            nxt = _number_step(self.num, c)
            if nxt is not None:
                self.num = nxt
                return OK
            if self.num not in _N_TERMINAL:
                return ERR
            self._end_value()  # the number ended (numbers are never top level); c is read below
            st = self.state
        elif st == _LITERAL:
            if c != self.lit[0]:
                return ERR
            self.lit = self.lit[1:]
            if not self.lit:
                self._end_value()
            return OK
        if st == _DONE:
            return ERR
        if c in WS:
            return SKIP
        if st in (_VALUE, _ARR_FIRST):
            if st == _ARR_FIRST and c == "]":
                self.stack.pop()
                self._end_value()
            elif c in "{[":
                self.stack.append(c)
                self.state = _KEY_OR_END if c == "{" else _ARR_FIRST
            elif not self.stack:
                return ERR  # the top level is an object or an array
            elif c == '"':
                self.state, self.key = _STRING, False
            elif c == "-" or "0" <= c <= "9":
                self.state, self.num = _NUMBER, (_N_MINUS if c == "-" else _N_ZERO if c == "0" else _N_INT)
            elif c in "tfn":
                self.state, self.lit = _LITERAL, {"t": "rue", "f": "alse", "n": "ull"}[c]
            else:
                return ERR
            return OK
        if st in (_KEY_OR_END, _KEY):
            if c == '"':
                self.state, self.key = _STRING, True
            elif c == "}" and st == _KEY_OR_END:
                self.stack.pop()
                self._end_value()
            else:
                return ERR
            return OK
        if st == _COLON:
            if c != ":":
                return ERR
            self.state = _VALUE
            return OK
        # _AFTER: a value inside a container ended
        top = self.stack[-1]
        if c == ",":
            self.state = _KEY if top == "{" else _VALUE
        elif (c == "}" and top == "{") or (c == "]" and top == "["):
            self.stack.pop()
            self._end_value()
        else:
            return ERR
        return OK


NEED = "need"  # scan_string result: the text ends before the string does


def scan_string(s: str, i: int) -> Union[int, str, None]:
    """`s[i]` is `"`: return the index just past the closing quote, NEED when `s` ends first, or None
    when the string is invalid JSON (bad escape, raw control character)."""
    j, n = i + 1, len(s)
    while j < n:
        c = s[j]
        if c == '"':
            return j + 1
        if c == "\\":
            if j + 1 >= n:
                return NEED
            e = s[j + 1]
            if e == "u":
                hexs = s[j + 2:j + 6]
                if any(h not in _HEX for h in hexs):
                    return None
                if len(hexs) < 4:
                    return NEED
                j += 6
                continue
            if e not in '"\\/bfnrt':
                return None
            j += 2
            continue
        if c < " ":
            return None
        j += 1
    return NEED


def skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in WS:
        i += 1
    return i


def compact(text: str) -> str:
    """A complete JSON object or array with its insignificant whitespace removed (everything else,
    escapes and number spellings included, stays as written: the same text streaming sends)."""
    sc = JsonScanner()
    out = []
    for c in text.strip(WS):
        r = sc.feed(c)
        if r == ERR:
            raise ValueError("invalid JSON")
        if r == OK:
            out.append(c)
    if not sc.done:
        raise ValueError("not one complete JSON object or array")
    return "".join(out)


def members(compact_text: str) -> list[tuple[Optional[str], str]]:
    """The top-level members of a compact JSON object ((key, value text)) or array ((None, value text))."""
    dec = json.JSONDecoder()
    is_obj = compact_text[0] == "{"
    out: list[tuple[Optional[str], str]] = []
    i = 1
    if compact_text[i] in "}]":
        return out
    while True:
        key = None
        if is_obj:
            key, i = dec.raw_decode(compact_text, i)
            i += 1  # ':'
        start = i
        _, i = dec.raw_decode(compact_text, i)
        out.append((key, compact_text[start:i]))
        if compact_text[i] != ",":
            return out
        i += 1

"""Reads a call array (`[{"name": ..., "arguments": ...}, ...]`) as its text grows, one
character at a time: each call's name once its string is complete, and its arguments' raw JSON
text as far as it has come. Streamed deltas and the whole reply both take a call's arguments from
here, so the fragments of a stream join into exactly the arguments of the same reply unstreamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

CALL = 2  # nesting depth of a call object's own fields: inside "[" and "{"


@dataclass(slots=True)
class ScannedCall:
    name: str | None = None
    start: int | None = None  # where the arguments' JSON value begins in the scanned text
    end: int | None = None  # where it ends (exclusive), once it has


class CallScanner:
    def __init__(self):
        self.text, self.pos = "", 0
        self.stack: list[str] = []  # open brackets
        self.in_string = self.escape = False
        self.string_start = 0
        self.key: str | None = None  # the call field last named
        self.colon = False  # a call field's value comes next
        self.value: str | None = None  # the call field whose value is being read
        self.calls: list[ScannedCall] = []

    def feed(self, more: str) -> None:
        self.text += more
        while self.pos < len(self.text):
            self._step(self.text[self.pos])
            self.pos += 1

    def arguments(self, call: ScannedCall) -> str:
        """The call's arguments as far as they have come ("" before they begin)."""
        if call.start is None:
            return ""
        return self.text[call.start : call.end if call.end is not None else len(self.text)]

    def _step(self, ch: str) -> None:
        if self.in_string:
            self._in_string(ch)
            return
        if len(self.stack) == CALL and self.colon and not ch.isspace():
            self._value_begins()
        if ch == '"':
            self.in_string, self.string_start = True, self.pos
        elif ch in "[{":
            self.stack.append(ch)
            if len(self.stack) == CALL:
                self.calls.append(ScannedCall())
        elif ch in "]}":
            self._close()
        elif len(self.stack) == CALL and ch in ":,":
            self._scalar_ends()
            self.colon = ch == ":"

    def _in_string(self, ch: str) -> None:
        if self.escape:
            self.escape = False
        elif ch == "\\":
            self.escape = True
        elif ch == '"':
            self.in_string = False
            if len(self.stack) == CALL:
                self._call_string(self.text[self.string_start : self.pos + 1])

    def _value_begins(self) -> None:
        self.colon, self.value = False, self.key
        if self.value == "arguments" and self.calls:
            self.calls[-1].start = self.pos

    def _call_string(self, literal: str) -> None:
        """A string among a call's own fields: a field name, or the value of one."""
        if self.value is None:
            self.key = json.loads(literal)
            return
        if self.value == "name" and self.calls:
            self.calls[-1].name = json.loads(literal)
        self._ends(self.pos + 1)

    def _close(self) -> None:
        if len(self.stack) == CALL:  # the call object closes: a scalar value ends here
            self._scalar_ends()
        if self.stack:
            self.stack.pop()
        if len(self.stack) == CALL and self.value is not None:  # an object or array value
            self._ends(self.pos + 1)

    def _scalar_ends(self) -> None:
        if self.value is not None:
            self._ends(self.pos)

    def _ends(self, at: int) -> None:
        if self.value == "arguments" and self.calls and self.calls[-1].end is None:
            self.calls[-1].end = at
        self.value, self.key = None, None

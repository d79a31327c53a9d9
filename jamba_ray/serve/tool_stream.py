"""A streamed reply split into content deltas and tool-call deltas.

Text that may begin the start tag is held back. `incremental` (a forced call, whose grammar
guarantees its form): each call goes out as it is generated, as vLLM's parsers send it: first its
index, id and name, then fragments of its arguments' JSON text. Otherwise (tool_choice auto) a
block goes out whole once it closes, or as content if it turns out not to be calls.
"""

from __future__ import annotations

from .tool_scan import CallScanner
from .tools import END, START, call, read_calls


class ToolStream:
    def __init__(self, incremental: bool = False):
        self.incremental = incremental
        self.buffer, self.inside, self.count = "", False, 0  # count: calls sent in closed blocks
        self.scan, self.sent = CallScanner(), {}  # per call of the open block: arguments sent

    def push(self, delta: str) -> tuple[str, list[dict]]:
        self.buffer += delta
        content, calls = "", []
        while True:
            if not self.inside:
                at = self.buffer.find(START)
                cut = at if at != -1 else len(self.buffer) - _prefix_len(self.buffer, START)
                content, self.buffer = content + self.buffer[:cut], self.buffer[cut:]
                if at == -1:
                    return content, calls
                self.buffer, self.inside = self.buffer[len(START) :], True
                self.scan, self.sent = CallScanner(), {}
            end = self.buffer.find(END)
            if end == -1:  # (text that may begin the end tag waits)
                safe = len(self.buffer) - _prefix_len(self.buffer, END)
                return content, calls + self._progress(self.buffer[:safe])
            body, self.buffer = self.buffer[:end], self.buffer[end + len(END) :]
            text, found = self._close(body, START + body + END)
            content, calls = content + text, calls + found

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the reply: a block never closed is read as it stands (a forced call cut
        short keeps what was sent of it), else it is content."""
        if not self.inside:
            block, self.buffer = self.buffer, ""
            return block, []
        body, self.buffer = self.buffer, ""
        return self._close(body, START + body)

    def _progress(self, body: str) -> list[dict]:
        """Deltas for what the open block's body (so far) adds: incremental streams only."""
        if not self.incremental:
            return []
        self.scan.feed(body[len(self.scan.text) :])
        out = []
        for i, c in enumerate(self.scan.calls):
            if c.name is None:
                break  # (arguments wait for their name)
            if i not in self.sent:
                self.sent[i] = 0
                out.append(call(self.count + i, c.name, ""))
            args = self.scan.arguments(c)
            if len(args) > self.sent[i]:
                out.append(
                    {"index": self.count + i, "function": {"arguments": args[self.sent[i] :]}}
                )
                self.sent[i] = len(args)
        return out

    def _close(self, body: str, block: str) -> tuple[str, list[dict]]:
        self.inside = False
        if self.incremental:
            out = self._progress(body)
            self.count += len(self.sent)
            return "", out
        found = read_calls(body, first=self.count)
        self.count += len(found)
        return ("", found) if found else (block, [])


def _prefix_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (it may still become the tag)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0

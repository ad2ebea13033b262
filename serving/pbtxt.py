"""Protocol-buffer text format (what Triton's `config.pbtxt` is written in), read without its schema.

`protobuf.text_format` needs the message's descriptor and refuses every field it lacks; a Triton config holds
dozens of fields (`instance_group`, `dynamic_batching`, `batch_input`, ...) that gptjax has no use for. This
reads any such file into plain data: a message is a dict from field name to the list of its values (a field
may repeat, or be a `[...]` list), a value is a nested message (dict) or the scalar's text (str; quotes and
escapes resolved).
"""

from __future__ import annotations

import ast
import re

_TOKEN = re.compile(r"""\s+|\#[^\n]*|(?P<tok>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'"""  # space, comment, strings
                    r"""|[{}\[\]<>:,;]|[^\s{}\[\]<>:,;"'\#]+)""")  # punctuation, a name or number
_CLOSE = {"{": "}", "<": ">"}
_PUNCTUATION = set("}[]>:,;")
MAX_DEPTH = 64  # messages inside messages; Triton's configs nest a few deep, and Python's stack ends near 1000


class PbtxtError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, int]]:
    out, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise PbtxtError(f"line {line}: can't read {text[pos:pos + 20]!r}")
        if m.group("tok") is not None:
            out.append((m.group("tok"), line))
        line += m.group(0).count("\n")
        pos = m.end()
    return out


class _Reader:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> str | None:
        return self.toks[self.i][0] if self.i < len(self.toks) else None

    def take(self) -> str:
        if self.i >= len(self.toks):
            line = self.toks[-1][1] if self.toks else 1
            raise PbtxtError(f"line {line}: the file ends inside a message")
        self.i += 1
        return self.toks[self.i - 1][0]

    def fail(self, message: str):
        line = self.toks[min(self.i, len(self.toks) - 1)][1] if self.toks else 1
        raise PbtxtError(f"line {line}: {message}")

    def message(self, close: str | None) -> dict:
        fields: dict[str, list] = {}
        while self.peek() != close:
            if self.peek() is None:
                self.fail(f"expected {close!r} before the end of the file")
            name = self.take()
            if not re.fullmatch(r"[A-Za-z_][\w.]*", name):
                self.fail(f"expected a field name, got {name!r}")
            if self.peek() == ":":
                self.take()
            fields.setdefault(name, []).extend(self.values())
            if self.peek() in (",", ";"):
                self.take()
        if close is not None:
            self.take()
        return fields

    def values(self) -> list:
        if self.peek() != "[":
            return [self.value()]
        self.take()
        items = []
        while self.peek() != "]":
            items.append(self.value())
            if self.peek() == ",":
                self.take()
        self.take()
        return items

    def value(self):
        tok = self.take()
        if tok in _CLOSE:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                self.fail(f"messages nested more than {MAX_DEPTH} deep")
            fields = self.message(_CLOSE[tok])
            self.depth -= 1
            return fields
        if tok[0] in "\"'":
            text = self.string(tok)
            while (self.peek() or " ")[0] in "\"'":  # adjacent strings are one, as in C
                text += self.string(self.take())
            return text
        if tok in _PUNCTUATION:
            self.fail(f"expected a value, got {tok!r}")
        return tok

    def string(self, tok: str) -> str:
        """A quoted token's text, its escapes resolved; a bad escape ("\\x" with no digits) names the line."""
        try:
            return ast.literal_eval(tok)
        except (SyntaxError, ValueError) as e:
            self.i -= 1  # the line of this token
            self.fail(f"bad string {tok[:40]!r} ({e.msg if isinstance(e, SyntaxError) else e})")


def parse(text: str) -> dict[str, list]:
    """The top-level message of a text-format file; raises PbtxtError naming the line of a syntax error."""
    return _Reader(text).message(None)

"""Read shell variable assignments without running a shell.

libvirt-guests' config is a file that ``libvirt-guests.sh`` sources with ``.``, so in
principle it may contain any shell code. guestwarden reads only what can be read
without evaluating anything: assignments (``NAME=value``, several on a line,
optionally after ``export``), with single quotes, double quotes, backslash escapes,
comments and blank lines. Everything else -- a command, a variable reference, a
command substitution, a redirection -- is a ``ShellSyntaxError`` naming its line:
guessing what a shell would make of it could silently change what happens to guests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = frozenset("&|<>()")
_SPACE = frozenset(" \t")
# in double quotes a backslash only escapes these (POSIX 2.2.3)
_DQ_ESCAPABLE = frozenset('$`"\\\n')


class ShellSyntaxError(Exception):
    """Something that is not a plain assignment; ``line`` is where it starts (1-based)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Assignment:
    name: str
    value: str
    line: int


@dataclass(frozen=True)
class _Word:
    text: str
    line: int
    quoted_from: int
    """Index in ``text`` of the first character that came from quotes or an escape
    (``len(text)`` if none): a ``NAME=`` prefix must be plain, unquoted text."""


class _Reader:
    """A cursor over the text that knows its line number."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.line = 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def take(self) -> str:
        char = self.text[self.pos]
        self.pos += 1
        if char == "\n":
            self.line += 1
        return char

    def skip_comment(self) -> None:
        while self.peek() not in ("", "\n"):
            self.take()


def parse_assignments(text: str) -> list[Assignment]:
    """Every assignment, in file order (the last one of a name wins, as in the shell)."""
    reader = _Reader(text)
    out: list[Assignment] = []
    while True:
        words = _statement(reader)
        if words is None:
            return out
        out.extend(_assignments(words))


def _statement(reader: _Reader) -> list[_Word] | None:
    """The words up to the end of a line or a ``;``; None at the end of the text."""
    words: list[_Word] = []
    while True:
        char = reader.peek()
        if char == "":
            return words if words else None
        if char in _SPACE:
            reader.take()
        elif char in ("\n", ";"):
            reader.take()
            if words:
                return words
        elif char == "#":
            reader.skip_comment()  # at the start of a word: a comment
        elif char == "\\" and reader.text.startswith("\\\n", reader.pos):
            reader.take()
            reader.take()  # a line continuation between words
        else:
            words.append(_word(reader))


def _word(reader: _Reader) -> _Word:
    line = reader.line
    parts: list[str] = []
    quoted_from: int | None = None

    def mark_quoted() -> None:
        nonlocal quoted_from
        if quoted_from is None:
            quoted_from = len("".join(parts))

    while True:
        char = reader.peek()
        if char in ("", "\n", ";") or char in _SPACE:
            break
        if char in _OPERATORS:
            raise ShellSyntaxError(reader.line, f"the shell operator {char!r} means a "
                                   "command, not a variable assignment")
        _refuse_expansion(reader, char)
        if char == "'":
            mark_quoted()
            parts.append(_single_quoted(reader))
        elif char == '"':
            mark_quoted()
            parts.append(_double_quoted(reader))
        elif char == "\\":
            reader.take()
            escaped = reader.peek()
            if escaped == "":
                raise ShellSyntaxError(reader.line, "a backslash at the end of the file")
            reader.take()
            if escaped != "\n":  # backslash-newline joins lines
                mark_quoted()
                parts.append(escaped)
        else:
            parts.append(reader.take())
    text = "".join(parts)
    return _Word(text, line, len(text) if quoted_from is None else quoted_from)


def _refuse_expansion(reader: _Reader, char: str) -> None:
    if char == "$":
        following = reader.text[reader.pos:reader.pos + 12].split("\n", 1)[0]
        what = ("a command substitution" if following.startswith("$(")
                else "a variable reference")
        raise ShellSyntaxError(reader.line, f"{what} ({following.strip()!r}...) cannot be "
                               "evaluated without running a shell; write the value itself")
    if char == "`":
        raise ShellSyntaxError(reader.line, "a command substitution (`...`) cannot be "
                               "evaluated without running a shell; write the value itself")


def _single_quoted(reader: _Reader) -> str:
    start = reader.line
    reader.take()
    parts: list[str] = []
    while True:
        char = reader.peek()
        if char == "":
            raise ShellSyntaxError(start, "a single quote that is never closed")
        reader.take()
        if char == "'":
            return "".join(parts)
        parts.append(char)


def _double_quoted(reader: _Reader) -> str:
    start = reader.line
    reader.take()
    parts: list[str] = []
    while True:
        char = reader.peek()
        if char == "":
            raise ShellSyntaxError(start, "a double quote that is never closed")
        if char == '"':
            reader.take()
            return "".join(parts)
        _refuse_expansion(reader, char)
        reader.take()
        if char == "\\" and reader.peek() in _DQ_ESCAPABLE and reader.peek():
            escaped = reader.take()
            if escaped != "\n":
                parts.append(escaped)
        else:
            parts.append(char)


def _assignments(words: list[_Word]) -> list[Assignment]:
    first = words[0]
    if first.text == "export" and first.quoted_from == len(first.text):
        words = words[1:]
        # `export NAME` (no value) only marks a variable for export: nothing to read
        words = [w for w in words if not _NAME.fullmatch(w.text) or "=" in w.text]
    out = []
    for word in words:
        name, sep, value = word.text.partition("=")
        if not sep or not _NAME.fullmatch(name) or word.quoted_from <= len(name):
            shown = " ".join(w.text for w in words)
            raise ShellSyntaxError(word.line, f"{shown!r} is a shell command, not a variable "
                                   "assignment (NAME=value); guestwarden does not run shell "
                                   "code")
        if value.startswith("~") and word.quoted_from > len(name) + 1:
            raise ShellSyntaxError(word.line, f"{name}: a value starting with an unquoted ~ "
                                   "is a tilde expansion; write the path itself")
        out.append(Assignment(name, value, word.line))
    return out

"""Read libvirt's own config files (``qemu.conf``, ``libvirt.conf``): ``key = value``.

libvirt's format (``virConfParse``): one ``key = value`` per statement, ``#`` starts
a comment, a value is a string in double or single quotes, an integer, or a list
``[ ... ]`` of those that may span lines. guestwarden reads a few of its keys
(``auto_shutdown_*`` to detect libvirt's in-daemon auto-shutdown, ``uri_default``
to know what libvirt-guests' ``URIS=default`` meant), so this reader is lenient: a
statement it cannot read is reported in ``problems`` and skipped, and the keys around
it are still found -- libvirt itself refuses such a file, and then it is not libvirt
that will act on guests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r]+)
  | (?P<comment>\#[^\n]*)
  | (?P<newline>\n)
  | (?P<key>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'[^'\n]*')
  | (?P<number>[+-]?\d+)
  | (?P<punct>[=\[\],])
    """,
    re.VERBOSE,
)

Value = str | int | list[str | int]


@dataclass(frozen=True)
class Setting:
    value: Value
    line: int


@dataclass(frozen=True)
class LibvirtConf:
    path: Path
    settings: dict[str, Setting] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


def read_libvirt_conf(path: Path) -> LibvirtConf | None:
    """The file's settings; None if it does not exist (libvirt's defaults apply)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    settings, problems = parse_libvirt_conf(text)
    return LibvirtConf(path, settings, tuple(f"{path} {p}" for p in problems))


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, line); kind "bad" for a character that starts no token."""
    out: list[tuple[str, str, int]] = []
    pos, line = 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            out.append(("bad", text[pos], line))
            pos += 1
            continue
        kind = match.lastgroup or "bad"
        if kind == "newline":
            line += 1
        elif kind not in ("space", "comment"):
            out.append((kind, match.group(), line))
        pos = match.end()
    return out


def parse_libvirt_conf(text: str) -> tuple[dict[str, Setting], list[str]]:
    tokens = _tokens(text)
    settings: dict[str, Setting] = {}
    problems: list[str] = []
    i = 0
    while i < len(tokens):
        kind, word, line = tokens[i]
        if kind != "key" or i + 1 >= len(tokens) or tokens[i + 1][1] != "=":
            problems.append(f"line {line}: expected `key = value`, found {word!r}")
            i = _next_line(tokens, i, line)
            continue
        value, i = _value(tokens, i + 2)
        if value is None:
            problems.append(f"line {line}: {word}: the value cannot be read")
            i = _next_line(tokens, i, line)
            continue
        settings[word] = Setting(value, line)
    return settings, problems


def _next_line(tokens: list[tuple[str, str, int]], i: int, line: int) -> int:
    while i < len(tokens) and tokens[i][2] == line:
        i += 1
    return i


def _scalar(kind: str, word: str) -> str | int | None:
    if kind == "string":
        inner = word[1:-1]
        return re.sub(r"\\(.)", r"\1", inner) if word[0] == '"' else inner
    if kind == "number":
        return int(word)
    return None


def _value(tokens: list[tuple[str, str, int]], i: int) -> tuple[Value | None, int]:
    if i >= len(tokens):
        return None, i
    kind, word, _line = tokens[i]
    if word != "[":
        return _scalar(kind, word), i + 1
    items: list[str | int] = []
    i += 1
    while i < len(tokens):
        kind, word, _line = tokens[i]
        if word == "]":
            return items, i + 1
        if word == ",":
            i += 1
            continue
        item = _scalar(kind, word)
        if item is None:
            return None, i
        items.append(item)
        i += 1
    return None, i

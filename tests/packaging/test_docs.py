"""The man page and the bash completion say what the command line really accepts.

Everything is read from ``guestwarden.cli.build_parser()`` and the config schema, so
that a new subcommand, option or key fails here until the man page
(packaging/guestwarden.1) and the completion (packaging/guestwarden.bash-completion)
have it too. The man page must render without a single warning from groff and from
man-db; the completion is driven in a real bash, through ``_guestwarden`` with
``COMP_WORDS`` as bash's own completion would set them.

The tools come from ``make deps`` (groff-base, man-db, bash): a missing one fails
these tests, it never skips them.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import typing
from pathlib import Path

import msgspec
import pytest

from guestwarden.cli import build_parser
from guestwarden.conf.settings import Settings
from tests.unit.test_readme import schema_defaults

REPO = Path(__file__).resolve().parents[2]
MANPAGE = REPO / "packaging" / "guestwarden.1"
COMPLETION = REPO / "packaging" / "guestwarden.bash-completion"
EVERYWHERE = {"--help", "--config"}
"""Options every command takes (documented once, under OPTIONS)."""


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: apt-get install {package} (make deps)",
                    pytrace=False)
    return path


# ------------------------------------------------------------------ the parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def leaf_commands() -> dict[str, argparse.ArgumentParser]:
    """"status", "config check", ...: every command path that does something."""
    out: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        children = subparsers(parser)
        if not children and path:
            out[path] = parser
        for name, child in children.items():
            walk(child, f"{path} {name}".strip())

    walk(build_parser(), "")
    return out


def visible(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS]


def long_options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in visible(parser) for o in a.option_strings if o.startswith("--")}


# ------------------------------------------------------------------ the man page


def man_sections() -> dict[str, str]:
    """``.SH`` title -> its roff text."""
    parts = re.split(r"(?m)^\.SH +(.+)$", MANPAGE.read_text())
    return {title.strip('"'): body for title, body in zip(parts[1::2], parts[2::2],
                                                           strict=True)}


def subsections(text: str) -> dict[str, str]:
    parts = re.split(r"(?m)^\.SS +(.+)$", text)
    return {_plain(title.strip('"')): body for title, body in zip(parts[1::2], parts[2::2],
                                                                   strict=True)}


def _plain(roff: str) -> str:
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-")


def test_man_page_renders_without_warnings() -> None:
    groff = tool("groff", "groff-base")
    proc = subprocess.run([groff, "-man", "-Tutf8", "-ww", "-z", str(MANPAGE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    man = tool("man", "man-db")
    proc = subprocess.run([man, "--warnings", "-l", "-Tutf8", str(MANPAGE)],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LC_ALL": "C.UTF-8"})
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    rendered = re.sub(".\b", "", proc.stdout)  # man's bold and underline: overstrikes
    assert "guestwarden preserve [--wait]" in rendered, rendered[:2000]


def test_man_page_has_every_command_and_each_of_its_options() -> None:
    documented = subsections(man_sections()["COMMANDS"])
    commands = leaf_commands()
    assert sorted(documented) == sorted(commands), (
        "COMMANDS of packaging/guestwarden.1 differ from guestwarden.cli.build_parser()")
    for path, parser in commands.items():
        text = _plain(documented[path])
        missing = sorted(o for o in long_options(parser) - EVERYWHERE
                         if not re.search(re.escape(o) + r"\b", text))
        assert not missing, f"man page, command {path!r}: options not described: {missing}"
    top = _plain(man_sections()["OPTIONS"])
    assert all(o in top for o in long_options(build_parser())), "global options"


def test_man_page_describes_every_config_key() -> None:
    text = man_sections()["CONFIGURATION FILE"]
    keys, table = set(), ""
    for line_number, line in enumerate(lines := text.splitlines()):
        header = re.fullmatch(r"\.SS +\"?\[+(\w+)\]+\"?", line)
        if header:
            table = header[1]
        item = re.fullmatch(r"\.B +(\w+)", line)
        if item and line_number and lines[line_number - 1] == ".TP":
            keys.add(f"{table}.{item[1]}" if table else item[1])
    assert keys == set(schema_defaults()), (
        "CONFIGURATION FILE of packaging/guestwarden.1 differs from the config schema")
    tables = subsections(text)
    for name, fields in list_of_tables().items():  # [[rules]]: each field named
        body = _plain(tables[f"[[{name}]]"])
        missing = [f for f in fields if not re.search(rf"\b{f}\b", body)]
        assert not missing, f"[[{name}]] in the man page: {missing} not described"


def list_of_tables() -> dict[str, list[str]]:
    """``{"rules": ["match", "chain", ...]}``: the fields of each ``[[table]]`` list."""
    hints = typing.get_type_hints(Settings)
    out = {}
    for field in msgspec.structs.fields(Settings):
        item = typing.get_args(hints[field.name])
        if item and isinstance(item[0], type) and issubclass(item[0], msgspec.Struct):
            out[field.name] = [f.name for f in msgspec.structs.fields(item[0])]
    return out


# ------------------------------------------------------------------ the completion


def complete_all(queries: list[list[str]], cwd: Path) -> list[list[str]]:
    """COMPREPLY of ``_guestwarden`` for each command line (the last word being typed)."""
    bash = tool("bash", "bash")
    script = [f"source {shlex.quote(str(COMPLETION))}", "complete -p guestwarden"]
    for words in queries:
        script += [f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
                   f"COMP_CWORD={len(words) - 1}", "_guestwarden",
                   'printf "R:%s\\n" "${COMPREPLY[*]}"']
    proc = subprocess.run([bash, "--norc", "--noprofile", "-c", "\n".join(script)],
                          capture_output=True, text=True, timeout=60, check=False, cwd=cwd)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "complete -F _guestwarden guestwarden"
    replies = [line[2:].split() for line in lines[1:] if line.startswith("R:")]
    assert len(replies) == len(queries), proc.stdout
    return replies


def test_bash_completion_offers_exactly_the_parsers_commands_and_options(
    tmp_path: Path,
) -> None:
    parser = build_parser()
    queries: list[list[str]] = [["guestwarden", ""], ["guestwarden", "-"]]
    expected: list[set[str]] = [set(subparsers(parser)), long_options(parser)]
    for name, child in subparsers(parser).items():
        if subparsers(child):  # a group: its subcommands
            queries.append(["guestwarden", name, ""])
            expected.append(set(subparsers(child)))
    for path, leaf in leaf_commands().items():
        queries.append(["guestwarden", "--config", "/x.toml", *path.split(), "-"])
        expected.append(long_options(leaf))
        for action in visible(leaf):
            if action.choices is not None:  # an option with a fixed set of values
                queries.append(["guestwarden", *path.split(), action.option_strings[-1], ""])
                expected.append({str(c) for c in action.choices})
    (tmp_path / "gw-test.toml").write_text("")
    queries.append(["guestwarden", "--config", "gw-te"])  # a file name
    expected.append({"gw-test.toml"})
    for words, got, want in zip(queries, complete_all(queries, tmp_path), expected,
                                strict=True):
        assert set(got) == want, f"completing {' '.join(words)!r}: {sorted(got)} != {sorted(want)}"

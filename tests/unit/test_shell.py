"""Shell assignments read without a shell: what a sourced libvirt-guests config means."""

from __future__ import annotations

import pytest

from guestwarden.conf.shell import Assignment, ShellSyntaxError, parse_assignments


def values(text: str) -> dict[str, str]:
    return {a.name: a.value for a in parse_assignments(text)}


def test_plain_quoted_exported_commented_and_blank() -> None:
    text = (
        "# a comment\n"
        "\n"
        "URIS=default\n"
        "ON_BOOT='start'   # trailing comment\n"
        'export ON_SHUTDOWN="shutdown"\n'
        "   START_DELAY=5\t\n"
        "export SYNC_TIME\n"
    )
    assert parse_assignments(text) == [
        Assignment("URIS", "default", 3),
        Assignment("ON_BOOT", "start", 4),
        Assignment("ON_SHUTDOWN", "shutdown", 5),
        Assignment("START_DELAY", "5", 6),
    ]


def test_quotes_join_and_keep_spaces_and_hashes() -> None:
    got = values("URIS='qemu:///system  xen:///system'\n"
                 'A="one "\'two\'three\n'
                 "B=x#y\n"
                 'C="a # not a comment"\n'
                 "D=\n"
                 "E=''\n")
    assert got == {"URIS": "qemu:///system  xen:///system", "A": "one twothree",
                   "B": "x#y", "C": "a # not a comment", "D": "", "E": ""}


def test_escapes_as_the_shell_reads_them() -> None:
    got = values('A="say \\"hi\\" \\\\ \\n"\n'
                 "B=a\\ b\n"
                 "C='no \\escape'\n")
    assert got == {"A": 'say "hi" \\ \\n', "B": "a b", "C": "no \\escape"}


def test_several_on_a_line_semicolons_and_continuations() -> None:
    text = "A=1 B=2; C=3\nD='multi\nline'\nE=x\\\ny\n"
    assert parse_assignments(text) == [
        Assignment("A", "1", 1), Assignment("B", "2", 1), Assignment("C", "3", 1),
        Assignment("D", "multi\nline", 2), Assignment("E", "xy", 4)]
    # `F=\<newline>  4` is `F=` followed by the command `4`: refused, not guessed
    with pytest.raises(ShellSyntaxError, match="shell command"):
        parse_assignments("F=\\\n  4\n")


def test_the_last_assignment_wins_in_file_order() -> None:
    assert [a.value for a in parse_assignments("A=1\nA=2\n")] == ["1", "2"]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("A=1\nURIS=$OTHER\n", 2, "variable reference"),
        ('A=1\n\nURIS="${OTHER}"\n', 3, "variable reference"),
        ("START_DELAY=$(cat /etc/delay)\n", 1, "command substitution"),
        ("START_DELAY=`cat /etc/delay`\n", 1, "command substitution"),
        ('A="x `date`"\n', 1, "command substitution"),
        ("test -f /etc/x && . /etc/x\n", 1, "operator"),
        ("test -f /etc/x\n", 1, "shell command"),
        ("A=1\n. /etc/other\n", 2, "shell command"),
        ("A=1 true\n", 1, "shell command"),
        ("echo hi\n", 1, "shell command"),
        ("A=1 >/dev/null\n", 1, "operator"),
        ("A=(1 2)\n", 1, "operator"),
        ("A=1 && B=2\n", 1, "operator"),
        ("A='open\n\nB=2\n", 1, "never closed"),
        ('A=1\nB="open\n', 2, "never closed"),
        ("'A'=1\n", 1, "shell command"),
        ("A=~/x\n", 1, "tilde"),
    ],
)
def test_what_cannot_be_read_without_a_shell_is_an_error_with_its_line(
    text: str, line: int, words: str
) -> None:
    with pytest.raises(ShellSyntaxError) as caught:
        parse_assignments(text)
    assert caught.value.line == line
    assert words in str(caught.value)
    assert str(caught.value).startswith(f"line {line}: ")


def test_a_quoted_tilde_is_just_a_character() -> None:
    assert values("A='~/x'\nB=\\~y\n") == {"A": "~/x", "B": "~y"}

"""The live view in a real pseudo-terminal (tmux), against the real daemon.

The screen is read as a person sees it (``capture-pane``): a row per guest with its
outcome, the overall bar, the summary, each guest exactly once (a redraw that went
wrong leaves old frames behind), no traceback, and the exit status of the command.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guestwarden.ipc.messages import Preserve
from testbed.daemon import GuestwardenDaemon, wait_for
from testbed.guests import define_guests
from testbed.terminal import TmuxTerminal

DaemonFactory = Callable[..., GuestwardenDaemon]


@pytest.fixture
def terminal() -> Iterator[Callable[..., TmuxTerminal]]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: apt-get install tmux (make deps)", pytrace=False)
    made: list[TmuxTerminal] = []
    dirs: list[Path] = []

    def open_terminal(width: int, height: int) -> TmuxTerminal:
        base = Path(tempfile.mkdtemp(prefix="gwt-", dir="/tmp"))  # short: a socket path
        dirs.append(base)
        made.append(TmuxTerminal(base, width=width, height=height))
        return made[-1]

    yield open_terminal
    for term in made:
        term.close()
    for base in dirs:
        shutil.rmtree(base, ignore_errors=True)


def guestwarden(daemon: GuestwardenDaemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "guestwarden", "--config", str(daemon.config), *args]


def rows(screen: str, names: list[str]) -> dict[str, str]:
    """The screen's row of each guest; each must be there exactly once."""
    found: dict[str, str] = {}
    for name in names:
        lines = [line for line in screen.splitlines() if re.match(rf"{re.escape(name)}\s", line)]
        assert len(lines) == 1, f"{name}: {len(lines)} rows on the screen:\n{screen}"
        found[name] = lines[0]
    return found


def test_preserve_and_restore_wait_on_a_terminal(
    test_conn: Any, make_daemon: DaemonFactory, terminal: Callable[..., TmuxTerminal],
) -> None:
    names = define_guests(test_conn, "v", running=8, paused=2, transient_running=2)
    daemon = make_daemon(workers=3, shutdown={"parallel_save": 2})
    daemon.start()

    term = terminal(120, 40)
    term.start(guestwarden(daemon, "preserve", "--wait"))
    assert term.wait_exit(60) == 0, term.screen()
    screen = term.screen()
    assert "Traceback" not in screen, screen
    assert re.search(r"guestwarden preserve preserve-\S+ +ok +12/12 guests done", screen), screen
    assert re.search(r"\[#{10,}\] 12/12 +elapsed \d+:\d\d", screen), screen
    for name, row in rows(screen, names).items():
        outcome = "shutdown" if "transient" in name else "saved"
        assert row.endswith(f"ok   {outcome}"), row
    assert screen.rstrip().splitlines()[-1] == "preserve ok: 12/12 guests handled", screen

    test_conn.lookupByName("v-running-5").managedSaveRemove(0)  # its restore must fail
    term = terminal(120, 40)
    term.start(guestwarden(daemon, "restore", "--wait"))
    assert term.wait_exit(60) == 1, term.screen()
    screen = term.screen()
    assert "Traceback" not in screen, screen
    found = rows(screen, names)
    assert "FAIL failed" in found["v-running-5"]
    full = [line for line in screen.splitlines() if line.startswith("FAIL v-running-5 ")]
    assert len(full) == 1 and "image" in full[0], screen  # under the view: why, in full
    assert "ok   restored" in found["v-paused-1"]
    assert "ok   gone" in found["v-transient-running-0"]
    assert screen.rstrip().splitlines()[-1].startswith("restore FAILED: 11/12 guests brought "
                                                       "back; 1 failed: v-running-5"), screen


def test_watch_shows_a_run_started_elsewhere_in_a_small_terminal(
    test_conn: Any, make_daemon: DaemonFactory, terminal: Callable[..., TmuxTerminal],
) -> None:
    define_guests(test_conn, "w", running=20)
    daemon = make_daemon(workers=2)
    daemon.start()
    term = terminal(100, 14)
    term.start(guestwarden(daemon, "watch"))
    wait_for(lambda: "Ctrl-C to stop" in term.screen(), 20, "watch to show its footer")

    daemon.request(Preserve())
    wait_for(lambda: re.search(r"preserve-\S+ +ok +20/20 guests done", term.screen()), 30,
             "the preserve on the watch screen")
    screen = term.screen()
    lines = screen.rstrip().splitlines()
    assert len(lines) <= 14 and "Traceback" not in screen, screen
    assert re.search(r"^\.\.\. and \d+ more \(\d+ done, 0 not done\)$", screen, re.M), screen
    assert "daemon idle" in lines[-1] and "Ctrl-C to stop" in lines[-1], screen
    shown = [line for line in lines if line.startswith("w-running-")]
    assert shown and all(line.endswith("ok   saved") for line in shown), screen
    assert len({line.split()[0] for line in shown}) == len(shown), "a guest shown twice"

    term.send_keys("C-c")
    assert term.wait_exit(20) == 0, term.screen()

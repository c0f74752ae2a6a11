"""Exit statuses of the ``guestwarden`` command: promises to scripts, never renumbered."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    """The command ran but did not succeed (a guest not preserved, a refused request)."""
    CONFIG = 2
    """Bad configuration or usage: nothing was started or changed."""
    UNREACHABLE = 3
    """No daemon answered on the control socket."""
    ALREADY_RUNNING = 4
    """``daemon``: another daemon holds the same runtime_dir."""

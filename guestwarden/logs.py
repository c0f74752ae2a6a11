"""Logging setup shared by the supervisor, the workers and the CLI."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO", *, prefix: str = "guestwarden") -> None:
    """One line per event on stderr; systemd's journal adds the time when under it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix} %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())

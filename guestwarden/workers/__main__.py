"""Entry point of a worker process: ``python -m guestwarden.workers ...``.

Started by the supervisor with exec (never fork), so it inherits no file descriptor
of the supervisor: in particular not the logind inhibitor.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from guestwarden.logs import setup_logging
from guestwarden.workers.worker import make_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guestwarden-worker")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--heartbeat-interval", type=float, default=1.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument("--progress-interval", type=float, default=0.5)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, prefix=f"worker {args.worker_id}")
    # Ctrl-C in a terminal reaches the whole process group: the supervisor decides
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = make_worker(
        worker_id=args.worker_id,
        endpoint=args.endpoint,
        heartbeat_interval_s=args.heartbeat_interval,
        heartbeat_timeout_s=args.heartbeat_timeout,
        connect_timeout_s=args.connect_timeout,
        progress_interval_s=args.progress_interval,
    )
    return asyncio.run(worker.run())


if __name__ == "__main__":
    sys.exit(main())

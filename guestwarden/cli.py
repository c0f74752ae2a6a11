"""The ``guestwarden`` command: the daemon, and the client commands that talk to it."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from guestwarden import __version__
from guestwarden.conf.loading import ConfigError, config_path, load_settings
from guestwarden.conf.settings import DEFAULT_CONFIG_PATH, Settings
from guestwarden.exitcodes import ExitCode
from guestwarden.ipc.client import ControlClient, Unreachable
from guestwarden.ipc.codec import JSON_ENCODER
from guestwarden.ipc.messages import (
    Error,
    GetRun,
    GetStatus,
    GuestOutcome,
    Ok,
    Plan,
    PlanReply,
    Preserve,
    Reply,
    Request,
    Restore,
    RunReply,
    RunStatus,
    SetWorkers,
    Status,
)
from guestwarden.logs import setup_logging

WAIT_POLL_S = 0.2


class CliError(Exception):
    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guestwarden",
        description="Keeps libvirt guests safe across host shutdown and boot.",
    )
    parser.add_argument("--version", action="version", version=f"guestwarden {__version__}")
    config_help = f"config file (default: $GUESTWARDEN_CONFIG, else {DEFAULT_CONFIG_PATH})"
    parser.add_argument("--config", metavar="PATH", help=config_help)
    # accepted after the command too; SUPPRESS keeps a value given before it
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    daemon = sub.add_parser("daemon", parents=[config], help="run the supervisor (the service)")
    daemon.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    daemon.add_argument("--boot-id-file", type=Path, default=None,
                        help=argparse.SUPPRESS)  # tests simulate a reboot with it

    status = sub.add_parser("status", parents=[config], help="daemon state, workers and jobs")
    status.add_argument("--json", action="store_true", help="one JSON object")

    plan = sub.add_parser("plan", parents=[config], help="what preserve would do now")
    plan.add_argument("--json", action="store_true", help="one JSON object")

    for name, text in (("preserve", "save or shut down every running guest now"),
                       ("restore", "bring back the guests the last preserve handled")):
        cmd = sub.add_parser(name, parents=[config], help=text)
        cmd.add_argument("--wait", action="store_true",
                         help="wait for the end; print one line per guest; exit 1 on failure")
        cmd.add_argument("--json", action="store_true", help="with --wait: the run as JSON")
        cmd.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                         help="with --wait: give up waiting after this long (0: never)")

    workers = sub.add_parser("workers", parents=[config], help="resize the worker pool")
    workers.add_argument("count", type=int, help="number of worker processes (1..256)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        explicit = args.config
        settings = load_settings(config_path(explicit), missing_ok=explicit is None)
        if args.command == "daemon":
            return run_daemon(settings, args)
        client = ControlClient(settings.runtime_dir)
        handler: Callable[[ControlClient, argparse.Namespace], int] = {
            "status": cmd_status,
            "plan": cmd_plan,
            "preserve": cmd_run,
            "restore": cmd_run,
            "workers": cmd_workers,
        }[args.command]
        return handler(client, args)
    except ConfigError as exc:
        print(f"guestwarden: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except Unreachable as exc:
        print(f"guestwarden: {exc}", file=sys.stderr)
        return ExitCode.UNREACHABLE
    except CliError as exc:
        print(f"guestwarden: {exc}", file=sys.stderr)
        return exc.code


def run_daemon(settings: Settings, args: argparse.Namespace) -> int:
    from guestwarden.supervisor.app import BOOT_ID_PATH, AlreadyRunning, Supervisor

    setup_logging(args.log_level, prefix="supervisor")
    supervisor = Supervisor(settings, boot_id_path=args.boot_id_file or BOOT_ID_PATH,
                            log_level=args.log_level)
    try:
        return asyncio.run(supervisor.run())
    except AlreadyRunning as exc:
        print(f"guestwarden: {exc}", file=sys.stderr)
        return ExitCode.ALREADY_RUNNING


def ask(client: ControlClient, request: Request, timeout_s: float | None = None) -> Reply:
    reply = client.request(request, timeout_s)
    if isinstance(reply, Error):
        raise CliError(f"daemon refused: {reply.message} ({reply.code})", ExitCode.FAILED)
    return reply


def _print_json(obj: object) -> None:
    sys.stdout.write(JSON_ENCODER.encode(obj).decode() + "\n")


# ---------------------------------------------------------------------- status


def cmd_status(client: ControlClient, args: argparse.Namespace) -> int:
    reply = ask(client, GetStatus())
    assert isinstance(reply, Status)
    if args.json:
        _print_json(reply)
        return ExitCode.OK
    print(f"state: {reply.state}   pid: {reply.pid}   up: {reply.uptime_s:.0f}s   "
          f"supervisor RSS: {reply.supervisor_rss_bytes / 2**20:.1f} MiB")
    print(f"workers: {len(reply.workers)} (target {reply.workers_target})")
    rows: list[tuple[str, ...]] = [("WORKER", "PID", "STATE", "JOB", "RSS MiB", "CPU %", "DONE")]
    rows += [(w.worker_id, str(w.pid), w.state, str(w.job_id or "-"),
              f"{w.rss_bytes / 2**20:.1f}", f"{w.cpu_percent:.0f}", str(w.jobs_done))
             for w in reply.workers]
    _table(rows)
    print(f"jobs: {len(reply.jobs)} running, {reply.queued_jobs} queued")
    if reply.jobs:
        rows = [("JOB", "KIND", "GUEST", "WORKER", "AGE s", "PROGRESS")]
        rows += [(str(j.job_id), j.kind, j.guest or j.uri, j.worker_id or "-",
                  f"{j.age_s:.1f}", _progress(j.processed_bytes, j.total_bytes))
                 for j in reply.jobs]
        _table(rows)
    for run in reply.runs[-1:]:
        print(f"last run: {run.kind} {run.run_id}: {_run_state(run)}")
    for note in reply.notes:
        print(f"note: {note}")
    return ExitCode.OK


def _progress(done: int, total: int) -> str:
    if not total:
        return "-"
    return f"{100 * done / total:.0f}% of {total / 2**20:.0f} MiB"


def _run_state(run: RunStatus) -> str:
    if run.finished_at is None:
        done = sum(1 for g in run.guests if g.finished)
        return f"running, {done}/{len(run.guests)} guests finished"
    return ("ok" if run.ok else "FAILED") + (f": {run.detail}" if run.detail else "")


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


# ---------------------------------------------------------------------- plan


def cmd_plan(client: ControlClient, args: argparse.Namespace) -> int:
    reply = ask(client, Plan(), timeout_s=120.0)
    assert isinstance(reply, PlanReply)
    if args.json:
        _print_json(reply)
    else:
        rows = [("GUEST", "URI", "STATE", "KIND", "CHAIN")]
        rows += [(g.name, g.uri, g.state, "persistent" if g.persistent else "transient",
                  " -> ".join(g.chain) if g.chain else g.note) for g in reply.guests]
        _table(rows)
        for error in reply.errors:
            print(f"error: {error}")
    return ExitCode.FAILED if reply.errors else ExitCode.OK


# ---------------------------------------------------------------------- runs


def cmd_run(client: ControlClient, args: argparse.Namespace) -> int:
    request: Request = Preserve() if args.command == "preserve" else Restore()
    reply = ask(client, request)
    assert isinstance(reply, Ok)
    if not args.wait:
        print(f"{args.command} started: run {reply.run_id} "
              f"(follow it with: guestwarden status)")
        return ExitCode.OK
    deadline = time.monotonic() + args.timeout if args.timeout else None
    printed: set[str] = set()
    while True:
        status = ask(client, GetRun(run_id=reply.run_id))
        assert isinstance(status, RunReply)
        run = status.run
        if not args.json:
            for guest in run.guests:
                key = f"{guest.uri} {guest.uuid}"
                if guest.finished and key not in printed and guest.chain:
                    printed.add(key)
                    print(guest_line(guest), flush=True)
        if run.finished_at is not None:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise CliError(f"{args.command} run {run.run_id} still running after "
                           f"{args.timeout:g}s", ExitCode.FAILED)
        time.sleep(WAIT_POLL_S)
    if args.json:
        _print_json(run)
    else:
        print(f"{args.command} {'ok' if run.ok else 'FAILED'}: {run.detail}")
    return ExitCode.OK if run.ok else ExitCode.FAILED


def guest_line(guest: GuestOutcome) -> str:
    took = ", ".join(f"{action} {seconds:.1f}s" for action, seconds in guest.durations_s.items())
    mark = "ok  " if guest.ok else "FAIL"
    text = f"{mark} {guest.name:<24} {guest.state_before:>8} -> {guest.outcome}"
    if took:
        text += f" ({took})"
    if not guest.ok and guest.detail:
        text += f": {guest.detail}"
    return text


# ---------------------------------------------------------------------- workers


def cmd_workers(client: ControlClient, args: argparse.Namespace) -> int:
    reply = ask(client, SetWorkers(count=args.count))
    assert isinstance(reply, Ok)
    print(reply.detail)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

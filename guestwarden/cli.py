"""The ``guestwarden`` command: the daemon, and the client commands that talk to it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from guestwarden import __version__
from guestwarden.conf.loading import ConfigError, config_path, load_settings
from guestwarden.conf.settings import DEFAULT_CONFIG_PATH, Settings
from guestwarden.config_commands import add_config_parser, run_config
from guestwarden.exitcodes import ExitCode
from guestwarden.ipc.client import ControlClient, Unreachable
from guestwarden.ipc.codec import JSON_ENCODER
from guestwarden.ipc.messages import (
    Error,
    GetMetrics,
    GetStatus,
    MetricsText,
    Ok,
    Plan,
    PlanReply,
    PolicyReply,
    Preserve,
    Reload,
    Reloaded,
    Reply,
    Request,
    Restore,
    RunStatus,
    SetWorkers,
    Status,
)
from guestwarden.logs import setup_logging
from guestwarden.policy_cli import (
    PolicyUsageError,
    add_policy_parser,
    plan_lines,
    policy_lines,
    policy_request,
    table,
)


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
    daemon.add_argument("--dueling-root", type=Path, default=Path("/"),
                        help=argparse.SUPPRESS)  # tests: where libvirt-guests is looked for

    status = sub.add_parser("status", parents=[config], help="daemon state, workers and jobs")
    status.add_argument("--json", action="store_true", help="one JSON object")

    plan = sub.add_parser("plan", parents=[config], help="what preserve would do now")
    plan.add_argument("--json", action="store_true", help="one JSON object")

    for name, text in (("preserve", "save or shut down every running guest now"),
                       ("restore", "bring back the guests the last preserve handled")):
        cmd = sub.add_parser(name, parents=[config], help=text)
        cmd.add_argument("--wait", action="store_true",
                         help="follow the run to its end (a live view on a terminal, else "
                              "one line per event and per guest); exit 1 on failure")
        cmd.add_argument("--plain", action="store_true",
                         help="with --wait: one line per event, even on a terminal")
        cmd.add_argument("--json", action="store_true",
                         help="with --wait: one JSON object per event; the last is RunFinished "
                              "with the whole run")
        cmd.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                         help="with --wait: give up waiting after this long (0: never)")

    watch = sub.add_parser("watch", parents=[config],
                           help="follow what the daemon does, live, until Ctrl-C")
    watch.add_argument("--plain", action="store_true",
                       help="one line per event, even on a terminal")
    watch.add_argument("--json", action="store_true", help="one JSON object per event")

    sub.add_parser("metrics", parents=[config],
                   help="the daemon's metrics now, in the Prometheus text format")

    workers = sub.add_parser("workers", parents=[config], help="resize the worker pool")
    workers.add_argument("count", type=int, help="number of worker processes (1..256)")

    sub.add_parser("reload", parents=[config],
                   help="make the daemon re-read its config file and say what changed")
    add_config_parser(sub, [config])
    add_policy_parser(sub, [config])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":  # reads its own files; needs no daemon
            return run_config(args)
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
            "watch": cmd_watch,
            "metrics": cmd_metrics,
            "reload": cmd_reload,
            "policy": cmd_policy,
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
    except KeyboardInterrupt:  # --wait: the run is the daemon's; it goes on
        print("guestwarden: interrupted (a run already started goes on in the daemon; "
              "`guestwarden watch` follows it)", file=sys.stderr)
        return 130  # 128 + SIGINT, as shells report it


def run_daemon(settings: Settings, args: argparse.Namespace) -> int:
    from guestwarden.supervisor.app import BOOT_ID_PATH, AlreadyRunning, Supervisor
    from guestwarden.supervisor.dueling import DuelingSources

    setup_logging(args.log_level, prefix="supervisor")
    supervisor = Supervisor(settings, boot_id_path=args.boot_id_file or BOOT_ID_PATH,
                            log_level=args.log_level, config_path=config_path(args.config),
                            config_missing_ok=args.config is None,
                            dueling_sources=DuelingSources(args.dueling_root))
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
    if reply.inhibitor:
        print(f"inhibitor: {_inhibitor_line(reply)}")
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
    for warning in reply.warnings:
        print(f"WARNING: {warning}")
    return ExitCode.OK


def _inhibitor_line(status: Status) -> str:
    """``held (logind waits at most 600s; preserve now: about 12s)`` and the like."""
    limit = ("logind delay limit unknown" if status.inhibit_delay_max_s is None
             else f"logind waits at most {status.inhibit_delay_max_s:g}s")
    estimate = ("" if status.preserve_estimate_s is None
                else f"; preserve now: about {status.preserve_estimate_s:g}s")
    if status.inhibitor == "unavailable":
        return f"unavailable ({status.inhibitor_detail})"
    return f"{status.inhibitor} ({limit}{estimate})"


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
    print("\n".join(table(rows)))


# ---------------------------------------------------------------------- plan


def cmd_plan(client: ControlClient, args: argparse.Namespace) -> int:
    reply = ask(client, Plan(), timeout_s=120.0)
    assert isinstance(reply, PlanReply)
    if args.json:
        _print_json(reply)
    else:
        print("\n".join(plan_lines(reply)))  # policy_cli.py
    return ExitCode.FAILED if reply.errors else ExitCode.OK


def cmd_policy(client: ControlClient, args: argparse.Namespace) -> int:
    try:
        request = policy_request(args)
    except PolicyUsageError as exc:
        raise CliError(str(exc), ExitCode.CONFIG) from None
    reply = ask(client, request, timeout_s=90.0)
    assert isinstance(reply, PolicyReply)
    if args.json:
        _print_json(reply)
    else:
        print("\n".join(policy_lines(reply)))
    return ExitCode.OK


# ---------------------------------------------------------------------- runs


def cmd_run(client: ControlClient, args: argparse.Namespace) -> int:
    request: Request = Preserve() if args.command == "preserve" else Restore()
    if not args.wait:
        reply = ask(client, request)
        assert isinstance(reply, Ok)
        print(f"{args.command} started: run {reply.run_id} "
              f"(follow it with: guestwarden watch)")
        return ExitCode.OK
    # console/follow.py: events for the live view and the lines, GetRun for the truth
    from guestwarden.console.follow import Follower, Timeout, choose_mode

    mode = choose_mode(plain=args.plain, json=args.json, out=sys.stdout)
    follower = Follower(lambda r: ask(client, r), client.socket_path.parent, mode, sys.stdout)
    try:
        run = follower.follow_run(request, args.timeout)
    except Timeout as exc:
        raise CliError(f"{args.command} {exc}", ExitCode.FAILED) from None
    return ExitCode.OK if run.ok else ExitCode.FAILED


def cmd_watch(client: ControlClient, args: argparse.Namespace) -> int:
    from guestwarden.console.follow import Follower, choose_mode

    mode = choose_mode(plain=args.plain, json=args.json, out=sys.stdout)
    follower = Follower(lambda r: ask(client, r), client.socket_path.parent, mode, sys.stdout)
    try:
        follower.watch()
    except KeyboardInterrupt:
        return ExitCode.OK  # the way to stop watching
    return ExitCode.OK


def cmd_metrics(client: ControlClient, args: argparse.Namespace) -> int:
    reply = ask(client, GetMetrics())
    assert isinstance(reply, MetricsText)
    sys.stdout.write(reply.text)
    return ExitCode.OK


# ---------------------------------------------------------------------- workers


def cmd_workers(client: ControlClient, args: argparse.Namespace) -> int:
    reply = ask(client, SetWorkers(count=args.count))
    assert isinstance(reply, Ok)
    print(reply.detail)
    return ExitCode.OK


# ---------------------------------------------------------------------- reload


def cmd_reload(client: ControlClient, args: argparse.Namespace) -> int:
    from guestwarden.supervisor.reload import describe_changes

    reply = ask(client, Reload(), timeout_s=60.0)
    assert isinstance(reply, Reloaded)
    print(f"reloaded {reply.path}: " + (f"{len(reply.changes)} changed" if reply.changes
                                        else "no changes"))
    for line in describe_changes(reply.changes):
        print(f"  {line}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())

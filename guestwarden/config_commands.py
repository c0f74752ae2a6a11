"""``guestwarden config ...``: check a config, and take over from libvirt-guests.

These commands need no running daemon (and the list takeover refuses to run beside
one: the daemon keeps the journal in memory and would overwrite what is written
here). They are dispatched before the usual config loading of cli.py, because
``config check PATH`` must report a broken file itself and the translation of a
libvirt-guests config does not involve guestwarden's config at all.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from guestwarden.conf.libvirt_guests import (
    DISTROS,
    LIST_PATH,
    SYSCONFIG_PATH,
    LibvirtGuestsError,
    default_config_path,
    default_uri,
    import_config,
    read_config,
)
from guestwarden.conf.libvirt_guests_list import read_guest_list, taken_over_run
from guestwarden.conf.loading import ConfigError, config_path, load_settings
from guestwarden.conf.render import render_settings
from guestwarden.conf.settings import CONFIG_ENV
from guestwarden.exitcodes import ExitCode
from guestwarden.ipc.sockets import LOCK_FILE
from guestwarden.supervisor.dueling import DuelingSources, find_dueling
from guestwarden.supervisor.journal import Journal, JournalData
from guestwarden.supervisor.restore import restore_candidates

TAKEN_OVER_SUFFIX = ".taken-over-by-guestwarden"


class Refused(Exception):
    """The command would overwrite or race with something; nothing was changed."""


def add_config_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                      parents: list[argparse.ArgumentParser]) -> None:
    config = sub.add_parser("config", parents=parents,
                            help="check a config; take over from libvirt-guests")
    commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check", parents=parents,
        help="validate a config and print every effective value as TOML")
    check.add_argument("path", nargs="?", type=Path, metavar="PATH",
                       help="the file to check (default: --config, $GUESTWARDEN_CONFIG, "
                            "else the default path)")
    check.add_argument("--dueling-root", type=Path, default=Path("/"),
                       help=argparse.SUPPRESS)  # tests: where libvirt-guests is looked for
    imp = commands.add_parser(
        "import-libvirt-guests", parents=parents,
        help="translate a libvirt-guests config into guestwarden TOML, or (--list) take "
             "over the guests libvirt-guests stopped")
    imp.add_argument("path", nargs="?", type=Path, metavar="PATH",
                     help="libvirt-guests config (default: /etc/sysconfig/libvirt-guests if "
                          "it exists, else /etc/default/libvirt-guests)")
    imp.add_argument("--distro", choices=DISTROS,
                     help="whose libvirt-guests defaults apply to unset variables (default: "
                          "told by PATH: /etc/sysconfig -> fedora, /etc/default -> debian)")
    imp.add_argument("--output", type=Path, metavar="FILE",
                     help="write the TOML to FILE instead of stdout")
    imp.add_argument("--force", action="store_true",
                     help="replace an existing --output FILE; with --list, replace a "
                          "journal whose guests were not restored yet")
    imp.add_argument("--list", nargs="?", const=LIST_PATH, type=Path, metavar="FILE",
                     dest="list_file",
                     help="instead: take over libvirt-guests' list of stopped guests "
                          f"(default FILE: {LIST_PATH}) into the journal of the --config "
                          "config, so that guestwarden restore starts them")


def run_config(args: argparse.Namespace) -> int:
    try:
        if args.config_command == "check":
            return check(args)
        if args.list_file is not None:
            if args.path is not None or args.output is not None or args.distro is not None:
                raise LibvirtGuestsError("--list takes over the list of stopped guests only; "
                                         "translate the config in a separate command")
            return take_over_list(args)
        return translate(args)
    except (ConfigError, LibvirtGuestsError) as exc:
        print(f"guestwarden: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except Refused as exc:
        print(f"guestwarden: refused: {exc}", file=sys.stderr)
        return ExitCode.FAILED


def _warn(text: str) -> None:
    print(f"guestwarden: warning: {text}", file=sys.stderr)


# ---------------------------------------------------------------------- check


def check(args: argparse.Namespace) -> int:
    explicit = args.path or getattr(args, "config", None)
    path = Path(explicit) if explicit else config_path(None)
    missing_ok = explicit is None and CONFIG_ENV not in os.environ
    settings = load_settings(path, missing_ok=missing_ok)
    state = "valid" if path.exists() else "not found, so every value is the default"
    sys.stdout.write(render_settings(settings, header=(
        f"Effective guestwarden configuration: {path} ({state}).",
        "Every key is shown, defaults included.",
    )))
    reasons = find_dueling(DuelingSources(args.dueling_root))
    for reason in reasons:
        _warn(reason)
    if reasons and not settings.allow_dueling:
        _warn("while this is so, the daemon refuses to preserve and restore guests")
    return ExitCode.OK


# ---------------------------------------------------------------------- translation


def translate(args: argparse.Namespace) -> int:
    path = args.path or default_config_path()
    if args.path is None and not path.exists():
        raise LibvirtGuestsError(
            f"no libvirt-guests config at {SYSCONFIG_PATH} or {path}; give its PATH. If "
            "libvirt-guests runs with none (all its defaults), translate those: guestwarden "
            "config import-libvirt-guests /dev/null --distro fedora (or debian)")
    text, warnings = import_config(read_config(path, args.distro), default_uri())
    for warning in warnings:
        _warn(warning)
    if args.output is None:
        sys.stdout.write(text)
        return ExitCode.OK
    out: Path = args.output
    if out.exists() and not args.force:
        raise Refused(f"{out} exists; give --force to replace it (or write elsewhere and "
                      "compare)")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Refused(f"cannot write {out}: {exc.strerror}") from None
    print(f"guestwarden: wrote {out}; check it with: guestwarden config check {out}",
          file=sys.stderr)
    return ExitCode.OK


# ---------------------------------------------------------------------- list takeover


@contextmanager
def no_daemon(runtime_dir: Path) -> Iterator[None]:
    """Hold the daemon's lock while the journal is written: refuse if a daemon holds it.

    A running daemon keeps the journal in memory and writes it back on its next run,
    which would silently drop what the takeover wrote.
    """
    if not runtime_dir.is_dir():
        yield  # the daemon creates its runtime_dir: none has run since boot
        return
    fd = os.open(runtime_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise Refused(
                f"a guestwarden daemon (pid {pid}) is running with runtime_dir {runtime_dir}; "
                "stop it first (systemctl stop guestwarden leaves guests as they are), "
                "take over the list, then start it again") from None
        yield
    finally:
        os.close(fd)


def take_over_list(args: argparse.Namespace) -> int:
    list_path: Path = args.list_file
    explicit = getattr(args, "config", None)
    settings = load_settings(config_path(explicit), missing_ok=explicit is None)
    found = read_guest_list(list_path)
    if found is None:
        print(f"{list_path} does not exist: libvirt-guests has no stopped guests to hand over")
        return ExitCode.OK
    listed, written_at = found
    uri, _why = default_uri()
    run, skipped = taken_over_run(listed, list_path=list_path, written_at=written_at,
                                  uris=settings.uris, default_uri=uri)
    for line in skipped:
        _warn(line)
    if not run.guests:
        print(f"{list_path}: no guest to take over; the journal is unchanged")
        return ExitCode.OK
    state_dir = Path(settings.state_dir)
    try:
        with no_daemon(Path(settings.runtime_dir)):
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            journal = Journal(state_dir)
            data = journal.load()
            for note in journal.notes:
                _warn(note)
            pending = restore_candidates(data)
            if pending and not args.force and data.preserve is not None:
                names = ", ".join(g.name for g in pending[:5]) + (" ..." * (len(pending) > 5))
                raise Refused(
                    f"the journal {journal.path} holds preserve run {data.preserve.run_id}, "
                    f"whose {len(pending)} guests were not restored yet ({names}); taking "
                    "over the list would replace it. Run `guestwarden restore --wait` first, "
                    "or give --force to replace it")
            journal.save(JournalData(preserve=run, preserve_boot_id="", restore=data.restore,
                                     restored=(), restore_boot_id=data.restore_boot_id,
                                     learned=data.learned))
    except OSError as exc:
        raise Refused(f"{exc.filename or state_dir}: {exc.strerror}") from None
    print(f"took over {len(run.guests)} guests stopped by libvirt-guests: {journal.path} "
          "now lists them for restore, which starts them (restoring those with a "
          "managed-save image)")
    # libvirt-guests must not start them a second time, and a stale list would make
    # its next stop do nothing, should it ever run again
    aside = list_path.with_name(list_path.name + TAKEN_OVER_SUFFIX)
    try:
        os.replace(list_path, aside)
    except OSError as exc:
        _warn(f"could not move {list_path} aside ({exc.strerror}); remove it yourself")
    else:
        print(f"{list_path} was moved to {aside}")
    return ExitCode.OK

"""``guestwarden policy show|set|clear GUEST`` and the text of ``guestwarden plan``.

Parsing, request building and rendering only: cli.py sends the requests and prints.
The flags are the policy's fields (conf/guestpolicy.py) with dashes::

    guestwarden policy set db1 --chain save,poweroff --order 10 \\
        --shutdown-timeout 60 --start-delay 5 --no-exclude [--uri URI]
    guestwarden policy set db1 --unset order          # back to rules and defaults
    guestwarden policy show db1 [--json]
    guestwarden policy clear db1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from guestwarden.conf import guestpolicy
from guestwarden.ipc.messages import (
    ClearPolicy,
    PlannedGuest,
    PlanReply,
    PolicyReply,
    Request,
    SetPolicy,
    ShowPolicy,
)


class PolicyUsageError(ValueError):
    """A ``policy`` command line that asks for nothing or for something impossible."""


def _chain(text: str) -> tuple[str, ...]:
    try:
        policy = guestpolicy.convert({"chain": [a.strip() for a in text.split(",") if a.strip()]})
    except guestpolicy.PolicyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert policy.chain is not None
    return policy.chain


def _seconds(minimum_exclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if (value <= 0 if minimum_exclusive else value < 0) or value > 86400:
            bound = "more than 0" if minimum_exclusive else "0 or more"
            raise argparse.ArgumentTypeError(f"expected {bound} and at most 86400, got {text}")
        return value
    return parse


def add_policy_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                      parents: Sequence[argparse.ArgumentParser]) -> None:
    policy = sub.add_parser("policy", parents=list(parents),
                            help="show or change a guest's own policy (its libvirt metadata)")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    for name, text in (("show", "the guest's metadata and its effective values"),
                       ("set", "change fields of the guest's metadata"),
                       ("clear", "remove the guest's guestwarden metadata")):
        cmd = actions.add_parser(name, parents=list(parents), help=text)
        cmd.add_argument("guest", metavar="GUEST", help="guest name or UUID")
        cmd.add_argument("--uri", default="", help="the libvirt URI, when several have GUEST")
        cmd.add_argument("--json", action="store_true", help="the reply as one JSON object")
        if name != "set":
            continue
        cmd.add_argument("--chain", type=_chain, metavar="A,B,...",
                         help="actions tried in order: save, shutdown, poweroff")
        cmd.add_argument("--order", type=int, metavar="N",
                         help="order group (-10000..10000): preserve goes from the highest "
                              "down, restore from the lowest up")
        cmd.add_argument("--shutdown-timeout", type=_seconds(True), metavar="SECONDS",
                         help="wait this long for a graceful shutdown")
        cmd.add_argument("--start-delay", type=_seconds(False), metavar="SECONDS",
                         help="seconds from this guest's start to the next start")
        exclude = cmd.add_mutually_exclusive_group()
        exclude.add_argument("--exclude", dest="exclude", action="store_const", const=True,
                             help="preserve and restore leave the guest alone")
        exclude.add_argument("--no-exclude", dest="exclude", action="store_const",
                             const=False, help="the guest is preserved and restored")
        cmd.add_argument("--unset", action="append", default=[], metavar="FIELD",
                         choices=[f.replace("_", "-") for f in guestpolicy.FIELDS],
                         help="remove a field from the metadata (rules and defaults apply "
                              "again): chain, order, shutdown-timeout, start-delay, exclude")


def policy_request(args: argparse.Namespace) -> Request:
    if args.policy_command == "show":
        return ShowPolicy(guest=args.guest, uri=args.uri)
    if args.policy_command == "clear":
        return ClearPolicy(guest=args.guest, uri=args.uri)
    try:
        changes = guestpolicy.convert({
            name: value for name in guestpolicy.FIELDS
            if (value := getattr(args, name)) is not None})
    except guestpolicy.PolicyError as exc:
        raise PolicyUsageError(str(exc)) from None
    unset = tuple(f.replace("-", "_") for f in args.unset)
    if guestpolicy.is_empty(changes) and not unset:
        raise PolicyUsageError("policy set: nothing to change; give --chain, --order, "
                               "--shutdown-timeout, --start-delay, --exclude/--no-exclude "
                               "or --unset FIELD")
    both = [f for f in unset if getattr(changes, f) is not None]
    if both:
        raise PolicyUsageError(f"policy set: {', '.join(both)} both set and unset")
    return SetPolicy(guest=args.guest, uri=args.uri, policy=changes, unset=unset)


def _value(guest: PlannedGuest, name: str) -> str:
    value = getattr(guest, name)
    if name == "chain":
        return " -> ".join(value) if value else f"none: {guest.note}"
    if name == "exclude":
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def policy_lines(reply: PolicyReply) -> list[str]:
    guest = reply.guest
    kind = "persistent" if guest.persistent else "transient"
    lines = [f"guest {guest.name} on {guest.uri} ({kind}, {guest.state})"
             + (f": {reply.detail}" if reply.detail else "")]
    rows = [("FIELD", "EFFECTIVE", "FROM")]
    rows += [(name, _value(guest, name), guest.sources.get(name, "")) for name in
             guestpolicy.FIELDS]
    lines += table(rows)
    lines.append("metadata: " + guestpolicy.describe(reply.metadata))
    if guest.policy_error:
        lines.append(f"WARNING: {guest.policy_error}")
    return lines


def _from(guest: PlannedGuest) -> str:
    """The fields that did not come from the defaults, and where they came from."""
    return ", ".join(f"{name}: {source}" for name, source in guest.sources.items()
                     if source != "default") or "-"


def plan_lines(reply: PlanReply) -> list[str]:
    """Guests in the order preserve hands them out, then those left alone."""
    guests = sorted(reply.guests, key=lambda g: (g.rank == 0, g.rank, g.uri, g.name))
    rows = [("#", "GUEST", "URI", "STATE", "ORDER", "CHAIN", "EXPECTED", "FROM")]
    rows += [(str(g.rank or "-"), g.name, g.uri, g.state, str(g.order),
              " -> ".join(g.chain) if g.chain else g.note,
              "-" if g.expected_s is None else f"{g.expected_s:.1f}s", _from(g))
             for g in guests]
    lines = table(rows)
    lines += [f"WARNING: {g.name}: {g.policy_error}" for g in guests if g.policy_error]
    if reply.estimate_s is not None:
        lines.append(f"preserve expected to take about {reply.estimate_s:g}s "
                     f"({reply.estimate_basis})")
    limit = ("unknown" if reply.inhibit_delay_max_s is None
             else f"{reply.inhibit_delay_max_s:g}s")
    if reply.stop_budget_s is not None:
        lines.append(f"limits: logind waits at most {limit}; systemd's shutdown budget "
                     f"{reply.stop_budget_s:g}s")
    lines += [f"WARNING: {warning}" for warning in reply.warnings]
    lines += [f"error: {error}" for error in reply.errors]
    return lines


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


"""Each guest's effective policy: its own metadata, then the config's rules, then defaults.

For every field (chain, order, shutdown_timeout, start_delay, exclude) the first
source that sets it wins:

1. the guest's own metadata (conf/guestpolicy.py), which travels with the guest;
2. the first ``[[rules]]`` table, in file order, whose ``match`` pattern matches the
   guest's name and that sets the field;
3. the defaults: ``[shutdown] persistent``/``transient``, order 0, ``[shutdown]
   shutdown_timeout``, ``[boot] start_delay``, not excluded.

Per field rather than per rule so that a broad rule (``match = "*"``) can set one
thing and a narrow one another; ``plan`` shows which source gave each value.

A chain is then fitted to the guest as it is now: a transient guest cannot be saved
(libvirt keeps no image for it) and a paused one sees no power button.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, cast

from guestwarden.conf.guestpolicy import FIELDS
from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import ActionName, GuestInfo, PlannedGuest

ACTIVE_STATES = frozenset({"running", "paused"})
METADATA = "metadata"
DEFAULT = "default"


@dataclass(frozen=True)
class EffectivePolicy:
    chain: tuple[ActionName, ...]
    """Fitted to the guest's state; empty when preserve leaves the guest alone."""
    order: int
    shutdown_timeout: float
    start_delay: float
    exclude: bool
    sources: dict[str, str] = field(default_factory=dict)
    note: str = ""
    """Why the chain is empty, or how it was fitted."""
    policy_error: str = ""

    def planned(self, guest: GuestInfo, **extra: Any) -> PlannedGuest:
        return PlannedGuest(
            uri=guest.uri, uuid=guest.uuid, name=guest.name, state=guest.state,
            persistent=guest.persistent, chain=self.chain, note=self.note, order=self.order,
            shutdown_timeout=self.shutdown_timeout, start_delay=self.start_delay,
            exclude=self.exclude, sources=dict(self.sources), policy_error=self.policy_error,
            **extra,
        )


def rule_name(index: int, pattern: str) -> str:
    return f"rule {index + 1} ({pattern})"


def resolve_policy(guest: GuestInfo, settings: Settings) -> EffectivePolicy:
    defaults: dict[str, Any] = {
        "chain": settings.shutdown.persistent if guest.persistent
        else settings.shutdown.transient,
        "order": 0,
        "shutdown_timeout": settings.shutdown.shutdown_timeout,
        "start_delay": settings.boot.start_delay,
        "exclude": False,
    }
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if guest.policy is not None:
        for name in FIELDS:
            value = getattr(guest.policy, name)
            if value is not None:
                values[name], sources[name] = value, METADATA
    for index, rule in enumerate(settings.rules):
        if not fnmatchcase(guest.name, rule.match):
            continue
        for name in FIELDS:
            value = getattr(rule, name)
            if name not in values and value is not None:
                values[name], sources[name] = value, rule_name(index, rule.match)
    for name in FIELDS:
        if name not in values:
            values[name], sources[name] = defaults[name], DEFAULT
    chain, note = fit_chain(guest, cast(tuple[ActionName, ...], values["chain"]), settings)
    if values["exclude"]:
        chain, note = (), f"excluded ({sources['exclude']})"
    elif guest.state not in ACTIVE_STATES:
        chain, note = (), f"left alone ({guest.state})"
    return EffectivePolicy(
        chain=chain, order=int(values["order"]),
        shutdown_timeout=float(values["shutdown_timeout"]),
        start_delay=float(values["start_delay"]), exclude=bool(values["exclude"]),
        sources=sources, note=note, policy_error=guest.policy_error,
    )


def fit_chain(
    guest: GuestInfo, chain: tuple[ActionName, ...], settings: Settings
) -> tuple[tuple[ActionName, ...], str]:
    """The chain as it can work for this guest now, and a note when it was changed."""
    note = ""
    if not guest.persistent and "save" in chain:
        # metadata or a rule meant for persistent guests: the config refuses it for
        # [shutdown] transient, so fall back to that chain when nothing else is left
        chain = tuple(a for a in chain if a != "save") or settings.shutdown.transient
        note = "no save for a transient guest"
    if guest.state == "paused":
        # a paused guest sees no power button: graceful shutdown would only time out
        chain = tuple(a for a in chain if a != "shutdown") or chain
    return chain, note

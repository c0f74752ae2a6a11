"""libvirt-guests' list of the guests it stopped, turned into a guestwarden preserve record.

At host shutdown libvirt-guests writes ``/var/lib/libvirt/libvirt-guests``, one line
per URI (``URI uuid uuid ...``), and at the next boot it starts those guests and
deletes the file. A host switched to guestwarden in between would forget them; so
the list becomes the journal's preserve record, and restore starts those guests.

What libvirt-guests did to each guest is not in the list: it saved it (an image
exists) or shut it down (none), depending on ON_SHUTDOWN at the time. The record
therefore carries the outcome ``TAKEN_OVER``, for which restore expects no image:
starting a guest that has a managed-save image restores it, and one without is
booted, exactly what ``libvirt-guests start`` would do. (For guestwarden's own
"saved" outcome restore refuses to cold-boot a guest whose image is missing; here a
missing image is normal.) A listed guest libvirt no longer knows -- a transient one
that was shut down -- is reported as gone, as libvirt-guests skips it.

No libvirt connection is needed: guests are named by UUID until restore sees them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from guestwarden.conf.libvirt_guests import LibvirtGuestsError
from guestwarden.ipc.messages import GuestOutcome, RunStatus

TAKEN_OVER = "libvirt-guests"
"""The preserve outcome of a guest taken over from libvirt-guests' list."""

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


@dataclass(frozen=True)
class ListedGuests:
    uri: str
    """As written: libvirt-guests writes the entries of its URIS, ``default`` included."""
    uuids: tuple[str, ...]
    line: int


def parse_guest_list(text: str, path: Path) -> list[ListedGuests]:
    """Lines ``URI uuid ...``; blank lines are skipped (``read uri list`` does too)."""
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split()
        if not words:
            continue
        bad = [w for w in words[1:] if not _UUID.fullmatch(w)]
        if bad:
            raise LibvirtGuestsError(
                f"{path} line {number}: {bad[0]!r} is not a guest UUID; expected lines of "
                "`URI uuid uuid ...` as libvirt-guests writes them")
        out.append(ListedGuests(words[0], tuple(w.lower() for w in words[1:]), number))
    return out


def read_guest_list(path: Path) -> tuple[list[ListedGuests], float] | None:
    """The list and when it was written; None if there is none (nothing was stopped)."""
    try:
        text = path.read_text(encoding="utf-8")
        written_at = path.stat().st_mtime
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise LibvirtGuestsError(f"{path}: cannot read it: {exc}") from None
    return parse_guest_list(text, path), written_at


def taken_over_run(
    listed: Sequence[ListedGuests],
    *,
    list_path: Path,
    written_at: float,
    uris: Sequence[str],
    default_uri: str,
) -> tuple[RunStatus, list[str]]:
    """The preserve record of the listed guests, and a line for each one left out.

    Guests on a URI guestwarden is not configured for are left out, as
    ``libvirt-guests start`` ignores guests on URIs no longer in its URIS.
    """
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(written_at))
    guests: dict[tuple[str, str], GuestOutcome] = {}
    skipped: list[str] = []
    for entry in listed:
        uri = default_uri if entry.uri == "default" else entry.uri
        if uri not in uris:
            skipped.append(f"{list_path} line {entry.line}: {len(entry.uuids)} guests on "
                           f"{entry.uri} left out: that URI is not in guestwarden's uris "
                           f"({', '.join(uris)})")
            continue
        for uuid in entry.uuids:
            guests[(uri, uuid)] = GuestOutcome(
                uri=uri, uuid=uuid, name=uuid, persistent=True, state_before="running",
                chain=(), outcome=TAKEN_OVER, ok=True, finished=True,
                detail=f"stopped by libvirt-guests (listed in {list_path} at {stamp})",
            )
    run = RunStatus(
        run_id=f"libvirt-guests-{time.strftime('%Y%m%dT%H%M%S', time.localtime(written_at))}",
        kind="preserve", started_at=written_at, finished_at=written_at, ok=True,
        detail=f"taken over from libvirt-guests: {len(guests)} guests listed in {list_path} "
               f"at {stamp}",
        guests=tuple(guests.values()),
    )
    return run, skipped

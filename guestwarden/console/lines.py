"""One line of text per event, for ``--plain`` and for output that is not a terminal.

Two kinds of line keep the format that ``--wait`` printed before events existed, so
that scripts parsing it go on working: a guest's final line (``ok  `` or ``FAIL``,
then the name, ``state -> outcome``) and the run's summary (``preserve ok: ...``).
Every other line starts with the time (``HH:MM:SS``), so it can never be taken for
one of those.
"""

from __future__ import annotations

import time

from guestwarden.ipc.messages import (
    Event,
    GuestActionFailed,
    GuestActionFinished,
    GuestActionProgress,
    GuestActionStarted,
    GuestFinished,
    GuestOutcome,
    InhibitorChanged,
    RunFinished,
    RunPlanned,
    RunStarted,
    Subscribed,
    WorkerLost,
    WorkerRetired,
    WorkerSpawned,
)


def guest_line(guest: GuestOutcome) -> str:
    """A guest's final line, as ``--wait`` has always printed it."""
    took = ", ".join(f"{action} {seconds:.1f}s" for action, seconds in guest.durations_s.items())
    mark = "ok  " if guest.ok else "FAIL"
    text = f"{mark} {guest.name:<24} {guest.state_before:>8} -> {guest.outcome}"
    if took:
        text += f" ({took})"
    if not guest.ok and guest.detail:
        text += f": {guest.detail}"
    elif len(guest.attempts) > 1:  # say why the earlier actions did not do
        text += "; before that: " + "; ".join(guest.attempts[:-1])
    elif guest.outcome.endswith("sync failed") and guest.detail:  # restored, but say why
        text += f": {guest.detail}"
    return text


def summary_line(kind: str, ok: bool | None, detail: str) -> str:
    return f"{kind} {'ok' if ok else 'FAILED'}: {detail}"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float | None) -> str:
    """``0:07``, ``12:03``, ``1:02:03``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def progress_text(processed: int, total: int, rate_bps: float = 0.0) -> str:
    if not total:
        return ""
    text = f"{100 * processed // total:>3}% {size(processed)} of {size(total)}"
    return text + (f", {size(rate_bps)}/s" if rate_bps else "")


def event_line(event: Event, rate_bps: float = 0.0) -> str | None:
    """The line for an event; None for events that have none (a guest the run leaves
    alone: --wait never listed those)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.at)) if event.at else "--:--:--"
    match event:
        case GuestFinished(guest=guest):
            return guest_line(guest) if guest.chain else None
        case RunFinished(kind=kind, ok=ok, detail=detail):
            return summary_line(kind, ok, detail)
        case RunStarted(kind=kind, run_id=run_id):
            text = f"run      {kind} {run_id} started"
        case RunPlanned(run_id=run_id, guests=guests):
            acting = sum(1 for g in guests if g.chain)
            text = f"plan     {run_id}: {len(guests)} guests, {acting} to act on"
        case GuestActionStarted():
            text = (f"start    {event.action:<9} {event.name} (attempt {event.attempt}, "
                    f"worker {event.worker_id})")
        case GuestActionProgress():
            text = (f"progress {event.action:<9} {event.name} "
                    f"{progress_text(event.processed_bytes, event.total_bytes, rate_bps)}")
        case GuestActionFinished():
            text = f"done     {event.action:<9} {event.name}: {event.result} " \
                   f"({event.elapsed_s:.2f}s)"
        case GuestActionFailed():
            reason = event.reason + (f": {event.detail}" if event.detail else "")
            text = f"failed   {event.action:<9} {event.name}: {reason} ({event.elapsed_s:.2f}s)"
        case WorkerSpawned(worker_id=wid, pid=pid):
            text = f"worker   {wid} pid {pid} started"
        case WorkerLost(worker_id=wid, pid=pid, reason=reason):
            text = f"worker   {wid} pid {pid} lost: {reason}"
        case WorkerRetired(worker_id=wid, pid=pid, reason=reason):
            text = f"worker   {wid} pid {pid} stopped: {reason}"
        case InhibitorChanged(state=state, detail=detail):
            text = f"inhibitor {state}" + (f": {detail}" if detail else "")
        case Subscribed(pid=pid):
            text = f"events   following the daemon (pid {pid})"
    return f"{stamp} {text}"

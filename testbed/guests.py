"""Guests of libvirt's test driver, in bulk (see /work/shared/TESTBED.md).

The test driver runs no emulator: every operation is instant, and one connection to
``test+unix:///default?socket=...`` shares its state with every other client process
as long as one connection stays open (``IsolatedLibvirtd.keeper()``).

Measured here (2 cores): defining and starting 500 guests takes ~0.15 s, 5000 about
1.2-1.6 s; remove_all of 5000 about 0.6-1.1 s. Both spread the calls over a few threads
sharing the one connection (libvirt connections are thread-safe; this roughly halves
the time).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from xml.sax.saxutils import escape

import libvirt

__all__ = ["define_guests", "guest_xml", "remove_all"]

_PARALLEL_FROM = 200  # below this many guests, threads are not worth it
_WORKERS = 4


def guest_xml(name: str, memory_kib: int = 131072) -> str:
    """A minimal valid domain XML for the test driver (``<domain type='test'>``)."""
    return (
        "<domain type='test'>"
        f"<name>{escape(name)}</name>"
        f"<memory unit='KiB'>{memory_kib}</memory>"
        f"<currentMemory unit='KiB'>{memory_kib}</currentMemory>"
        "<vcpu>1</vcpu>"
        "<os><type>hvm</type></os>"
        "</domain>"
    )


def _run_all(items: Sequence[Any], action: Callable[[Any], None]) -> None:
    """action(item) for every item, on a few threads when there are many."""
    if len(items) < _PARALLEL_FROM:
        for item in items:
            action(item)
        return

    def run_slice(part: Sequence[Any]) -> None:
        for item in part:
            action(item)

    with ThreadPoolExecutor(_WORKERS, thread_name_prefix="testbed-guests") as pool:
        # list() re-raises the first exception of a worker.
        list(pool.map(run_slice, [items[k::_WORKERS] for k in range(_WORKERS)]))


def define_guests(
    conn: Any,  # libvirt.virConnect (untyped)
    prefix: str,
    *,
    running: int = 0,
    paused: int = 0,
    off: int = 0,
    transient_running: int = 0,
    transient_paused: int = 0,
    memory_kib: int = 131072,
) -> list[str]:
    """Create a mix of guests on a test-driver connection; return their names.

    Persistent guests are defined (defineXML), then started and, for ``paused``,
    suspended; ``off`` ones are only defined. Transient guests are created
    (createXML) and, for ``transient_paused``, suspended. Names are
    ``{prefix}-{kind}-{i}`` with kind one of ``running``, ``paused``, ``off``,
    ``transient-running``, ``transient-paused`` and i counting from 0; the list is in
    that order. A name already in use makes libvirt raise libvirtError.
    """
    plan: list[tuple[str, str]] = [
        (f"{prefix}-{kind}-{i}", kind)
        for kind, count in (
            ("running", running),
            ("paused", paused),
            ("off", off),
            ("transient-running", transient_running),
            ("transient-paused", transient_paused),
        )
        for i in range(count)
    ]

    def make(entry: tuple[str, str]) -> None:
        name, kind = entry
        xml = guest_xml(name, memory_kib)
        if kind.startswith("transient-"):
            dom = conn.createXML(xml, 0)
        else:
            dom = conn.defineXML(xml)
            if kind != "off":
                dom.create()
        if kind.endswith("paused"):
            dom.suspend()

    _run_all(plan, make)
    return [name for name, _ in plan]


def _undefine_flags(conn: Any) -> int:
    flags: int = (
        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    )
    # The test driver rejects the other flags (and libvirt would print the error).
    if conn.getType().upper() != "TEST":
        flags |= (
            libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
    return flags


def remove_all(conn: Any, *, attempts: int = 3) -> None:
    """Destroy and undefine every guest of conn, managed-save images included.

    This removes the test driver's predefined running guest "test" too. Guests that
    vanish meanwhile (another client removed them) are skipped; raises RuntimeError
    if guests are still there after ``attempts`` passes (another client keeps
    creating them).
    """
    flags = _undefine_flags(conn)

    def remove(dom: Any) -> None:
        try:
            persistent = dom.isPersistent()  # before destroy: a transient one vanishes
            if dom.isActive():
                dom.destroy()
            if persistent:
                dom.undefineFlags(flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise

    for _ in range(attempts):
        doms = conn.listAllDomains(0)
        if not doms:
            return
        _run_all(doms, remove)
    left = [dom.name() for dom in conn.listAllDomains(0)]
    if left:
        raise RuntimeError(f"guests still there after {attempts} passes: {left[:10]}...")

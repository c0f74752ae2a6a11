"""The settings of guestwarden as frozen msgspec Structs.

These classes are the schema of ``guestwarden.toml``: a key that is not a field here
is an error, and the ``Meta`` constraints are what the error message offers as the
allowed values. The README's config reference is checked against them by a test.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from guestwarden.ipc.messages import ActionName, GuestPolicy, ShutdownMode

Seconds = Annotated[float, Meta(ge=0, le=86400)]
PositiveSeconds = Annotated[float, Meta(gt=0, le=86400)]
Chain = Annotated[tuple[ActionName, ...], Meta(min_length=1, max_length=3)]

DEFAULT_CONFIG_PATH = "/etc/guestwarden/guestwarden.toml"
CONFIG_ENV = "GUESTWARDEN_CONFIG"


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ShutdownSettings(_Section, frozen=True, kw_only=True):
    """``[shutdown]``: what preserve does to each running or paused guest."""

    persistent: Chain = ("save", "shutdown", "poweroff")
    transient: Chain = ("shutdown", "poweroff")
    parallel_shutdown: Annotated[int, Meta(ge=0, le=4096)] = 8
    parallel_save: Literal["auto"] | Annotated[int, Meta(ge=1, le=256)] = 1
    """``auto``: start with one save and add another only while the measured write
    throughput still rises (supervisor/savecontrol.py)."""
    shutdown_timeout: PositiveSeconds = 300.0
    save_timeout: PositiveSeconds = 900.0
    poweroff_timeout: PositiveSeconds = 60.0
    bypass_cache: bool = False
    shutdown_mode: ShutdownMode = "acpi"
    save_dir: str = "/var/lib/libvirt/qemu/save"
    """Where libvirt's qemu driver writes managed-save images: its free space is
    checked before each save ("" = no check)."""
    save_space_reserve: Annotated[int, Meta(ge=0, le=1 << 30)] = 1024
    """MiB that saves must leave free in save_dir."""

    def __post_init__(self) -> None:
        for key in ("persistent", "transient"):
            chain = getattr(self, key)
            if len(set(chain)) != len(chain):
                raise ValueError(
                    f"{key}: an action may appear only once in a chain, got {list(chain)}"
                )
        if "save" in self.transient:
            raise ValueError(
                'transient: "save" is not possible for transient guests '
                "(libvirt keeps no managed-save image for them)"
            )


class BootSettings(_Section, frozen=True, kw_only=True):
    """``[boot]``: what a daemon starting after boot (or ``guestwarden restore``) does."""

    on_boot: Literal["restore", "ignore"] = "restore"
    start_delay: Seconds = 0.0
    parallel_start: Annotated[int, Meta(ge=1, le=256)] = 4
    start_timeout: PositiveSeconds = 300.0
    sync_time: bool = True
    sync_time_timeout: PositiveSeconds = 60.0
    wait_for_agents: Seconds = 0.0
    """Between order groups: wait at most this long for the guest agents of the group's
    running guests to answer before the next group starts (0: do not wait)."""


class AdvancedSettings(_Section, frozen=True, kw_only=True):
    """``[advanced]``: protocol timings; the defaults suit every host we know of."""

    heartbeat_interval: Annotated[float, Meta(ge=0.05, le=60)] = 1.0
    heartbeat_timeout: Annotated[float, Meta(ge=0.2, le=600)] = 10.0
    job_grace: Annotated[float, Meta(ge=0.1, le=3600)] = 15.0
    connect_timeout: PositiveSeconds = 30.0
    max_attempts: Annotated[int, Meta(ge=1, le=10)] = 2
    progress_interval: Annotated[float, Meta(ge=0.05, le=60)] = 0.5
    """How often a worker reads a running save's progress (libvirt's jobStats)."""


class Rule(GuestPolicy, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[[rules]]``: a policy for the guests whose name matches ``match``.

    A guest's own metadata wins over rules; for each field, the first rule (in file
    order) that matches the guest and sets the field supplies it (supervisor/policy.py).
    """

    match: str
    """A shell-style pattern (``*``, ``?``, ``[...]``) for guest names, case-sensitive."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.match:
            raise ValueError('match: expected a name pattern such as "db-*", got ""')


OnServiceStop = Literal["preserve-if-host-shutdown", "preserve", "leave"]
"""What SIGTERM (the service being stopped) does to guests; see supervisor/hostshutdown.py."""


class Settings(_Section, frozen=True, kw_only=True):
    """The whole configuration file."""

    uris: Annotated[tuple[str, ...], Meta(min_length=1)] = ("qemu:///system",)
    state_dir: str = "/var/lib/guestwarden"
    runtime_dir: str = "/run/guestwarden"
    workers: Literal["auto"] | Annotated[int, Meta(ge=1, le=256)] = "auto"
    on_service_stop: OnServiceStop = "preserve-if-host-shutdown"
    allow_dueling: bool = False
    """Act on guests even while libvirt-guests or libvirt's auto-shutdown would too
    (supervisor/dueling.py); by default the daemon refuses and says why."""
    metrics_textfile: str = ""
    """After every preserve and restore, write the metrics here (Prometheus text format,
    for node_exporter's textfile collector; supervisor/metrics.py); "" = no file."""
    shutdown: ShutdownSettings = msgspec.field(default_factory=ShutdownSettings)
    boot: BootSettings = msgspec.field(default_factory=BootSettings)
    advanced: AdvancedSettings = msgspec.field(default_factory=AdvancedSettings)
    rules: tuple[Rule, ...] = ()
    """``[[rules]]`` tables, in file order."""

    def __post_init__(self) -> None:
        if len(set(self.uris)) != len(self.uris):
            raise ValueError(f"uris: each URI may appear only once, got {list(self.uris)}")
        for uri in self.uris:
            if not uri or any(c.isspace() for c in uri):
                raise ValueError(f"uris: expected libvirt URIs without spaces, got {uri!r}")
        for key in ("state_dir", "runtime_dir"):
            if not getattr(self, key).startswith("/"):
                raise ValueError(f"{key}: expected an absolute path, got {getattr(self, key)!r}")
        textfile = self.metrics_textfile
        if textfile and not (textfile.startswith("/") and textfile.endswith(".prom")):
            raise ValueError("metrics_textfile: expected \"\" or an absolute path ending in "
                             f"\".prom\" (node_exporter reads only *.prom), got {textfile!r}")


AUTO_SAVE_MAX = 8
"""``parallel_save = "auto"`` never goes beyond this many saves at once."""
WORKER_RSS_BYTES = 40 << 20
"""What one worker process costs (Python, libvirt, ZeroMQ): 38-40 MiB RSS measured."""
WORKER_MEMORY_SHARE = 0.10
"""``workers = "auto"`` keeps the whole pool within this share of the host's memory."""


def save_ceiling(settings: Settings, workers: int) -> int:
    """The most saves at once: ``parallel_save``, or for ``auto`` what the controller
    may climb to (one worker stays free for inventories and poweroffs)."""
    bound = settings.shutdown.parallel_save
    if isinstance(bound, int):
        return bound
    return max(1, min(AUTO_SAVE_MAX, workers - 1))


def resolve_worker_count(
    settings: Settings, cpu_count: int | None, memory_bytes: int | None = None
) -> int:
    """How many worker processes to run.

    A worker runs one job at a time, and a graceful shutdown holds its worker while it
    waits for the guest to go off, so the pool must be at least as large as the
    largest bound for the bounds to be reachable; ``auto`` takes that plus one (so an
    inventory or poweroff is never queued behind waits), and at least the number of
    CPUs (``parallel_save = "auto"`` counts as ``AUTO_SAVE_MAX``). It is capped at 64,
    and, when the host's memory is known (psutil, supervisor/capacity.py), so that
    the pool takes at most ``WORKER_MEMORY_SHARE`` of it: on a small host, memory
    matters more than reaching a bound that only a large host needs. Never below 2.
    """
    if isinstance(settings.workers, int):
        return settings.workers
    save = settings.shutdown.parallel_save
    bounds = (
        settings.shutdown.parallel_shutdown or 32,
        save if isinstance(save, int) else AUTO_SAVE_MAX,
        settings.boot.parallel_start,
    )
    cap = 64
    if memory_bytes:
        cap = min(cap, int(memory_bytes * WORKER_MEMORY_SHARE) // WORKER_RSS_BYTES)
    return max(2, min(cap, max(max(bounds) + 1, cpu_count or 1)))

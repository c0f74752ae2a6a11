"""The state journal: what the last preserve did to each guest, and what restore did.

One JSON file, ``{state_dir}/journal.json``, replaced atomically (temp file, fsync,
rename, fsync of the directory) so that a crash or power loss leaves either the old
or the new version, never a torn one. A file that cannot be decoded is moved aside
(``journal.json.corrupt-<time>``) and reported; the daemon starts with an empty one.

A run's periodic writes go to the journal's own thread (``save_in_background``):
writing and fsyncing the journal of 5,000 guests (2-5 MB) takes 10-25 ms, for which
the supervisor's loop would otherwise hand out no job, every half second of a long
run. Writes still land one at a time in the order asked for: ``save`` waits for a
background write in flight before it writes, and a run's last write is a ``save``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from pathlib import Path

import msgspec

from guestwarden.ipc.messages import RunStatus
from guestwarden.supervisor.learned import Learned

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1


class JournalData(msgspec.Struct, frozen=True, kw_only=True):
    version: int = JOURNAL_VERSION
    preserve: RunStatus | None = None
    preserve_boot_id: str = ""
    restore: RunStatus | None = None
    restored: tuple[str, ...] = ()
    """Guests (``uri uuid``) of ``preserve`` already brought back: never started twice."""
    restore_boot_id: str = ""
    """The boot in which the automatic restore ran; it runs once per boot."""
    learned: Learned = msgspec.field(default_factory=Learned)
    """Durations and save throughput measured by earlier runs (learned.py); kept
    across runs, so a writer replaces the fields it changes and keeps this one."""


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(JournalData)


def guest_key(uri: str, uuid: str) -> str:
    return f"{uri} {uuid}"


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "journal.json"
        self.notes: list[str] = []
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[None] | None = None

    def load(self) -> JournalData:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return JournalData()
        try:
            data = _DECODER.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            os.replace(self.path, aside)
            note = f"journal {self.path} could not be read ({exc}); moved aside to {aside}"
            log.error(note)
            self.notes.append(note)
            return JournalData()
        if data.version != JOURNAL_VERSION:
            note = f"journal {self.path} has version {data.version}; ignoring it"
            log.error(note)
            self.notes.append(note)
            return JournalData()
        return data

    def save(self, data: JournalData) -> None:
        """Write ``data`` durably now, after a background write still in flight."""
        if self._pending is not None:
            concurrent.futures.wait([self._pending])
            self._pending = None
        self._write(data)

    def save_in_background(self, data: JournalData) -> concurrent.futures.Future[None]:
        """Write ``data`` on the journal's thread; the future says when it is durable
        (or raises what the write raised). Only the loop's thread calls this."""
        if self._writer is None:
            self._writer = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="journal")
        self._pending = self._writer.submit(self._write, data)
        return self._pending

    def _write(self, data: JournalData) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, _ENCODER.encode(data))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

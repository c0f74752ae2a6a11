"""The journal's background writes: durable in the order asked for, failures reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestwarden.ipc.messages import RunStatus
from guestwarden.supervisor.journal import Journal, JournalData


def record(run_id: str) -> JournalData:
    return JournalData(preserve=RunStatus(run_id=run_id, kind="preserve", started_at=1.0))


def test_a_save_lands_after_the_background_write_before_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    pending = [journal.save_in_background(record(f"periodic-{i}")) for i in range(5)]
    journal.save(record("final"))
    assert all(f.done() for f in pending)  # save waited for them
    loaded = Journal(tmp_path).load().preserve
    assert loaded is not None and loaded.run_id == "final"


def test_background_write_is_durable_when_its_future_is_done(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.save_in_background(record("periodic")).result(timeout=10)
    loaded = Journal(tmp_path).load().preserve
    assert loaded is not None and loaded.run_id == "periodic"
    assert [p.name for p in tmp_path.iterdir()] == ["journal.json"]  # no temp file left


def test_background_failure_is_raised_by_its_future(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    future = Journal(tmp_path / "a-file" / "state").save_in_background(record("periodic"))
    with pytest.raises(NotADirectoryError):
        future.result(timeout=10)

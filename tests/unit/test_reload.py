"""Reload: what changed, what takes effect now, what waits for a restart."""

from __future__ import annotations

import msgspec

from guestwarden.conf.settings import AdvancedSettings, BootSettings, Settings, ShutdownSettings
from guestwarden.supervisor.reload import (
    describe_changes,
    diff_settings,
    effective_settings,
    flatten,
    is_live,
)


def test_no_change_no_lines() -> None:
    assert diff_settings(Settings(), Settings()) == ()


def test_changes_are_named_by_config_key_with_old_and_new_values() -> None:
    old = Settings()
    new = Settings(on_service_stop="leave", uris=("test:///default", "qemu:///system"),
                   shutdown=ShutdownSettings(parallel_save=2),
                   advanced=AdvancedSettings(heartbeat_timeout=5.0),
                   boot=BootSettings(on_boot="ignore", start_delay=1.5))
    changes = {c.key: c for c in diff_settings(old, new)}
    assert set(changes) == {"on_service_stop", "uris", "shutdown.parallel_save",
                            "advanced.heartbeat_timeout", "boot.on_boot", "boot.start_delay"}
    assert (changes["shutdown.parallel_save"].old, changes["shutdown.parallel_save"].new) == (
        "1", "2")
    assert changes["uris"].new == '["test:///default","qemu:///system"]'
    assert changes["on_service_stop"].new == '"leave"'
    live = {k for k, c in changes.items() if c.live}
    assert live == {"on_service_stop", "uris", "shutdown.parallel_save", "boot.start_delay"}
    lines = describe_changes(tuple(changes.values()))
    assert "shutdown.parallel_save: 1 -> 2 (in effect now)" in lines
    assert ("advanced.heartbeat_timeout: 10.0 -> 5.0 (needs a restart; 10.0 stays in force "
            "until then)") in lines


def test_restart_only_keys_keep_their_old_values() -> None:
    old = Settings()
    new = Settings(state_dir="/srv/gw", runtime_dir="/run/other", workers=3,
                   shutdown=ShutdownSettings(parallel_shutdown=2),
                   boot=BootSettings(on_boot="ignore", sync_time=False),
                   advanced=AdvancedSettings(job_grace=1.0))
    used = effective_settings(old, new)
    assert (used.state_dir, used.runtime_dir) == (old.state_dir, old.runtime_dir)
    assert used.advanced == old.advanced and used.boot.on_boot == "restore"
    assert used.workers == 3 and used.shutdown.parallel_shutdown == 2
    assert used.boot.sync_time is False
    # every key of the schema is classified, and flatten covers them all
    keys = set(flatten(old))
    assert {k for k in keys if not is_live(k)} == {
        "state_dir", "runtime_dir", "boot.on_boot",
        *(f"advanced.{f}" for f in msgspec.structs.asdict(AdvancedSettings()))}

"""`guestwarden config check` and `config import-libvirt-guests`, on real files."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from guestwarden.cli import main
from guestwarden.conf.libvirt_guests import LibvirtGuestsError
from guestwarden.conf.libvirt_guests_list import TAKEN_OVER, parse_guest_list, taken_over_run
from guestwarden.conf.loading import load_settings, parse_settings
from guestwarden.conf.render import render_settings
from guestwarden.conf.settings import BootSettings, Settings, ShutdownSettings
from guestwarden.exitcodes import ExitCode
from guestwarden.ipc.messages import GuestOutcome, RunStatus
from guestwarden.supervisor.journal import Journal, JournalData
from guestwarden.supervisor.restore import restore_candidates

U1 = "11111111-2222-3333-4444-555555555555"
U2 = "AAAAAAAA-2222-3333-4444-555555555555"
U3 = "33333333-2222-3333-4444-555555555555"


def config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "guestwarden.toml"
    path.write_text(f'uris = ["qemu:///system", "lxc:///"]\nstate_dir = "{tmp_path}/state"\n'
                    f'runtime_dir = "{tmp_path}/run"\n{extra}')
    return path


# ---------------------------------------------------------------------- rendering


def test_render_reads_back_to_the_same_settings() -> None:
    odd = Settings(uris=("qemu:///system", 'test:///"quoted"\\path'), workers=7,
                   shutdown=ShutdownSettings(persistent=("shutdown",), shutdown_timeout=12.5),
                   boot=BootSettings(on_boot="ignore", sync_time=False))
    for settings in (Settings(), odd):
        assert parse_settings(render_settings(settings).encode(), Path("x")) == settings


def test_render_writes_arrays_of_tables_and_leaves_unset_keys_out() -> None:
    settings = parse_settings(b'[[rules]]\nmatch = "db-*"\nexclude = true\n'
                              b'[[rules]]\nmatch = "web*"\nshutdown_timeout = 20\n', Path("x"))
    text = render_settings(settings)
    assert text.count("[[rules]]") == 2 and "null" not in text and "None" not in text
    assert parse_settings(text.encode(), Path("y")) == settings


# ---------------------------------------------------------------------- check


def test_check_prints_every_key_with_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "[boot]\nstart_delay = 3\n")
    assert main(["config", "check", str(path), "--dueling-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{path} (valid)" in out
    shown = parse_settings(out.encode(), path)
    assert shown == load_settings(path)
    for key in ("save_timeout = 900.0", "parallel_start = 4", "allow_dueling = false"):
        assert key in out  # defaults are shown, not only what the file sets


def test_check_takes_config_from_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path)
    assert main(["--config", str(path), "config", "check",
                 "--dueling-root", str(tmp_path)]) == 0
    assert '"lxc:///"' in capsys.readouterr().out


def test_check_bad_config_exits_2_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "[shutdown]\nparallel_save = 0\n")
    assert main(["config", "check", str(path)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert str(path) in err and "shutdown.parallel_save" in err
    assert main(["config", "check", str(tmp_path / "missing.toml")]) == ExitCode.CONFIG


def test_check_warns_about_a_dueling_setup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = tmp_path / "etc/systemd/system/multi-user.target.wants/libvirt-guests.service"
    link.parent.mkdir(parents=True)
    link.symlink_to("/usr/lib/systemd/system/libvirt-guests.service")
    assert main(["config", "check", str(config(tmp_path)),
                 "--dueling-root", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "libvirt-guests.service is enabled" in err
    assert "the daemon refuses to preserve and restore guests" in err


# ---------------------------------------------------------------------- translation


def test_import_writes_output_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "default" / "libvirt-guests"
    source.parent.mkdir()
    source.write_text("ON_SHUTDOWN=shutdown\nPARALLEL_SHUTDOWN=3\n")
    out = tmp_path / "new.toml"
    assert main(["config", "import-libvirt-guests", str(source), "--output", str(out)]) == 0
    assert load_settings(out).shutdown.parallel_shutdown == 3
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    before = out.read_text()
    source.write_text("ON_SHUTDOWN=shutdown\nPARALLEL_SHUTDOWN=4\n")
    capsys.readouterr()
    assert main(["config", "import-libvirt-guests", str(source), "--output",
                 str(out)]) == ExitCode.FAILED
    assert "--force" in capsys.readouterr().err
    assert out.read_text() == before
    assert main(["config", "import-libvirt-guests", str(source), "--output", str(out),
                 "--force"]) == 0
    assert load_settings(out).shutdown.parallel_shutdown == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_import_to_stdout_with_distro_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "libvirt-guests.copy"
    source.write_text("")
    assert main(["config", "import-libvirt-guests", str(source)]) == ExitCode.CONFIG
    assert "--distro" in capsys.readouterr().err
    assert main(["config", "import-libvirt-guests", str(source), "--distro", "fedora"]) == 0
    settings = parse_settings(capsys.readouterr().out.encode(), source)
    assert settings.boot.on_boot == "restore"
    # libvirt-guests without a config file: its defaults
    assert main(["config", "import-libvirt-guests", "/dev/null", "--distro", "debian"]) == 0
    settings = parse_settings(capsys.readouterr().out.encode(), source)
    assert settings.shutdown.persistent == ("shutdown", "poweroff")


def test_import_refuses_unevaluable_shell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "sysconfig" / "libvirt-guests"
    source.parent.mkdir()
    source.write_text("ON_BOOT=start\nSHUTDOWN_TIMEOUT=$((60 * 5))\n")
    assert main(["config", "import-libvirt-guests", str(source)]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert f"{source} line 2:" in err and "cannot be evaluated" in err


# ---------------------------------------------------------------------- the list


def test_list_parsing_and_record(tmp_path: Path) -> None:
    path = tmp_path / "libvirt-guests"
    listed = parse_guest_list(f"default {U1} {U2}\n\nlxc:/// {U3}\nxen:/// {U3}\n"
                              f"default {U1}\n", path)
    assert [(e.uri, e.line) for e in listed] == [("default", 1), ("lxc:///", 3),
                                                 ("xen:///", 4), ("default", 5)]
    run, skipped = taken_over_run(listed, list_path=path, written_at=1_700_000_000.0,
                                  uris=("qemu:///system", "lxc:///"),
                                  default_uri="qemu:///system")
    assert [(g.uri, g.uuid) for g in run.guests] == [
        ("qemu:///system", U1), ("qemu:///system", U2.lower()), ("lxc:///", U3)]
    assert all(g.outcome == TAKEN_OVER and g.state_before == "running" for g in run.guests)
    assert len(skipped) == 1 and "line 4" in skipped[0] and "xen:///" in skipped[0]
    data = JournalData(preserve=run)
    assert restore_candidates(data) == list(run.guests)


def test_list_with_junk_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(LibvirtGuestsError, match=r"libvirt-guests line 2: 'guest-name'"):
        parse_guest_list(f"qemu:///system {U1}\nqemu:///system guest-name\n",
                         tmp_path / "libvirt-guests")


def test_list_takeover_writes_the_journal_and_moves_the_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    listing = tmp_path / "libvirt-guests"
    listing.write_text(f"qemu:///system {U1} {U2}\n")
    assert main(["--config", str(cfg), "config", "import-libvirt-guests",
                 "--list", str(listing)]) == 0
    assert "took over 2 guests" in capsys.readouterr().out
    assert not listing.exists()
    assert (tmp_path / "libvirt-guests.taken-over-by-guestwarden").exists()
    raw = json.loads((tmp_path / "state" / "journal.json").read_text())
    assert [g["outcome"] for g in raw["preserve"]["guests"]] == [TAKEN_OVER] * 2
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"

    # a second list while the first guests are not restored: refused, then forced
    listing.write_text(f"qemu:///system {U3}\n")
    args = ["--config", str(cfg), "config", "import-libvirt-guests", "--list", str(listing)]
    assert main(args) == ExitCode.FAILED
    assert "were not restored yet" in capsys.readouterr().err
    assert listing.exists()
    assert main([*args, "--force"]) == 0
    data = Journal(tmp_path / "state").load()
    assert data.preserve is not None
    assert [g.uuid for g in data.preserve.guests] == [U3]


def test_list_takeover_with_nothing_to_take(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    args = ["--config", str(cfg), "config", "import-libvirt-guests", "--list"]
    assert main([*args, str(tmp_path / "none")]) == 0
    assert "does not exist" in capsys.readouterr().out
    listing = tmp_path / "libvirt-guests"
    listing.write_text(f"xen:///system {U1}\n")
    assert main([*args, str(listing)]) == 0
    captured = capsys.readouterr()
    assert "left out" in captured.err and "journal is unchanged" in captured.out
    assert listing.exists() and not (tmp_path / "state" / "journal.json").exists()


def test_list_takeover_refused_while_a_daemon_holds_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path)
    (tmp_path / "run").mkdir()
    fd = os.open(tmp_path / "run" / "guestwarden.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        listing = tmp_path / "libvirt-guests"
        listing.write_text(f"qemu:///system {U1}\n")
        assert main(["--config", str(cfg), "config", "import-libvirt-guests",
                     "--list", str(listing)]) == ExitCode.FAILED
        err = capsys.readouterr().err
        assert "daemon (pid 4242) is running" in err
        assert listing.exists() and not (tmp_path / "state" / "journal.json").exists()
    finally:
        os.close(fd)


def test_list_option_does_not_mix_with_translation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "import-libvirt-guests", "--output", str(tmp_path / "x"),
                 "--list", str(tmp_path / "l")]) == ExitCode.CONFIG
    assert "separate command" in capsys.readouterr().err


def test_a_restored_takeover_may_be_replaced_without_force(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    old = RunStatus(run_id="old", kind="preserve", started_at=0, finished_at=1, ok=True,
                    guests=(GuestOutcome(uri="qemu:///system", uuid=U1, name="a",
                                         persistent=True, state_before="running",
                                         outcome="saved", ok=True, finished=True),))
    Journal(tmp_path / "state").save(
        JournalData(preserve=old, restored=(f"qemu:///system {U1}",)))
    listing = tmp_path / "libvirt-guests"
    listing.write_text(f"qemu:///system {U2}\n")
    assert main(["--config", str(cfg), "config", "import-libvirt-guests",
                 "--list", str(listing)]) == 0
    data = Journal(tmp_path / "state").load()
    assert data.preserve is not None and data.restored == ()
    assert data.preserve.run_id.startswith("libvirt-guests-")

"""Per-guest policy, order groups, learned durations and capacity: the real daemon, CLI and
workers against libvirt's test driver in the isolated libvirtd.

The test driver's actions are instant, so nothing here is about speed: the order of
events comes from the journal's ``spans_ns`` (the workers' CLOCK_MONOTONIC).
"""

from __future__ import annotations

import json
import re
from itertools import pairwise
from typing import Any

import libvirt
import msgspec

from guestwarden.conf import guestpolicy
from guestwarden.conf.loading import load_settings
from guestwarden.conf.settings import resolve_worker_count
from guestwarden.supervisor.capacity import host_resources
from guestwarden.supervisor.journal import JournalData
from guestwarden.supervisor.learned import ActionStats, GuestHistory, Learned
from testbed.daemon import GuestwardenDaemon, wait_for
from testbed.guests import define_guests, guest_xml
from testbed.hostbus import system_bus_with_logind
from tests.integration.conftest import DaemonFactory

Records = dict[str, dict[str, Any]]


def add_rules(daemon: GuestwardenDaemon, *rules: str) -> None:
    """Append ``[[rules]]`` tables (TOML text) to the daemon's config before it starts."""
    with daemon.config.open("a") as f:
        for rule in rules:
            f.write(f"\n[[rules]]\n{rule}\n")


def journal(daemon: GuestwardenDaemon) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((daemon.state_dir / "journal.json").read_text())
    return data


def records(daemon: GuestwardenDaemon, kind: str) -> Records:
    return {g["name"]: g for g in journal(daemon)[kind]["guests"]}


def span(record: dict[str, Any], action: str) -> tuple[int, int]:
    start, end = record["spans_ns"][action]
    return int(start), int(end)


def metadata(conn: Any, name: str) -> str | None:
    try:
        text: str = conn.lookupByName(name).metadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT, guestpolicy.NAMESPACE, 0)
    except libvirt.libvirtError as exc:
        assert exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA
        return None
    return text


def ok(result: Any) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    out: str = result.stdout
    return out


def test_policy_cli_writes_metadata_that_travels_with_the_guest(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "m", running=1, transient_running=1)
    daemon = make_daemon(workers=2)
    daemon.start()
    out = ok(daemon.cli("policy", "set", "m-running-0", "--chain", "shutdown,poweroff",
                        "--order", "10", "--shutdown-timeout", "45", "--start-delay", "2",
                        "--exclude"))
    assert "metadata written" in out
    text = metadata(test_conn, "m-running-0")
    assert text is not None
    assert guestpolicy.from_xml(text) == guestpolicy.convert(
        {"chain": ["shutdown", "poweroff"], "order": 10, "shutdown_timeout": 45.0,
         "start_delay": 2.0, "exclude": True})
    ok(daemon.cli("policy", "set", "m-running-0", "--no-exclude", "--unset", "start-delay"))
    shown = json.loads(ok(daemon.cli("policy", "show", "m-running-0", "--json")))
    assert shown["metadata"] == {"chain": ["shutdown", "poweroff"], "order": 10,
                                 "shutdown_timeout": 45.0, "start_delay": None,
                                 "exclude": False}
    assert shown["guest"]["sources"] == {"chain": "metadata", "order": "metadata",
                                         "shutdown_timeout": "metadata",
                                         "start_delay": "default", "exclude": "metadata"}

    # the element is in the guest's persistent XML: a guest defined from a copy has it
    xml = test_conn.lookupByName("m-running-0").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    copy = re.sub(r"<uuid>.*</uuid>", "", xml.replace("m-running-0", "m-copy"))
    test_conn.defineXML(copy)
    shown = json.loads(ok(daemon.cli("policy", "show", "m-copy", "--json")))
    assert shown["guest"]["order"] == 10 and shown["guest"]["sources"]["order"] == "metadata"

    ok(daemon.cli("policy", "clear", "m-running-0"))
    assert metadata(test_conn, "m-running-0") is None
    # refusals: exit 2 for usage, 1 for what the daemon refuses, each saying why
    for args, code, words in (
        (("policy", "set", "m-copy"), 2, "nothing to change"),
        (("policy", "set", "m-copy", "--chain", "nap"), 2, "nap"),
        (("policy", "set", "nope", "--order", "1"), 1, "no guest 'nope'"),
        (("policy", "set", "m-transient-running-0", "--chain", "save"), 1, "transient"),
    ):
        result = daemon.cli(*args)
        assert result.returncode == code and words in result.stderr, result.stderr
    assert "guest=m-running-0 policy cleared" in daemon.log_text()


def test_plan_shows_values_sources_estimate_and_warnings(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "db", running=2)
    define_guests(test_conn, "web", running=1, off=1)
    define_guests(test_conn, "k8s", running=1)
    daemon = make_daemon(workers=3, shutdown={"parallel_shutdown": 1})
    add_rules(daemon, 'match = "db-*"\nchain = ["shutdown", "poweroff"]\nshutdown_timeout = 1000',
              'match = "k8s-*"\nexclude = true')
    daemon.start()
    # metadata someone wrote by hand, and got wrong: ignored for that guest, and said so
    test_conn.lookupByName("web-running-0").setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT, '<policy order="soon"/>', "gw",
        guestpolicy.NAMESPACE, libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    ok(daemon.cli("policy", "set", "db-running-1", "--order", "5"))
    plan = json.loads(ok(daemon.cli("plan", "--json")))
    guests = {g["name"]: g for g in plan["guests"]}
    db0, db1, web, pod = (guests[n] for n in ("db-running-0", "db-running-1", "web-running-0",
                                              "k8s-running-0"))
    assert db1["sources"]["order"] == "metadata" and db1["order"] == 5
    assert db0["sources"]["chain"] == "rule 1 (db-*)" and db0["shutdown_timeout"] == 1000
    assert db0["expected_s"] == 1000  # never seen to shut down: its whole timeout
    assert (db1["rank"], db0["rank"], web["rank"]) == (1, 2, 3)  # order 5 first, then 0
    assert pod["chain"] == [] and pod["note"] == "excluded (rule 2 (k8s-*))"
    assert "order: expected an integer" in web["policy_error"]
    assert guests["web-off-0"]["rank"] == 0
    assert plan["estimate_s"] >= 2000  # one shutdown at a time, each priced at 1000 s
    assert any("JobTimeoutSec" in w for w in plan["warnings"])
    text = ok(daemon.cli("plan"))
    assert "WARNING: web-running-0: its guestwarden metadata is not valid" in text
    assert "preserve expected to take about" in text and "WARNING: preserving" in text


def write_history(daemon: GuestwardenDaemon, conn: Any, seconds: dict[str, float]) -> None:
    """A journal whose learned durations say how long some guests' saves take."""
    guests = {f"{daemon_uri(daemon)} {conn.lookupByName(n).UUIDString()}": GuestHistory(
        name=n, actions={"save": ActionStats(mean_s=s)}, seen_at=0.0)
        for n, s in seconds.items()}
    data = JournalData(learned=Learned(guests=guests))
    daemon.state_dir.mkdir(parents=True, exist_ok=True)
    (daemon.state_dir / "journal.json").write_bytes(msgspec.json.encode(data))


def daemon_uri(daemon: GuestwardenDaemon) -> str:
    return load_settings(daemon.config).uris[0]


def test_preserve_and_restore_follow_groups_and_learned_durations(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "app", running=4)
    define_guests(test_conn, "db", running=2)
    define_guests(test_conn, "ex", running=1)
    test_conn.defineXML(guest_xml("fw")).create()
    daemon = make_daemon(workers=4, shutdown={"parallel_save": 1},
                         boot={"wait_for_agents": 10.0, "sync_time": False})
    add_rules(daemon, 'match = "db-*"\norder = 10', 'match = "ex-*"\nexclude = true')
    # saved before: app-2 is slow, app-0 less so; the others are priced by memory alike
    write_history(daemon, test_conn, {"app-running-2": 100.0, "app-running-0": 50.0})
    daemon.start()
    ok(daemon.cli("policy", "set", "fw", "--order", "-10"))
    ok(daemon.cli("preserve", "--wait"))

    saved = records(daemon, "preserve")
    assert saved["ex-running-0"]["outcome"] == "excluded"
    assert test_conn.lookupByName("ex-running-0").isActive()
    groups = [["db-running-0", "db-running-1"], [f"app-running-{i}" for i in range(4)], ["fw"]]
    for before, after in pairwise(groups):  # the barrier
        assert max(span(saved[n], "save")[1] for n in before) <= min(
            span(saved[n], "save")[0] for n in after), (before, after)
    apps = sorted(groups[1], key=lambda n: span(saved[n], "save")[0])
    assert apps == ["app-running-2", "app-running-0", "app-running-1", "app-running-3"]

    ok(daemon.cli("restore", "--wait"))
    back = records(daemon, "restore")
    assert "ex-running-0" not in back
    starts = [["fw"], groups[1], groups[0]]  # lowest order first
    for before, after in pairwise(starts):
        # every start and every agent of a group answered before the next group started
        assert max(span(back[n], "agent_wait")[1] for n in before) <= min(
            span(back[n], "start")[0] for n in after), (before, after)
        assert max(span(back[n], "start")[1] for n in before) <= min(
            span(back[n], "start")[0] for n in after)
    assert not any("agent_wait" in back[n]["spans_ns"] for n in groups[0])  # the last group

    learned = journal(daemon)["learned"]
    by_name = {g["name"]: g["actions"] for g in learned["guests"].values()}
    assert by_name["app-running-2"]["save"]["runs"] == 2
    assert by_name["app-running-2"]["save"]["mean_s"] < 100.0 * 0.71  # the new one counts
    assert set(by_name["fw"]) == {"save", "start"}
    assert learned["save_bytes_per_s"] > 0


def test_parallel_save_auto_adds_saves_only_on_a_measured_gain(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "s", running=80)
    daemon = make_daemon(workers=5, shutdown={"parallel_save": "auto"})
    daemon.start()
    ok(daemon.cli("preserve", "--wait"))
    steps = re.findall(r"parallel_save auto: (\d+) saves? at once writes? (\d+) MB/s(.*)",
                       daemon.log_text())
    assert steps, daemon.log_tail()
    levels = [int(level) for level, _, _ in steps]
    assert levels == list(range(1, len(levels) + 1))  # one more at a time, from one
    rates = [int(rate) for _, rate, _ in steps]
    for number, (level, _, rest) in enumerate(steps[1:], 1):
        gained = rates[number] >= rates[number - 1] * 1.1 - 1  # MB/s are rounded
        if "trying" in rest:
            assert gained, steps
        elif "not worth it" in rest:
            assert not gained or rates[number] < rates[number - 1] * 1.1 + 1, steps
            assert number == len(steps) - 1 and f"staying at {int(level) - 1}" in rest
    final = levels[-1] - 1 if "not worth it" in steps[-1][2] else levels[-1]
    assert final <= 4  # the ceiling with 5 workers: one stays free
    assert daemon.status().peak_in_flight["save"] <= max(levels)
    assert journal(daemon)["learned"]["save_parallel"] == final


def test_workers_auto_is_sized_from_the_host(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(workers="auto", shutdown={"parallel_shutdown": 2},
                         boot={"parallel_start": 1})
    status = daemon.start()
    expected = resolve_worker_count(load_settings(daemon.config), *host_resources())
    assert status.workers_target == expected == max(3, host_resources()[0] or 1)
    assert re.search(rf"workers auto: {expected} \(bounds of the config, \d+ CPUs, \d+ MiB",
                     daemon.log_text())


def test_plan_warns_when_logind_would_not_wait_long_enough(
    test_conn: Any, make_daemon: DaemonFactory
) -> None:
    define_guests(test_conn, "w", running=2)
    with system_bus_with_logind(delay_max_s=5) as (bus, _logind):
        daemon = make_daemon(workers=2, shutdown={"persistent": ["shutdown", "poweroff"],
                                                  "shutdown_timeout": 30.0},
                             env={"DBUS_SYSTEM_BUS_ADDRESS": bus.address})
        daemon.start()
        wait_for(lambda: daemon.status().inhibit_delay_max_s == 5, 20,
                 "the daemon to read logind's InhibitDelayMaxUSec")
        plan = json.loads(ok(daemon.cli("plan", "--json")))
        assert plan["inhibit_delay_max_s"] == 5 and plan["estimate_s"] == 30
        assert any("InhibitDelayMaxUSec" in w and "about 30s" in w for w in plan["warnings"])
        daemon.stop()  # before its bus goes away

"""Per-guest policy: the metadata element, the config's rules, and which source wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from guestwarden.conf import guestpolicy
from guestwarden.conf.loading import ConfigError, parse_settings
from guestwarden.conf.settings import Settings
from guestwarden.ipc.messages import GuestInfo, GuestPolicy, GuestState
from guestwarden.supervisor.plan import chain_for
from guestwarden.supervisor.policy import resolve_policy

P = Path("/etc/guestwarden/guestwarden.toml")


def settings(text: str) -> Settings:
    return parse_settings(text.encode(), P)


def guest(name: str, *, state: GuestState = "running", persistent: bool = True,
          policy: GuestPolicy | None = None, policy_error: str = "") -> GuestInfo:
    return GuestInfo(uri="u", uuid=name, name=name, state=state, persistent=persistent,
                     policy=policy, policy_error=policy_error)


# --------------------------------------------------------------------------- the element


def test_element_round_trips_and_uses_the_config_vocabulary() -> None:
    policy = GuestPolicy(chain=("save", "poweroff"), order=-10, shutdown_timeout=60.0,
                         start_delay=2.5, exclude=False)
    xml = guestpolicy.to_xml(policy)
    assert xml == ('<policy chain="save,poweroff" order="-10" shutdown_timeout="60" '
                   'start_delay="2.5" exclude="no"/>')
    assert guestpolicy.from_xml(xml) == policy
    # as libvirt hands it back: with our namespace on the element
    assert guestpolicy.from_xml(
        f'<g:policy xmlns:g="{guestpolicy.NAMESPACE}" g:exclude="yes"/>'
    ) == GuestPolicy(exclude=True)
    assert guestpolicy.from_xml("<policy/>") == GuestPolicy()


@pytest.mark.parametrize(("xml", "words"), [
    ('<policy chain="save,save"/>', ["chain", "only once"]),
    ('<policy chain="nap"/>', ["chain", "nap", "save, shutdown, poweroff"]),
    ('<policy order="ten"/>', ["order", "integer", "ten"]),
    ('<policy order="20000"/>', ["order", "10000"]),
    ('<policy shutdown_timeout="0"/>', ["shutdown_timeout", "> 0"]),
    ('<policy exclude="maybe"/>', ["exclude", "yes or no"]),
    ('<policy colour="red"/>', ["unknown attribute 'colour'", "chain, order"]),
    ("<other/>", ["<policy>", "<other>"]),
    ("not xml", ["not XML"]),
])
def test_bad_elements_say_what_is_wrong(xml: str, words: list[str]) -> None:
    with pytest.raises(guestpolicy.PolicyError) as caught:
        guestpolicy.from_xml(xml)
    for word in words:
        assert word in str(caught.value)


def test_merge_changes_given_fields_and_unsets_others() -> None:
    base = GuestPolicy(chain=("shutdown",), order=3, exclude=True)
    merged = guestpolicy.merge(base, GuestPolicy(order=7, start_delay=1.0), ("exclude",))
    assert merged == GuestPolicy(chain=("shutdown",), order=7, start_delay=1.0)
    assert guestpolicy.is_empty(guestpolicy.merge(merged, GuestPolicy(),
                                                  ("chain", "order", "start_delay")))
    with pytest.raises(guestpolicy.PolicyError, match="cannot unset colour"):
        guestpolicy.merge(base, GuestPolicy(), ("colour",))


def test_save_is_refused_for_transient_guests_only() -> None:
    saving = GuestPolicy(chain=("save", "poweroff"))
    assert "transient" in guestpolicy.refusal(saving, persistent=False)
    assert guestpolicy.refusal(saving, persistent=True) == ""


# --------------------------------------------------------------------------- precedence

RULES = """
[shutdown]
shutdown_timeout = 120
[boot]
start_delay = 3
[[rules]]
match = "db-*"
order = 10
chain = ["shutdown", "poweroff"]
[[rules]]
match = "*"
order = 1
shutdown_timeout = 30
[[rules]]
match = "k8s-?"
exclude = true
"""


def test_metadata_then_first_matching_rule_per_field_then_defaults() -> None:
    s = settings(RULES)
    db = resolve_policy(guest("db-1", policy=GuestPolicy(shutdown_timeout=5.0)), s)
    assert (db.chain, db.order, db.shutdown_timeout, db.start_delay, db.exclude) == (
        ("shutdown", "poweroff"), 10, 5.0, 3.0, False)
    assert db.sources == {"chain": "rule 1 (db-*)", "order": "rule 1 (db-*)",
                          "shutdown_timeout": "metadata", "start_delay": "default",
                          "exclude": "default"}
    web = resolve_policy(guest("web"), s)
    assert (web.chain, web.order, web.shutdown_timeout) == (
        ("save", "shutdown", "poweroff"), 1, 30.0)
    assert web.sources["order"] == "rule 2 (*)" and web.sources["chain"] == "default"
    # metadata beats a rule that excludes
    pod = resolve_policy(guest("k8s-1", policy=GuestPolicy(exclude=False)), s)
    assert pod.chain and not pod.exclude and pod.sources["exclude"] == "metadata"
    assert resolve_policy(guest("k8s-2"), s).chain == ()
    assert resolve_policy(guest("k8s-2"), s).note == "excluded (rule 3 (k8s-?))"
    # patterns are case-sensitive shell patterns
    assert resolve_policy(guest("DB-1"), s).order == 1


def test_chains_are_fitted_to_the_guest() -> None:
    s = settings(RULES)
    transient = resolve_policy(
        guest("t", persistent=False, policy=GuestPolicy(chain=("save", "poweroff"))), s)
    assert transient.chain == ("poweroff",) and "transient" in transient.note
    only_save = resolve_policy(guest("t", persistent=False, policy=GuestPolicy(chain=("save",))),
                               s)
    assert only_save.chain == s.shutdown.transient
    assert resolve_policy(guest("db-2", state="paused"), s).chain == ("poweroff",)
    off = resolve_policy(guest("db-3", state="shutoff"), s)
    assert off.chain == () and off.note == "left alone (shutoff)" and off.order == 10
    assert chain_for(guest("db-1"), s) == ("shutdown", "poweroff")  # everyone asks policy.py


def test_unusable_metadata_is_reported_and_rules_apply() -> None:
    policy = resolve_policy(guest("db-1", policy_error="not valid"), settings(RULES))
    assert policy.policy_error == "not valid" and policy.sources["order"] == "rule 1 (db-*)"


@pytest.mark.parametrize(("text", "words"), [
    ('[[rules]]\norder = 1', ["key rules[1]", "match"]),
    ('[[rules]]\nmatch = "a"\n[[rules]]\nmatch = "b"\ncolour = 1',
     ["unknown key 'rules[2].colour'", "match", "exclude"]),
    ('[[rules]]\nmatch = "a"\norder = "x"', ["key rules[1].order", "-10000 to 10000"]),
    ('[[rules]]\nmatch = "a"\nchain = ["save", "save"]', ["rules[1].chain", "only once"]),
    ('[[rules]]\nmatch = ""', ["rules[1].match", "db-*"]),
    ('[shutdown]\nparallel_save = "fast"', ["shutdown.parallel_save", '"auto"', "1 to 256"]),
    ('[boot]\nwait_for_agents = -1', ["boot.wait_for_agents", "0 to 86400"]),
])
def test_config_errors_name_file_key_and_allowed_values(text: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(text)
    assert str(P) in str(caught.value)
    for word in words:
        assert word in str(caught.value)

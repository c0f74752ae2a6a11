"""A guest's own policy as an element of its libvirt metadata, and edits of it.

The element lives in the guest's domain XML (``virDomainSetMetadata``), so it goes
wherever the guest goes: a migration, a copied XML, a backup of the definition::

    <metadata>
      <guestwarden:policy xmlns:guestwarden="urn:guestwarden:policy:1"
          chain="save,poweroff" order="10" shutdown_timeout="60" start_delay="5"
          exclude="no"/>
    </metadata>

Attribute names are the config file's keys (``[[rules]]``) and the JSON keys of
``plan``, so there is one vocabulary. Every attribute is optional. ``virsh metadata
GUEST urn:guestwarden:policy:1`` shows it; ``guestwarden policy`` edits it.

Pure functions: the worker (workers/actions.py) reads and writes the text, the
supervisor and the CLI check and merge. A guest whose element cannot be read keeps
running with rules and defaults, and ``plan`` says why its metadata was ignored.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import msgspec

from guestwarden.ipc.messages import GuestPolicy

NAMESPACE = "urn:guestwarden:policy:1"
PREFIX = "guestwarden"
ELEMENT = "policy"
FIELDS = ("chain", "order", "shutdown_timeout", "start_delay", "exclude")
_TRUE = frozenset({"yes", "true", "1", "on"})
_FALSE = frozenset({"no", "false", "0", "off"})


class PolicyError(ValueError):
    """Metadata or a request that is not a valid policy; the message is for people."""


def to_xml(policy: GuestPolicy) -> str:
    """The element without namespace (libvirt adds it with the prefix we give)."""
    attrs = []
    for name in FIELDS:
        value = getattr(policy, name)
        if value is not None:
            attrs.append(f'{name}="{_text(name, value)}"')
    return f"<{ELEMENT} {' '.join(attrs)}/>" if attrs else f"<{ELEMENT}/>"


def from_xml(text: str) -> GuestPolicy:
    """Parse what ``virDomainGetMetadata`` returned; PolicyError says what is wrong."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise PolicyError(f"not XML: {exc}") from None
    tag = root.tag.rsplit("}", 1)[-1]
    if tag != ELEMENT:
        raise PolicyError(f"expected a <{ELEMENT}> element, got <{tag}>")
    raw: dict[str, Any] = {}
    for name, value in root.attrib.items():
        key = name.rsplit("}", 1)[-1]
        if key not in FIELDS:
            raise PolicyError(f"unknown attribute {key!r}; allowed: {', '.join(FIELDS)}")
        raw[key] = _attribute(key, value.strip())
    return convert(raw)


def _attribute(key: str, value: str) -> Any:
    if key == "chain":
        return [part.strip() for part in value.split(",") if part.strip()]
    if key == "exclude":
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise PolicyError(f"exclude: expected yes or no, got {value!r}")
    try:
        return int(value) if key == "order" else float(value)
    except ValueError:
        kind = "an integer" if key == "order" else "a number of seconds"
        raise PolicyError(f"{key}: expected {kind}, got {value!r}") from None


def convert(raw: dict[str, Any]) -> GuestPolicy:
    """A GuestPolicy from plain values, with the schema's checks and a message for people."""
    try:
        return msgspec.convert(raw, GuestPolicy)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = message.rsplit(" - at `$.", 1)
        if len(where) == 2:
            key = where[1].rstrip("`").split("[", 1)[0]
            message = f"{key}: {where[0]}"
            if key == "chain":
                message += "; allowed: save, shutdown, poweroff"
        raise PolicyError(message.replace("`", "")) from None


def merge(base: GuestPolicy | None, changes: GuestPolicy, unset: tuple[str, ...]) -> GuestPolicy:
    """``base`` with the fields set in ``changes`` replaced and those in ``unset`` removed."""
    unknown = [name for name in unset if name not in FIELDS]
    if unknown:
        raise PolicyError(f"cannot unset {', '.join(unknown)}; fields: {', '.join(FIELDS)}")
    values = {name: getattr(base, name) for name in FIELDS} if base else {}
    for name in FIELDS:
        if getattr(changes, name) is not None:
            values[name] = getattr(changes, name)
    for name in unset:
        values[name] = None
    return GuestPolicy(**values)


def is_empty(policy: GuestPolicy | None) -> bool:
    return policy is None or all(getattr(policy, name) is None for name in FIELDS)


def refusal(policy: GuestPolicy, *, persistent: bool) -> str:
    """Why this policy cannot be set on such a guest, or "" when it can."""
    if not persistent and policy.chain is not None and "save" in policy.chain:
        return ('chain: "save" is not possible for a transient guest (libvirt keeps no '
                "managed-save image for it); use shutdown and poweroff")
    return ""


def describe(policy: GuestPolicy | None) -> str:
    """``chain=save,poweroff order=10`` for the log; "none" when nothing is set."""
    if is_empty(policy):
        return "none"
    assert policy is not None
    parts = []
    for name in FIELDS:
        value = getattr(policy, name)
        if value is not None:
            parts.append(f"{name}={_text(name, value)}")
    return " ".join(parts)


def _text(name: str, value: Any) -> str:
    """A field's value as the metadata attribute holds it."""
    if name == "chain":
        return ",".join(value)
    if name == "exclude":
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)

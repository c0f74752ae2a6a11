"""Find, read and validate ``guestwarden.toml``.

Every problem becomes one ``ConfigError`` whose message names the file, the key and
what is allowed, so that ``guestwarden`` can print it and exit 2 before anything
starts.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from guestwarden.conf.settings import CONFIG_ENV, DEFAULT_CONFIG_PATH, Settings

_AT_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")


class ConfigError(Exception):
    """A configuration that cannot be used; the message is meant for people."""


def config_path(explicit: str | None, environ: dict[str, str] | None = None) -> Path:
    """``--config PATH``, else ``$GUESTWARDEN_CONFIG``, else the default path."""
    env = os.environ if environ is None else environ
    return Path(explicit or env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_settings(path: Path, *, missing_ok: bool = False) -> Settings:
    """Read and validate the file. ``missing_ok``: a missing file means all defaults."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return Settings()
        raise ConfigError(f"config file {path}: not found") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror}") from None
    return parse_settings(raw, path)


def parse_settings(raw: bytes, path: Path) -> Settings:
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(data, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(describe_validation_error(path, str(exc))) from None


def describe_validation_error(path: Path, message: str) -> str:
    """Turn msgspec's message into one that names file, key and allowed values."""
    match = _AT_PATH.match(message)
    msg = match.group("msg") if match else message
    where = (match.group("path") or "") if match else ""
    key_parts = [p for p in re.split(r"[.\[\]]", where) if p and not p.isdigit()]
    shown = _shown_key(where)
    unknown = _UNKNOWN.search(msg)
    if unknown:
        section = shown
        allowed = ", ".join(_field_names(key_parts))
        key = f"{section}.{unknown.group('field')}" if section else unknown.group("field")
        return f"config file {path}: unknown key {key!r}; allowed keys here: {allowed}"
    head, sep, rest = msg.partition(": ")
    if sep and head.isidentifier() and head in _field_names(key_parts):
        # a cross-field check in __post_init__ names its own key
        key_parts.append(head)
        shown = f"{shown}.{head}" if shown else head
        msg = rest
    key = shown or "(top level)"
    allowed = describe_allowed(key_parts)
    text = f"config file {path}: key {key}: {msg.replace('`', '')}"
    if allowed:
        text += f"; allowed: {allowed}"
    return text


def _shown_key(where: str) -> str:
    """``rules[0].chain`` -> ``rules[1].chain``: the position of a table in a list of
    tables (``[[rules]]``, counted from 1) is kept; that of a value in a list is not."""
    shown = ""
    parts: list[str] = []
    for token in (t for t in re.split(r"[.\[\]]", where) if t):
        if token.isdigit():
            if parts and _table_list(parts):
                shown += f"[{int(token) + 1}]"
            continue
        parts.append(token)
        shown = f"{shown}.{token}" if shown else token
    return shown


def _table_list(key_parts: list[str]) -> bool:
    parent = _section_info(key_parts[:-1])
    fields = {f.name: f for f in parent.fields} if parent else {}
    field = fields.get(key_parts[-1])
    return field is not None and isinstance(_tables_of(field.type), mi.StructType)


def _tables_of(info: mi.Type) -> mi.Type:
    """A list of tables (``[[rules]]``) stands for its table type; anything else for itself."""
    if isinstance(info, mi.VarTupleType | mi.ListType) and isinstance(info.item_type,
                                                                      mi.StructType):
        return info.item_type
    return info


def _section_info(key_parts: list[str]) -> mi.StructType | None:
    info: mi.Type = mi.type_info(Settings)
    for part in key_parts:
        info = _tables_of(info)
        if not isinstance(info, mi.StructType):
            return None
        fields = {f.name: f for f in info.fields}
        if part not in fields:
            return None
        info = fields[part].type
    info = _tables_of(info)
    return info if isinstance(info, mi.StructType) else None


def _field_names(key_parts: list[str]) -> list[str]:
    info = _section_info(key_parts)
    return [f.name for f in info.fields] if info else []


def describe_allowed(key_parts: list[str]) -> str:
    """Say in words what a key accepts, from the schema's types and constraints."""
    if not key_parts:
        return ""
    parent = _section_info(key_parts[:-1])
    if parent is None:
        return ""
    fields = {f.name: f for f in parent.fields}
    field = fields.get(key_parts[-1])
    return _describe(field.type) if field else ""


def _describe(info: mi.Type) -> str:
    match info:
        case mi.LiteralType(values=values):
            return "one of " + ", ".join(_quote(v) for v in values)
        case mi.UnionType(types=types):
            return " or ".join(_describe(t) for t in types if not isinstance(t, mi.NoneType))
        case mi.IntType(ge=ge, le=le, gt=gt, lt=lt):
            return "an integer" + _range(ge, le, gt, lt)
        case mi.FloatType(ge=ge, le=le, gt=gt, lt=lt):
            return "a number of seconds" + _range(ge, le, gt, lt)
        case mi.BoolType():
            return "true or false"
        case mi.StrType():
            return "a string"
        case mi.TupleType() | mi.ListType() | mi.VarTupleType():
            item = getattr(info, "item_type", None)
            what = _describe(item) if item is not None else "values"
            if isinstance(item, mi.StructType):
                return "a list of tables"
            size = ""
            min_length = getattr(info, "min_length", None)
            if min_length:
                size = f" (at least {min_length})"
            return f"a list{size} of {what}"
        case mi.StructType():
            return "a table"
    return ""


def _range(ge: Any, le: Any, gt: Any, lt: Any) -> str:
    low = f">= {ge}" if ge is not None else (f"> {gt}" if gt is not None else "")
    high = f"<= {le}" if le is not None else (f"< {lt}" if lt is not None else "")
    if ge is not None and le is not None:
        return f" from {ge} to {le}"
    parts = [p for p in (low, high) if p]
    return (" " + " and ".join(parts)) if parts else ""


def _quote(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)

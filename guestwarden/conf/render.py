"""Write settings as TOML that ``guestwarden.conf.loading`` reads back to the same values.

Python's standard library reads TOML but does not write it; the schema only has
strings, numbers, booleans, lists of those and one level of tables, so a few lines
do. Strings are written as JSON strings, which are valid TOML basic strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import msgspec

from guestwarden.conf.settings import Settings


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_settings(settings: Settings, header: Iterable[str] = ()) -> str:
    """Every key with its value, defaults included: top-level keys, then one table
    each, then arrays of tables (``[[rules]]``). A key whose value is None ("not
    set", e.g. in a rule) is left out: TOML has no null, and absent means unset."""
    lines = [f"# {line}" if line else "#" for line in header]
    if lines:
        lines.append("")
    tables: list[tuple[str, msgspec.Struct]] = []
    arrays: list[tuple[str, msgspec.Struct]] = []
    for name, value in msgspec.structs.asdict(settings).items():
        if isinstance(value, msgspec.Struct):
            tables.append((name, value))
        elif (isinstance(value, tuple) and value
              and all(isinstance(v, msgspec.Struct) for v in value)):
            arrays += [(name, v) for v in value]
        elif value is not None:
            lines.append(f"{name} = {toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]", *_keys(table)]
    for name, table in arrays:
        lines += ["", f"[[{name}]]", *_keys(table)]
    return "\n".join(lines) + "\n"


def _keys(table: msgspec.Struct) -> list[str]:
    return [f"{key} = {toml_value(v)}" for key, v in msgspec.structs.asdict(table).items()
            if v is not None]

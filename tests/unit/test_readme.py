"""The README's config reference lists exactly the keys of the schema, with their defaults."""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path

import msgspec

from guestwarden.conf.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(?:\[(?P<section>\w+)\] )?(?P<key>\w+)` \| `(?P<default>[^`]*)` \|")
TABLE_ROW = re.compile(r"^\| `\[\[(?P<table>\w+)\]\] (?P<key>\w+)` \|")


def schema_defaults() -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in msgspec.structs.asdict(Settings()).items():
        if isinstance(value, msgspec.Struct):
            for key, inner in msgspec.structs.asdict(value).items():
                out[f"{name}.{key}"] = inner
        else:
            out[name] = value
    return out


def table_list_keys() -> set[str]:
    """``rules.match`` and the like: the keys of each list of tables (``[[rules]]``)."""
    keys = set()
    hints = typing.get_type_hints(Settings)
    for field in msgspec.structs.fields(Settings):
        item = typing.get_args(hints[field.name])
        if item and isinstance(item[0], type) and issubclass(item[0], msgspec.Struct):
            keys |= {f"{field.name}.{f.name}" for f in msgspec.structs.fields(item[0])}
    return keys


def readme_table_rows() -> set[str]:
    return {f"{m['table']}.{m['key']}" for m in map(TABLE_ROW.match, _section().splitlines())
            if m}


def _section() -> str:
    return README.read_text().split("## Configuration reference", 1)[1].split("\n## ", 1)[0]


def readme_rows() -> dict[str, str]:
    section = _section()
    rows = {}
    for line in section.splitlines():
        match = ROW.match(line)
        if match:
            key = match["key"] if not match["section"] else f"{match['section']}.{match['key']}"
            rows[key] = match["default"]
    return rows


def test_every_key_is_documented_and_nothing_else() -> None:
    assert set(readme_rows()) == set(schema_defaults())


def test_documented_defaults_are_the_real_ones() -> None:
    rows = readme_rows()
    for key, default in schema_defaults().items():
        documented = tomllib.loads(f"v = {rows[key]}")["v"]
        expected = list(default) if isinstance(default, tuple) else default
        assert documented == expected, key


def test_every_key_of_a_list_of_tables_is_documented() -> None:
    assert readme_table_rows() == table_list_keys()

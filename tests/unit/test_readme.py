"""The README's config reference lists exactly the keys of the schema, with their defaults."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec

from guestwarden.conf.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(?:\[(?P<section>\w+)\] )?(?P<key>\w+)` \| `(?P<default>[^`]*)` \|")


def schema_defaults() -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in msgspec.structs.asdict(Settings()).items():
        if isinstance(value, msgspec.Struct):
            for key, inner in msgspec.structs.asdict(value).items():
                out[f"{name}.{key}"] = inner
        else:
            out[name] = value
    return out


def readme_rows() -> dict[str, str]:
    section = README.read_text().split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
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

"""Rows of the benchmark report, printed as a markdown table and written as JSON."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import msgspec


class Row(msgspec.Struct, frozen=True, kw_only=True):
    """One measured figure and, where there is one, what it is compared with.

    ``ratio`` is always "guestwarden relative to the reference" in the direction the
    target is written in (``ratio_label`` says which, e.g. "x faster per guest" or
    "x lower bound"), so that a reader never has to invert a number.
    """

    section: str
    """"scale", "makespan", "throughput" or "control"."""
    name: str
    value: float
    unit: str
    reference: str = ""
    """What it is compared with, measured in this run ("" when nothing)."""
    reference_value: float | None = None
    ratio: float | None = None
    ratio_label: str = ""
    target: str = ""
    """The issue's target in words, e.g. "≤ 1.5 s"."""
    met: bool | None = None
    """Whether the target is met; None where the row has no target."""
    detail: dict[str, Any] = {}


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown(rows: list[Row]) -> str:
    head = ["section", "measure", "guestwarden", "reference", "reference value", "ratio",
            "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        ratio = f"{_fmt(row.ratio)} {row.ratio_label}".strip() if row.ratio is not None else ""
        ref_value = ("" if row.reference_value is None
                     else f"{_fmt(row.reference_value)} {row.unit}")
        cells = [row.section, row.name, f"{_fmt(row.value)} {row.unit}", row.reference,
                 ref_value, ratio, row.target, met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Date, machine and commit, for the README's record of results."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def write_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    document = {"machine": meta, "rows": msgspec.to_builtins(rows)}
    path.write_text(json.dumps(document, indent=2) + "\n")

"""``make bench`` (``python -m bench.run``): run every benchmark section in this run.

Each section module has ``run(args) -> list[Row]`` and starts (and stops) everything
it needs: a private libvirtd, test-driver or real QEMU guests, the real daemon.
``--only scale,control`` runs some sections; ``--quick`` uses smaller sizes (for
trying the harness, not for the README).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from bench.report import Row, machine, markdown, write_json

SECTIONS = ("scale", "makespan", "throughput", "control")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--json", type=Path, default=Path("bench/results.json"),
                        help="where to write the JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
    rows: list[Row] = []
    meta = machine()
    for section in chosen:
        module = importlib.import_module(f"bench.{section}")
        started = time.monotonic()
        print(f"== {section}", flush=True)
        section_rows: list[Row] = module.run(args)
        rows.extend(section_rows)
        print(markdown(section_rows), flush=True)
        print(f"({section}: {time.monotonic() - started:.0f} s)", flush=True)
    print()
    print(f"Results of {meta['date']}, commit {meta['commit']}, {meta['cpus']} CPUs "
          f"({meta['cpu']}), {meta['memory_gib']} GiB:")
    print()
    print(markdown(rows))
    write_json(args.json, rows, meta)
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

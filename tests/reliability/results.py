"""Where the reliability suite's figures go, and how they reach the committed RESULTS.md.

A run writes its tables to ``reports/reliability/RESULTS.md`` (``reports/`` is
git-ignored), so running the tests leaves the checkout clean. The committed
``tests/reliability/RESULTS.md`` changes only when someone asks for it::

    python -m tests.reliability.results            # show what the last run wrote
    python -m tests.reliability.results --commit   # merge it into tests/reliability/RESULTS.md

Both files hold one block per scenario; ``--commit`` replaces the committed
file's blocks with the ones the last run wrote and keeps the others.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMITTED = Path(__file__).with_name("RESULTS.md")
#: ``BANYAN_REPORTS_DIR`` overrides where runs write (default ``reports/`` in the checkout).
REPORTS = Path(os.environ.get("BANYAN_REPORTS_DIR") or REPO / "reports") / "reliability"
LAST_RUN = REPORTS / "RESULTS.md"

HEADER = (
    "# Reliability suite results\n\n"
    "Written by `tests/reliability` to `reports/reliability/RESULTS.md` on each run and "
    "copied here by `python -m tests.reliability.results --commit` (one table per "
    "scenario). Ids are event numbers; *lost* = confirmed by the broker but never "
    "handled by a group meant to get it; *recovery* = seconds from a fault until handling "
    "resumed after the longest pause that began within 5 s of it (slowest group), with that "
    "pause's length; a pause of ~0.1 s or less means the stream barely noticed; *bound* = "
    "the most duplicates per group the scenario's faults can cause (derived in its table).\n"
)
_BLOCK = re.compile(r"<!-- scenario:(\S+) -->.*?<!-- /scenario:\1 -->", re.S)


def blocks(text: str) -> dict[str, str]:
    """The scenario blocks of a results file, by scenario."""
    return {m.group(1): m.group(0) for m in _BLOCK.finditer(text)}


#: The summary table's columns: (heading, the scenario table's row it is read from).
SUMMARY = (
    ("lost", "lost"),
    ("duplicates", "duplicates (per group)"),
    ("bound", "duplicate bound (per group)"),
    ("recovery after each fault (s)", "recovery after each fault (s)"),
    ("RSS start / end (MiB)", "RSS start / end (MiB)"),
    ("result", "result"),
)
_ROW = re.compile(r"^\| (.+?) \| (.*) \|$", re.M)
_TITLE = re.compile(r"^### (.+)$", re.M)


def _order(key: str) -> tuple[int, str]:
    """Scenarios in their number's order (``2-...`` before ``10-...``), then by name."""
    number = re.match(r"\d+", key)
    return (int(number.group()) if number else sys.maxsize, key)


def summary(scenarios: dict[str, str]) -> str:
    """One line per scenario: lost, duplicates, bound, recovery, RSS, result."""
    lines = [
        "| scenario | " + " | ".join(h for h, _ in SUMMARY) + " |",
        "|---" * (len(SUMMARY) + 1) + "|",
    ]
    for key in sorted(scenarios, key=_order):
        block = scenarios[key]
        rows = dict(_ROW.findall(block))
        title = _TITLE.search(block)
        cells = []
        for _, row in SUMMARY:
            value = rows.get(row, "-")
            if row == "duplicate bound (per group)":
                value = value.split(" ", 1)[0]  # the number; the derivation is in the table
            cells.append(value)
        lines.append(f"| {title.group(1) if title else key} | " + " | ".join(cells) + " |")
    return "\n## Summary\n\n" + "\n".join(lines) + "\n"


def render(scenarios: dict[str, str]) -> str:
    return (
        HEADER
        + summary(scenarios)
        + "".join(f"\n{scenarios[k]}\n" for k in sorted(scenarios, key=_order))
    )


def merge(path: Path, new: dict[str, str]) -> None:
    """Replace (or add) ``new``'s scenario blocks in ``path``, keeping the others."""
    current = blocks(path.read_text(encoding="utf-8")) if path.exists() else {}
    current.update(new)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(current), encoding="utf-8")


def record(scenario: str, block: str) -> None:
    """What a run does: one scenario's block into the ignored reports file."""
    merge(LAST_RUN, {scenario: block})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.results")
    parser.add_argument("--commit", action="store_true", help=f"merge {LAST_RUN} into {COMMITTED}")
    args = parser.parse_args(argv)
    if not LAST_RUN.exists():
        print(f"no run results at {LAST_RUN}: run the reliability suite first", file=sys.stderr)
        return 1
    new = blocks(LAST_RUN.read_text(encoding="utf-8"))
    if not args.commit:
        sys.stdout.write(render(new))
        return 0
    merge(COMMITTED, new)
    print(f"updated {COMMITTED.relative_to(REPO)}: {', '.join(sorted(new))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

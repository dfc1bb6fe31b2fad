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
    "pause's length; a pause of ~0.1 s or less means the stream barely noticed.\n"
)
_BLOCK = re.compile(r"<!-- scenario:(\S+) -->.*?<!-- /scenario:\1 -->", re.S)


def blocks(text: str) -> dict[str, str]:
    """The scenario blocks of a results file, by scenario."""
    return {m.group(1): m.group(0) for m in _BLOCK.finditer(text)}


def render(scenarios: dict[str, str]) -> str:
    return HEADER + "".join(f"\n{scenarios[k]}\n" for k in sorted(scenarios))


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

"""Summarize a py-spy profile (``--format raw``: collapsed stacks) by package and function.

::

    py-spy record --rate 1000 --nolineno --format raw -o benchmarks/results/consume.txt -- \\
        python benchmarks/workloads.py banyan consume --n 40000 --prefetch 1000
    python benchmarks/profile_summary.py benchmarks/results/consume.txt [--top 25]

Prints, as shares of all samples of the process (py-spy drops idle samples by default,
so this is CPU): self time by package (banyan_bus, aio_pika, aiormq, pamqp, pydantic,
asyncio, ...), then the banyan_bus functions with the most inclusive time (their own
code plus what they call) and the most self time.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")
PACKAGES = (
    "banyan_bus",
    "aio_pika",
    "aiormq",
    "pamqp",
    "pydantic",
    "structlog",
    "opentelemetry",
    "faststream",
    "asyncio",
    "json",
    "uuid",
    "datetime",
    "benchmarks",
)


def package_of(path: str) -> str:
    """The package (or, for the standard library, ``stdlib:module``) a frame's file is in."""
    parts = [p for p in re.split(r"[\\/]", path) if p]
    for name in PACKAGES:
        if name in parts:
            return name
    if parts and parts[-1] in ("workloads.py", "vhosts.py"):
        return "benchmarks"
    if "site-packages" in parts:
        return parts[parts.index("site-packages") + 1] if len(parts) > 1 else "other"
    stem = parts[0].removesuffix(".py") if parts else ""
    if stem in sys.stdlib_module_names:
        return f"stdlib:{stem}"
    return "other"


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    if "banyan_bus" in path:
        path = "banyan_bus" + path.split("banyan_bus", 1)[1]
    else:
        path = path.rsplit("/", 1)[-1]
    return f"{path}:{m['func']}"


def summarize(path: Path, top: int) -> str:
    total = 0
    by_package: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        m = FRAME.match(leaf)
        by_package[package_of(m["file"]) if m else "other"] += count
        for frame in set(frames):
            if "banyan_bus" in frame:
                inclusive[short(frame)] += count
        if "banyan_bus" in leaf:
            self_time[short(leaf)] += count
    if not total:
        return "no samples"
    pct = 100.0 / total
    out = [f"{total} samples in {path}", "", "self time by package:"]
    out += [f"  {n * pct:5.1f}%  {name}" for name, n in by_package.most_common()]
    out += ["", f"banyan_bus, inclusive (top {top}):"]
    out += [f"  {n * pct:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    out += ["", f"banyan_bus, self (top {top}):"]
    out += [f"  {n * pct:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("profile", type=Path, help="py-spy --format raw output")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    print(summarize(args.profile, args.top))


if __name__ == "__main__":
    main()

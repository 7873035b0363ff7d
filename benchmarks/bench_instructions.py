"""Instructions per call, counted by valgrind: a measure that a noisy, shared machine cannot move.

The timing tables move by 5 to 10% between runs on a shared two-core machine,
more than some of the differences they are meant to show. This section runs
the same candidates (built by the same code, with the same checks) under
valgrind's callgrind, which counts the instructions executed in user space by
every thread of the process. Each candidate runs in two processes, one with
more loops than the other and both after the same warm-up; the difference,
divided by the difference in loops, is its cost per call, start-up and
warm-up cancelled out. Two runs of the same code agree to about 0.05% for an
empty request and 0.3% for one that uses a session (garbage collections fall
differently), whatever else the machine is doing.

The hash seed is another matter. It decides where the interpreter's objects
land, and with that which attribute and method lookups collide in CPython's
type attribute cache: the same code measured under two seeds can differ by 1%
for a request, and a change to unrelated code moves the collisions like a new
seed does. So each candidate is counted under several seeds
(``PYTHONHASHSEED`` 1, 2, 3) and the table shows the median, with the spread.

Instructions are not time. Cache misses, branch mispredictions, the kernel and
waiting for other threads are not in them, so a candidate can execute fewer
instructions and still take longer; the timing tables are what a user sees.

Needs ``valgrind`` on ``PATH``; without it the section says so and counts nothing.
Run it alone with ``python -m benchmarks instructions`` (about half an hour);
``--smoke`` counts two candidates with few loops.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._harness import Candidate, Section, Settings

NAME = "instructions"
ROOT = Path(__file__).resolve().parent.parent
_COLLECTED = re.compile(r"==\d+== Collected : (\d+)")


@dataclass(frozen=True)
class Group:
    """One table: candidates built by one benchmark's own set-up code."""

    key: str
    title: str
    baseline: str
    loops: tuple[int, int]  # (fewer, more): the two processes' loop counts
    warmup: int
    skip: tuple[str, ...] = ()  # candidates left out: slow, and beside the point here


GROUPS = (
    Group("resolve-a", "cached resolution of an existing scoped instance", "dependency-injector Singleton",
          (2_000, 42_000), 2_000),
    Group("resolve-b", "open a scope, create one instance, tear it down (sync)", "hand-written generator",
          (1_000, 21_000), 1_000, skip=("that-depends",)),
    Group("asgi-async", "one request to the `async def` endpoint, in process", "bare", (20, 220), 50,
          skip=("ContextLocalSingleton + reset middleware", "RequestScoped + wiring.Provide")),
    Group("asgi-sync", "one request to the `def` endpoint, in process (all threads counted)", "bare",
          (20, 220), 50, skip=("ContextLocalSingleton + reset middleware", "RequestScoped + wiring.Provide")),
)  # fmt: skip
# Each seed is one layout of the interpreter's objects; the median over them is the figure.
SEEDS = (1, 2, 3)
SMOKE_GROUP = Group("resolve-a", GROUPS[0].title, GROUPS[0].baseline, (100, 1_100), 100)
SMOKE_ONLY = ("dependency-injector Singleton", "di_request_scope RequestScoped")


# --- the worker: one candidate, run under valgrind ----------------------------------------


@contextlib.contextmanager
def _sync_candidates(key: str) -> Iterator[list[Candidate]]:
    from . import bench_resolve

    build = {"resolve-a": bench_resolve.cached_candidates, "resolve-b": bench_resolve.fresh_sync_candidates}[
        key
    ]
    with contextlib.ExitStack() as stack:
        yield build(stack)


def _pick(candidates: list[Candidate], name: str) -> Candidate:
    for candidate in candidates:
        if candidate.name == name:
            return candidate
    raise SystemExit(f"no candidate {name!r}; there are {[c.name for c in candidates]}")


def _settle() -> None:
    # What the warm-up left behind goes to the permanent generation, so a full
    # collection that happens to fall in one process's loop costs little.
    gc.collect()
    gc.freeze()


def _work(key: str, name: str, warmup: int, loops: int) -> None:
    if key.startswith("resolve"):
        with _sync_candidates(key) as candidates:
            run: Callable[[int], Any] = _pick(candidates, name).run
            run(warmup)
            _settle()
            run(loops)
        return

    async def main() -> None:
        from . import bench_asgi

        path = "/async" if key == "asgi-async" else "/sync"
        async with bench_asgi.endpoint_candidates(path) as candidates:
            arun: Callable[[int], Awaitable[float]] = _pick(candidates, name).run  # type: ignore[assignment]
            await arun(warmup)
            _settle()
            await arun(loops)

    asyncio.run(main())


# --- the parent: two processes per candidate, the difference per loop -------------------


def _names(group: Group) -> list[str]:
    """The group's candidates, asked of a plain (unmeasured) worker so the list never drifts."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_instructions", "--list", group.key],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [n for n in out.splitlines() if n and n not in group.skip]


def _count(group: Group, name: str, seed: int) -> float:
    env = {**os.environ, "PYTHONHASHSEED": str(seed)}  # the same layout in both processes
    procs = [
        subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                "--callgrind-out-file=/dev/null",
                sys.executable,
                "-m",
                "benchmarks.bench_instructions",
                "--work",
                group.key,
                name,
                str(group.warmup),
                str(loops),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for loops in group.loops
    ]
    counts = []
    for proc in procs:
        _, err = proc.communicate()
        found = _COLLECTED.search(err)
        if proc.returncode != 0 or found is None:
            raise RuntimeError(f"{group.key} / {name}: the worker failed under valgrind:\n{err[-3000:]}")
        counts.append(int(found.group(1)))
    fewer, more = group.loops
    return (counts[1] - counts[0]) / (more - fewer)


def _table(group: Group, counts: dict[str, list[float]]) -> str:
    base = statistics.median(counts[group.baseline])
    rows = [
        f"| instructions per call, {group.title} | ratio to `{group.baseline}` | instructions per call "
        "| spread over seeds |",
        "|---|---:|---:|---:|",
    ]
    for name, per_seed in counts.items():
        shown = f"**{name}** (baseline)" if name == group.baseline else name
        median = statistics.median(per_seed)
        spread = (max(per_seed) - min(per_seed)) / median
        rows.append(f"| {shown} | {median / base:.2f}x | {median:,.0f} | {spread:.1%} |")
    return "\n".join(rows)


def run(settings: Settings) -> list[Section]:
    if shutil.which("valgrind") is None:
        return [Section("Instructions", "Skipped: valgrind is not on PATH.", "")]
    groups = [SMOKE_GROUP] if settings.smoke else list(GROUPS)
    seeds = SEEDS[:1] if settings.smoke else SEEDS
    tables = []
    for group in groups:
        names = [n for n in _names(group) if not settings.smoke or n in SMOKE_ONLY]
        counts = {name: [_count(group, name, seed) for seed in seeds] for name in names}
        fewer, more = group.loops
        tables.append(
            f"{_table(group, counts)}\n\nLoops: {fewer:,} and {more:,} after {group.warmup:,} of warm-up; "
            f"hash seeds {', '.join(map(str, seeds))}."
        )
    text = (
        "Counted by valgrind's callgrind: the instructions each candidate executes per call, in user "
        "space and in every thread, as the difference between two processes that run different numbers "
        "of loops after the same warm-up (the warm-up's objects frozen out of the garbage collector). "
        "Each candidate is counted under several hash seeds, each a different layout of the "
        "interpreter's objects and so of the collisions in its type attribute cache: the median is "
        "the figure, and the spread (largest minus smallest, over the median) is how much layout alone "
        "moves it. Rows closer than their spreads are level. The candidates and their checks are those "
        "of the timing tables. Instructions are not time: cache misses, mispredicted branches, the "
        "kernel and waiting are not in them. They do not move with the machine's load, which the "
        "timings do by 5 to 10%."
    )
    return [Section("Instructions per call (valgrind)", text, "\n\n".join(tables))]


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_instructions")
    parser.add_argument("--list", metavar="GROUP", help="print the group's candidate names")
    parser.add_argument(
        "--work", nargs=4, metavar=("GROUP", "NAME", "WARMUP", "LOOPS"), help="run one candidate"
    )
    args = parser.parse_args(argv)
    if args.list:
        if args.list.startswith("resolve"):
            with _sync_candidates(args.list) as candidates:
                print("\n".join(c.name for c in candidates))
            return

        async def names() -> None:
            from . import bench_asgi

            async with bench_asgi.endpoint_candidates("/async") as candidates:
                print("\n".join(c.name for c in candidates))

        asyncio.run(names())
    elif args.work:
        key, name, warmup, loops = args.work
        _work(key, name, int(warmup), int(loops))
    else:
        parser.error("give --list GROUP or --work GROUP NAME WARMUP LOOPS")


if __name__ == "__main__":
    _main(sys.argv[1:])

"""A tiny interleaved benchmark harness for a noisy shared machine.

Every candidate of a group runs once per round, in the same order each round
(A, B, C, A, B, C, ...), so a burst of noise from a neighbour hits all of them
alike. Each run times ``loops`` calls and yields one time per call; the table
reports per candidate the median and the interquartile range of those per-round
times, and the *ratio* to a named baseline: the median over rounds of
``candidate / baseline`` within the same round (a paired ratio, steadier than
the ratio of two medians when the machine's speed drifts). Absolute times are
printed for orientation only; compare ratios.

Nothing here asserts on time.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "FULL",
    "SMOKE",
    "Candidate",
    "Result",
    "Section",
    "Settings",
    "ameasure",
    "async_timer",
    "markdown_table",
    "measure",
    "sync_timer",
    "table_of_rows",
]

# A runner times `loops` iterations of the candidate and returns the elapsed seconds.
Runner = Callable[[int], float]
AsyncRunner = Callable[[int], Awaitable[float]]


@dataclass(frozen=True)
class Settings:
    """How long to measure: rounds per group, warm-up rounds, and the target length of one run."""

    rounds: int
    warmup: int
    target_s: float  # loops are calibrated so one run of a candidate takes about this long
    max_loops: int
    smoke: bool = False

    def scaled(self, factor: float) -> Settings:
        """Longer or shorter runs for a group whose calls are slow (ASGI) or fast (micro)."""
        return Settings(self.rounds, self.warmup, self.target_s * factor, self.max_loops, self.smoke)


FULL = Settings(rounds=41, warmup=3, target_s=0.02, max_loops=1_000_000)
SMOKE = Settings(rounds=3, warmup=1, target_s=0.0005, max_loops=200, smoke=True)


@dataclass
class Candidate:
    """One thing to time. ``run(loops)`` returns (or, async, awaits) the seconds ``loops`` iterations took."""

    name: str
    run: Runner | AsyncRunner
    note: str = ""


@dataclass
class Result:
    name: str
    note: str
    loops: int
    per_call: list[float] = field(default_factory=list)  # seconds per call, one per round
    ratios: list[float] = field(default_factory=list)  # per-round ratio to the baseline

    @property
    def median(self) -> float:
        return statistics.median(self.per_call)

    @property
    def iqr(self) -> float:
        return _iqr(self.per_call)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def ratio_iqr(self) -> float:
        return _iqr(self.ratios)


@dataclass
class Section:
    """A titled block of the report: a paragraph and a Markdown table."""

    title: str
    text: str
    table: str

    def markdown(self) -> str:
        parts = [f"### {self.title}", ""]
        if self.text:
            parts += [self.text, ""]
        parts += [self.table, ""]
        return "\n".join(parts)


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def sync_timer(func: Callable[[], object]) -> Runner:
    """Time ``func()`` called ``loops`` times in a plain loop."""

    def run(loops: int) -> float:
        repeat = itertools.repeat(None, loops)
        start = time.perf_counter()
        for _ in repeat:
            func()
        return time.perf_counter() - start

    return run


def async_timer(func: Callable[[], Awaitable[object]]) -> AsyncRunner:
    """Time ``await func()`` called ``loops`` times; measure these with :func:`ameasure`.

    All rounds then run in one long-lived task, as a server's requests run under
    one event loop: anyio keeps its worker threads for the life of the root task,
    so a fresh ``run_until_complete`` per run would start new threads each time.
    """

    async def run(loops: int) -> float:
        repeat = itertools.repeat(None, loops)
        start = time.perf_counter()
        for _ in repeat:
            await func()
        return time.perf_counter() - start

    return run


def _plan(
    candidates: Sequence[Candidate], baseline: str, settings: Settings
) -> Generator[tuple[Candidate, int], float, list[Result]]:
    """The measurement itself: yields (candidate, loops) to run and receives the elapsed seconds."""
    names = [c.name for c in candidates]
    if baseline not in names:
        raise ValueError(f"baseline {baseline!r} is not one of {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique: {names}")

    loops: dict[str, int] = {}
    for c in candidates:  # calibrate: one run of each candidate lasts about target_s
        n = 1
        while True:
            elapsed = yield c, n
            if elapsed >= settings.target_s or n >= settings.max_loops:
                break
            if elapsed * 10 >= settings.target_s:  # close enough to extrapolate
                n = max(1, min(settings.max_loops, round(n * settings.target_s / elapsed)))
                break
            n = min(settings.max_loops, n * 10)
        loops[c.name] = n

    results = {c.name: Result(c.name, c.note, loops[c.name]) for c in candidates}
    for _ in range(settings.warmup):
        for c in candidates:
            yield c, loops[c.name]
    for _ in range(settings.rounds):
        this_round: dict[str, float] = {}
        for c in candidates:  # interleaved: A, B, C, A, B, C, ...
            n = loops[c.name]
            this_round[c.name] = (yield c, n) / n
        base = this_round[baseline]
        for name, per_call in this_round.items():
            results[name].per_call.append(per_call)
            results[name].ratios.append(per_call / base)
    return [results[n] for n in names]


def measure(candidates: Sequence[Candidate], baseline: str, settings: Settings) -> list[Result]:
    """Run sync candidates interleaved, round by round, each paired with the baseline's round."""
    plan = _plan(candidates, baseline, settings)
    try:
        candidate, loops = next(plan)
        while True:
            candidate, loops = plan.send(candidate.run(loops))  # type: ignore[arg-type]
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


async def ameasure(candidates: Sequence[Candidate], baseline: str, settings: Settings) -> list[Result]:
    """:func:`measure` for candidates made with :func:`async_timer`, inside the running loop."""
    plan = _plan(candidates, baseline, settings)
    try:
        candidate, loops = next(plan)
        while True:
            candidate, loops = plan.send(await candidate.run(loops))  # type: ignore[misc]
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _fmt_time(seconds: float) -> str:
    us = seconds * 1e6
    if us >= 100:
        return f"{us:,.0f} µs"
    if us >= 1:
        return f"{us:.2f} µs"
    return f"{seconds * 1e9:.0f} ns"


def markdown_table(results: Sequence[Result], baseline: str, settings: Settings) -> str:
    """One row per candidate: ratio to the baseline first, then the absolute figures."""
    header = (
        f"| candidate | ratio to `{baseline}` (median) | ratio IQR | median per call | IQR | loops x rounds |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        name = f"**{r.name}** (baseline)" if r.name == baseline else r.name
        if r.note:
            name += f" — {r.note}"
        lines.append(
            f"| {name} | {r.ratio:.2f}x | {r.ratio_iqr:.2f} | {_fmt_time(r.median)} | "
            f"{_fmt_time(r.iqr)} | {r.loops} x {settings.rounds} |"
        )
    return "\n".join(lines)


def table_of_rows(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A plain Markdown table, for figures that are not timings (memory)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(sep) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)

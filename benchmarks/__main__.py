"""Run the benchmarks and print Markdown: ``python -m benchmarks [--smoke] [--write RESULTS.md] [names...]``.

names: resolve, asgi, memory, server, instructions (default: all but instructions).
``--smoke`` runs a few rounds of a few loops, instructions included, so the whole
suite finishes in about two minutes: it checks that every candidate works, its figures
mean nothing. ``--write FILE`` also writes the report; a bare
file name goes next to this script (``--write RESULTS.md`` writes
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from . import bench_asgi, bench_instructions, bench_memory, bench_resolve, bench_server
from ._harness import FULL, SMOKE, Settings

BENCHMARKS = {
    module.NAME: module
    for module in (bench_resolve, bench_asgi, bench_memory, bench_server, bench_instructions)
}
# A full run leaves out the instruction counts (half an hour more) unless named; a smoke run has them all.
DEFAULT = [name for name in BENCHMARKS if name != bench_instructions.NAME]
PACKAGES = [
    "di-request-scope",
    "dependency-injector",
    "fastapi",
    "starlette",
    "pydantic",
    "anyio",
    "sqlalchemy",
    "dishka",
    "that-depends",
    "wireup",
    "svcs",
    "uvicorn",
    "h11",
]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def library_digest() -> str:
    """A short hash of di_request_scope's sources, to tell which code a report measured."""
    import di_request_scope

    digest = hashlib.sha256()
    for path in sorted(Path(di_request_scope.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return done.stdout.strip()


def source_line(digest: str) -> str:
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--", "di_request_scope"))
    state = "with uncommitted or untracked changes" if dirty else "clean"
    return f"- di_request_scope sources: sha256 {digest} of `di_request_scope/*.py`; git HEAD {head}, {state}"


def environment(settings: Settings) -> str:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    versions = ", ".join(f"{p} {_version(p)}" for p in PACKAGES)
    mode = "smoke (figures meaningless)" if settings.smoke else "full"
    return "\n".join(
        [
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; mode: {mode}; "
            f"{settings.rounds} rounds after {settings.warmup} warm-up rounds, interleaved",
            f"- machine: {platform.platform()}; {_cpu_model()}; {os.cpu_count()} CPUs ({usable} usable); "
            f"load average at start {load}",
            f"- Python {platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
            f"- packages: {versions}",
            source_line(library_digest()),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="name",
        help=f"any of: {', '.join(BENCHMARKS)} (default: all but instructions; all with --smoke)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a few rounds of a few loops: checks, no figures"
    )
    parser.add_argument(
        "--write", metavar="FILE", help="also write the report (a bare name: into benchmarks/)"
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = args.names or (list(BENCHMARKS) if args.smoke else DEFAULT)
    settings = SMOKE if args.smoke else FULL

    started = time.perf_counter()
    digest = library_digest()
    parts = ["# di_request_scope benchmarks", "", environment(settings), ""]
    print("\n".join(parts), flush=True)
    for name in names:
        section_started = time.perf_counter()
        for section in BENCHMARKS[name].run(settings):
            text = section.markdown()
            parts.append(text)
            print(text, flush=True)
        print(
            f"<!-- {name}: {time.perf_counter() - section_started:.1f} s -->\n", file=sys.stderr, flush=True
        )
    footer = f"_Total run time: {time.perf_counter() - started:.0f} s._"
    if library_digest() != digest:
        footer += (
            "\n\n**Warning: di_request_scope's sources changed while this ran** (the figures measured the "
            f"sources of sha256 {digest}, imported at the start); run again."
        )
    parts.append(footer)
    print(footer)

    if args.write:
        target = Path(args.write)
        if target.parent == Path():
            target = Path(__file__).resolve().parent / target
        target.write_text("\n".join(parts) + "\n")
        print(f"wrote {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

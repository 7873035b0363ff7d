"""End to end on a real server: uvicorn on 127.0.0.1 and a load generator in another process.

(a) Throughput and latency. One uvicorn process per candidate (the apps of
    ``bench_asgi``, loaded from ``_server_apps``), started once and reused;
    ``_loadgen`` keeps ``connections`` HTTP/1.1 keep-alive connections busy on
    ``/async`` and on ``/sync`` for a fixed time after a warm-up. Rounds are
    interleaved: every candidate and endpoint once per round, in the same order.
    Reported per candidate: median req/s; the cost ratio to ``bare`` (the median
    over rounds of bare's req/s divided by the candidate's in the same round:
    server time per request, in units of an empty request's); the server
    process's CPU time per request and its ratio to bare's (steadier than req/s
    when neighbours take CPU); the medians of the per-round latency percentiles.
(b) Does sync teardown block the event loop? Per candidate one server with a
    ``def`` endpoint ``/write`` that inserts a row through the request's session
    (committed at the end of the request, with fsyncs: a SQLite file with its
    default rollback journal and ``synchronous=FULL``) and an ``async def``
    endpoint ``/ping`` that touches no database. A probe sends one ``/ping`` at
    a time at a fixed pace, first alone, then while ``write_connections``
    connections keep ``/write`` busy. A commit that runs on the event loop holds
    every ``/ping`` up behind its fsyncs.

Every server is checked before any timing: status 200 and the expected body on
each endpoint; for ``/write``, that the rows were committed (counted through a
separate connection to the file). Any error during a run (a status other than
200, a lost connection) stops the benchmark: figures of a failing setup mean
nothing.

The servers are forked by one fork server (see ``_server_apps``), all at the
start; it stops and reaps them when the benchmark ends, fails or is interrupted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from ._harness import Section, Settings, table_of_rows
from ._loadgen import percentile
from ._server_apps import CREATE_TABLE, DB_ENV, PRAGMAS

NAME = "server"

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_BODY = {"value": 1}

# (label, factory in _server_apps, note)
READ_CANDIDATES = [
    ("bare", "bare", "no session: the floor"),
    ("bare + RequestScopeMiddleware", "bare_middleware", "nothing resolved"),
    ("FastAPI Depends(get_db)", "depends", "`yield` dependency"),
    ("dishka", "dishka", "`setup_dishka`, `FromDishka`"),
    ("that-depends", "that_depends", "`DIContextMiddleware`, `Depends(provider)`"),
    ("RequestScoped + fastapi.Provide", "request_scoped", "`RequestScopeMiddleware`"),
    ("RequestScoped + fastapi.inject", "request_scoped_inject", "no `Depends`"),
    (
        "RequestScoped + fastapi.Provide, offload=False",
        "request_scoped_inline_commit",
        "the commit on the event loop, as the peers do",
    ),
]
WRITE_CANDIDATES = [
    ("RequestScoped + fastapi.Provide", "write_request_scoped", "commit in a worker thread"),
    ("dishka", "write_dishka", "commit on the event loop"),
    ("that-depends", "write_that_depends", "commit on the event loop"),
    ("FastAPI Depends(get_db)", "write_depends", "commit in FastAPI's threadpool"),
]
READ_PATHS = ("/async", "/sync")


@dataclass(frozen=True)
class ServerSettings:
    rounds: int
    warmup_s: float  # uncounted, at the start of every run
    duration_s: float  # measured, per run
    first_warmup_s: float  # one uncounted run per candidate and endpoint before the rounds
    connections: int
    write_rounds: int
    write_connections: int
    probe_interval_s: float
    idle_probe_s: float
    loaded_probe_s: float


FULL = ServerSettings(
    rounds=5,
    warmup_s=0.3,
    duration_s=2.0,
    first_warmup_s=1.0,
    connections=16,
    write_rounds=3,
    write_connections=16,
    probe_interval_s=0.005,
    idle_probe_s=1.0,
    loaded_probe_s=3.0,
)
SMOKE = ServerSettings(
    rounds=1,
    warmup_s=0.05,
    duration_s=0.15,
    first_warmup_s=0.0,
    connections=4,
    write_rounds=1,
    write_connections=4,
    probe_interval_s=0.005,
    idle_probe_s=0.15,
    loaded_probe_s=0.3,
)


# --- processes ---------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports the kernel picked as free; all held open together, so they are distinct."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop(process: subprocess.Popen[Any], *, graceful: bool = True) -> None:
    """Stop a child and reap it, whatever state it is in."""
    if process.poll() is None:
        if graceful:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
    process.wait()


def _pipes(process: subprocess.Popen[str] | None) -> tuple[TextIO, TextIO]:
    if process is None or process.stdin is None or process.stdout is None:
        raise RuntimeError("the helper process was not started")
    return process.stdin, process.stdout


@dataclass
class Server:
    """One uvicorn process serving one candidate app from ``_server_apps``."""

    label: str
    factory: str
    port: int
    env: dict[str, str]
    log_path: Path
    pid: int = 0

    def cpu_seconds(self) -> float | None:
        """The server process's CPU time so far, all threads (Linux ``/proc``; None elsewhere)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.5):
                return True
        except OSError:
            return False

    def get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


class ForkServer:
    """``python -m benchmarks._server_apps``: imports the apps once, forks one uvicorn per server.

    Stopping it (end of input, then SIGTERM, then SIGKILL) stops and reaps every
    server it started; the servers also die with it if it is killed.
    """

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def __enter__(self) -> ForkServer:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._server_apps"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _ask(self, **command: Any) -> dict[str, Any]:
        stdin, stdout = _pipes(self.process)
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(
                f"the fork server (python -m benchmarks._server_apps) exited with {self.process.wait()}; "
                "its error is above"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def start(self, server: Server) -> None:
        answer = self._ask(start=server.factory, port=server.port, env=server.env, log=str(server.log_path))
        server.pid = answer["pid"]

    def wait_ready(self, servers: Sequence[Server], timeout: float) -> None:
        """Poll the ports: uvicorn binds its port only once the app is loaded and its lifespan started."""
        deadline = time.monotonic() + timeout
        waiting = list(servers)
        while waiting:
            waiting = [s for s in waiting if not s.listening()]
            if not waiting:
                return
            exited = self._ask(poll=True)["exited"]
            for server in waiting:
                if server.factory in exited:
                    raise RuntimeError(
                        f"the uvicorn server of {server.label} ({server.factory}) exited with "
                        f"{exited[server.factory]} before listening; its output:\n{server.log_tail()}"
                    )
            if time.monotonic() > deadline:
                server = waiting[0]
                raise RuntimeError(
                    f"the uvicorn server of {server.label} ({server.factory}) did not listen on "
                    f"127.0.0.1:{server.port} within {timeout:g} s; its output:\n{server.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()  # end of input: it stops and reaps its servers
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=15)
        _stop(self.process)
        self.process = None


class LoadGen:
    """A ``python -m benchmarks._loadgen --serve`` process: one JSON command in, one JSON result out."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks._loadgen", "--serve"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, **command: Any) -> None:
        stdin, _ = _pipes(self.process)
        stdin.write(json.dumps(command) + "\n")
        stdin.flush()

    def receive(self) -> dict[str, Any]:
        _, stdout = _pipes(self.process)
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited with {self.process.wait()}; its error is above")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.receive()

    def stop(self) -> None:
        if self.process is not None:
            stdin: TextIO | None = self.process.stdin
            if stdin is not None:
                with contextlib.suppress(OSError):
                    stdin.close()  # --serve ends at end of input
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)
            _stop(self.process, graceful=False)


def no_errors(label: str, result: dict[str, Any]) -> dict[str, Any]:
    if result["errors"]:
        raise RuntimeError(
            f"{label}: {result['errors']} errors during the run on {result['path']} "
            f"({result['error_kinds']}); figures of a failing setup mean nothing"
        )
    if not result["requests"]:
        raise RuntimeError(f"{label}: no request completed during the run on {result['path']}")
    return result


# --- checks --------------------------------------------------------------------------------------


def check_body(server: Server, path: str) -> None:
    status, body = server.get(path)
    if status != 200:
        raise AssertionError(f"{server.label} {path}: status {status}, body {body[:500]!r}")
    if json.loads(body) != EXPECTED_BODY:
        raise AssertionError(f"{server.label} {path}: unexpected body {body[:500]!r}")


def count_rows(db_path: Path) -> int:
    """Rows committed to the file, as another connection sees them."""
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        return int(connection.execute("SELECT count(*) FROM writes").fetchone()[0])


def check_write(server: Server, db_path: Path, timeout: float = 10) -> None:
    """Two writes must be committed; dishka and that-depends commit after the response, so wait a little."""
    before = count_rows(db_path)
    check_body(server, "/write")
    check_body(server, "/write")
    deadline = time.monotonic() + timeout
    while (after := count_rows(db_path)) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    if after != before + 2:
        raise AssertionError(
            f"{server.label} /write: two requests committed {after - before} rows within {timeout:g} s, "
            "expected 2"
        )
    check_body(server, "/ping")


# --- (a) throughput and latency --------------------------------------------------------------


@dataclass
class ReadResult:
    label: str
    note: str
    rps: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # bare's req/s / this one's, same round
    cpu: list[float] = field(default_factory=list)  # server CPU seconds per request
    cpu_ratios: list[float] = field(default_factory=list)  # this one's CPU per request / bare's, same round
    p50: list[float] = field(default_factory=list)
    p90: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    requests: int = 0


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 - q1


def _ms(us: float) -> str:
    return f"{us / 1000:.2f} ms"


def measure_reads(
    servers: list[Server], notes: dict[str, str], loadgen: LoadGen, settings: ServerSettings
) -> tuple[dict[str, list[ReadResult]], list[float]]:
    """The interleaved rounds; also returns the client's CPU µs per request of every run."""
    client_cpu: list[float] = []

    def run(server: Server, path: str, warmup: float, duration: float) -> tuple[dict[str, Any], float]:
        before = server.cpu_seconds()
        figures = loadgen.run(
            port=server.port, path=path, connections=settings.connections, duration=duration, warmup=warmup
        )
        after = server.cpu_seconds()
        no_errors(f"{server.label} {path}", figures)
        cpu = math.nan if before is None or after is None else (after - before) / figures["all_requests"]
        return figures, cpu

    if settings.first_warmup_s:
        for path in READ_PATHS:
            for server in servers:
                run(server, path, settings.first_warmup_s, 0.1)
    results = {path: {s.label: ReadResult(s.label, notes[s.label]) for s in servers} for path in READ_PATHS}
    for _ in range(settings.rounds):
        for path in READ_PATHS:
            this_round = {}
            for server in servers:  # interleaved: A, B, C, A, B, C, ...
                this_round[server.label] = run(server, path, settings.warmup_s, settings.duration_s)
            base, base_cpu = this_round[servers[0].label]
            for label, (figures, cpu) in this_round.items():
                result = results[path][label]
                result.rps.append(figures["rps"])
                result.ratios.append(base["rps"] / figures["rps"])
                result.cpu.append(cpu)
                result.cpu_ratios.append(cpu / base_cpu)
                result.p50.append(figures["p50_us"])
                result.p90.append(figures["p90_us"])
                result.p99.append(figures["p99_us"])
                result.requests += figures["requests"]
                client_cpu.append(figures["client_cpu_us_per_request"])
    return {path: list(by_label.values()) for path, by_label in results.items()}, client_cpu


def read_table(results: list[ReadResult], baseline: str, settings: ServerSettings) -> str:
    rows = []
    for r in results:
        name = f"**{r.label}** (baseline)" if r.label == baseline else r.label
        if r.note:
            name += f" — {r.note}"
        cpu = statistics.median(r.cpu)
        rows.append(
            [
                name,
                f"{statistics.median(r.ratios):.2f}x",
                f"{_iqr(r.ratios):.2f}",
                f"{statistics.median(r.rps):,.0f}",
                "n/a" if math.isnan(cpu) else f"{cpu * 1e6:,.0f} µs",
                "n/a" if math.isnan(cpu) else f"{statistics.median(r.cpu_ratios):.2f}x",
                "n/a" if math.isnan(cpu) else f"{_iqr(r.cpu_ratios):.2f}",
                _ms(statistics.median(r.p50)),
                _ms(statistics.median(r.p90)),
                _ms(statistics.median(r.p99)),
                f"{r.requests:,}",
            ]
        )
    header = [
        "candidate",
        f"cost ratio to `{baseline}` (median)",
        "ratio IQR",
        "req/s (median)",
        "server CPU per request",
        f"CPU ratio to `{baseline}`",
        "CPU ratio IQR",
        "p50",
        "p90",
        "p99",
        f"requests ({settings.rounds} rounds)",
    ]
    return table_of_rows(header, rows)


# --- (b) event-loop latency under sync writes ----------------------------------------------------


def commit_cost(directory: Path, commits: int) -> float:
    """Median seconds of one INSERT and its commit on a scratch file set up as the write servers' are."""
    times = []
    with contextlib.closing(sqlite3.connect(directory / "commit-cost.sqlite3", isolation_level=None)) as db:
        for pragma in PRAGMAS:
            db.execute(pragma)
        db.execute(CREATE_TABLE)
        for _ in range(commits):
            start = time.perf_counter()
            db.execute("BEGIN")
            db.execute("INSERT INTO writes (payload) VALUES ('x')")
            db.execute("COMMIT")
            times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class LoopResult:
    label: str
    note: str
    idle: list[float] = field(default_factory=list)  # every /ping latency, µs, pooled over rounds
    loaded: list[float] = field(default_factory=list)
    write_rps: list[float] = field(default_factory=list)
    write_p99: list[float] = field(default_factory=list)


def measure_loop(
    servers: list[Server], notes: dict[str, str], writer: LoadGen, prober: LoadGen, settings: ServerSettings
) -> list[LoopResult]:
    probe = {"connections": 1, "interval": settings.probe_interval_s, "samples": True}
    results = {s.label: LoopResult(s.label, notes[s.label]) for s in servers}
    if settings.first_warmup_s:
        for server in servers:
            no_errors(
                f"{server.label} warm-up",
                writer.run(
                    port=server.port,
                    path="/write",
                    connections=settings.write_connections,
                    duration=0.1,
                    warmup=settings.first_warmup_s,
                ),
            )
    for _ in range(settings.write_rounds):
        for server in servers:
            result = results[server.label]
            idle = no_errors(
                f"{server.label} /ping alone",
                prober.run(
                    port=server.port,
                    path="/ping",
                    duration=settings.idle_probe_s,
                    warmup=settings.warmup_s,
                    **probe,
                ),
            )
            result.idle += idle["samples_us"]
            # Both start together and measure the same window; the probe is paced, the writes are not.
            writer.send(
                port=server.port,
                path="/write",
                connections=settings.write_connections,
                duration=settings.loaded_probe_s,
                warmup=settings.warmup_s,
            )
            prober.send(
                port=server.port,
                path="/ping",
                duration=settings.loaded_probe_s,
                warmup=settings.warmup_s,
                **probe,
            )
            loaded = no_errors(f"{server.label} /ping under writes", prober.receive())
            writes = no_errors(f"{server.label} /write", writer.receive())
            result.loaded += loaded["samples_us"]
            result.write_rps.append(writes["rps"])
            result.write_p99.append(writes["p99_us"])
    return list(results.values())


def loop_table(results: list[LoopResult]) -> str:
    rows = []
    for r in results:
        idle, loaded = sorted(r.idle), sorted(r.loaded)
        rows.append(
            [
                f"{r.label} — {r.note}" if r.note else r.label,
                _ms(percentile(idle, 0.5)),
                _ms(percentile(idle, 0.99)),
                _ms(percentile(loaded, 0.5)),
                _ms(percentile(loaded, 0.99)),
                _ms(loaded[-1]),
                f"{len(idle):,} / {len(loaded):,}",
                f"{statistics.median(r.write_rps):,.0f}",
                _ms(statistics.median(r.write_p99)),
            ]
        )
    header = [
        "candidate",
        "`/ping` alone: p50",
        "p99",
        "`/ping` under writes: p50",
        "p99",
        "max",
        "pings (alone / under writes)",
        "`/write` req/s (median)",
        "`/write` p99 (median)",
    ]
    return table_of_rows(header, rows)


# --- the run ------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "(version unknown)"


def _progress(message: str) -> None:
    print(f"<!-- server: {message} -->", file=sys.stderr, flush=True)


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


@contextlib.contextmanager
def running(servers: list[Server], loadgens: list[LoadGen], timeout: float = 120) -> Iterator[None]:
    """Start every server and load generator; stop and reap them all, whatever happens (Ctrl-C too)."""
    with ForkServer() as fork_server:
        try:
            for loadgen in loadgens:
                loadgen.start()
            for server in servers:
                fork_server.start(server)
            fork_server.wait_ready(servers, timeout)
            yield
        finally:
            for loadgen in loadgens:
                loadgen.stop()


def run(settings: Settings) -> list[Section]:
    server_settings = SMOKE if settings.smoke else FULL
    s = server_settings
    work_dir = Path(tempfile.mkdtemp(prefix="bench-server-"))
    try:
        ports = iter(free_ports(len(READ_CANDIDATES) + len(WRITE_CANDIDATES)))
        readers = [
            Server(label, factory, next(ports), {}, work_dir / f"{factory}.log")
            for label, factory, _ in READ_CANDIDATES
        ]
        databases = {factory: work_dir / f"{factory}.sqlite3" for _, factory, _ in WRITE_CANDIDATES}
        writers = [
            Server(label, f, next(ports), {DB_ENV: str(databases[f])}, work_dir / f"{f}.log")
            for label, f, _ in WRITE_CANDIDATES
        ]
        commits = 5 if settings.smoke else 30
        loadgen, prober = LoadGen(), LoadGen()
        started = time.perf_counter()
        with running([*readers, *writers], [loadgen, prober]):
            startup = time.perf_counter() - started
            _progress(f"{len(readers) + len(writers)} servers listening after {startup:.1f} s")
            for server in readers:
                for path in READ_PATHS:
                    check_body(server, path)
            for server in writers:
                check_write(server, databases[server.factory])
            load_before = _load()
            reads, client_cpu = measure_reads(
                readers, {label: note for label, _, note in READ_CANDIDATES}, loadgen, s
            )
            load_middle = _load()
            _progress(f"throughput runs done after {time.perf_counter() - started:.0f} s")
            commit_before = commit_cost(work_dir, commits)
            loop = measure_loop(
                writers, {label: note for label, _, note in WRITE_CANDIDATES}, loadgen, prober, s
            )
            commit_after = commit_cost(work_dir, commits)
            load_after = _load()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    client = statistics.median(client_cpu)
    read_text = (
        f"uvicorn {_version('uvicorn')} (one worker, h11, asyncio loop) on 127.0.0.1, one process per "
        f"candidate, started in {startup:.1f} s; the load generator (`_loadgen`, Python asyncio) in its own "
        f"process on the same cores, using a median {client:,.0f} µs of CPU per request. "
        f"{s.connections} keep-alive connections, closed loop; {s.rounds} interleaved rounds of "
        f"{s.duration_s:g} s per candidate and endpoint, after {s.warmup_s:g} s of warm-up each. Load "
        f"average {load_before} before these runs, {load_middle} after.\n\n"
        "The cost ratio is bare's req/s over the candidate's in the same round: server time per request, "
        "in units of an empty request's (higher is slower). The CPU ratio divides the server process's CPU "
        "time per request (all threads, from `/proc`, warm-up included) by bare's in the same round: it "
        "moves less than req/s when neighbours take CPU. Latencies: medians over rounds of each round's "
        "percentile; with a closed loop they are about connections / req/s."
    )
    sync_text = (
        "The same servers and load as the `async def` table; the endpoint runs in FastAPI's threadpool."
    )
    pace = f"{s.probe_interval_s * 1000:g} ms"
    loop_text = (
        "Does a sync session's commit block the event loop? Per candidate one more server, with a `def` "
        "endpoint `/write` (one INSERT through the request's session, committed when the request ends) "
        "and an `async def` endpoint `/ping` that touches no database. The database: a SQLite file with "
        "its default rollback journal and `synchronous=FULL`, so each commit waits for fsyncs, as a "
        "commit to a remote database waits for the network (an INSERT and its commit on this disk, "
        f"median of {commits} on a scratch file: {commit_before * 1000:.1f} ms just before these runs, "
        f"{commit_after * 1000:.1f} ms just after); one writer, so a pool of one connection. One probe "
        f"connection sends `/ping` every {pace} (or as soon as the previous answer is back), alone for "
        f"{s.idle_probe_s:g} s, then for {s.loaded_probe_s:g} s while {s.write_connections} connections "
        f"keep `/write` busy; {s.write_rounds} interleaved rounds, percentiles of all pings pooled. A "
        "commit on the event loop holds every `/ping` behind it. Load average "
        f"{load_middle} before these runs, {load_after} after."
    )
    return [
        Section(
            "Server: `async def` endpoint", read_text, read_table(reads["/async"], READ_CANDIDATES[0][0], s)
        ),
        Section(
            "Server: `def` endpoint (FastAPI's threadpool)",
            sync_text,
            read_table(reads["/sync"], READ_CANDIDATES[0][0], s),
        ),
        Section("Server: event-loop latency while sync sessions commit", loop_text, loop_table(loop)),
    ]

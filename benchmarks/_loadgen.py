"""A small HTTP/1.1 load generator for 127.0.0.1: keep-alive connections, latency percentiles, JSON out.

    python -m benchmarks._loadgen --port 8000 --path /async --connections 16 --duration 2 --warmup 0.5
    python -m benchmarks._loadgen --serve   # one JSON command per stdin line, one JSON result per line

Each of ``connections`` keep-alive connections sends ``GET path``, reads the
whole response (status line, headers, ``Content-Length`` bytes of body) and
sends the next request at once (closed loop), or at most every ``interval``
seconds when one is given (a light probe). Responses that complete during the
warm-up are not counted; then, for ``duration`` seconds (longer, up to 5 s, if
no response came back in that time), the latency of every response (request
written to response read) is recorded, and the client's own CPU time. A status
other than 200, a response without ``Content-Length`` or a lost connection
counts as an error; an errored connection stops.

No wrk or hey on the machine these run on, so this is Python: one
``asyncio.Protocol`` per connection, parsing in ``data_received`` with no
coroutine, task or stream per request, so the client costs as little CPU as
Python allows. It still costs some, on the same cores as the server: run it in
its own process (``--serve`` keeps one alive across runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["percentile", "run_load"]

_HEADER_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class _Run:
    """What all connections of one run share: the request, the phase, the figures."""

    def __init__(self, request: bytes, interval_ns: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.request = request
        self.interval_ns = interval_ns
        self.recording = False
        self.stopping = False
        self.latencies: list[int] = []
        self.completed = 0  # every response, warm-up and tail included
        self.errors = 0
        self.error_kinds: dict[str, int] = {}
        self.started_ns = 0
        self.stopped_ns = 0
        self.cpu_s = 0.0

    def start_recording(self) -> None:
        self.started_ns = time.perf_counter_ns()
        self.cpu_s = time.process_time()
        self.recording = True

    def stop(self, extensions: int = 100) -> None:
        if not self.latencies and extensions:  # a run always measures something: wait for one response
            self.loop.call_later(0.05, self.stop, extensions - 1)
            return
        self.stopped_ns = time.perf_counter_ns()
        self.cpu_s = time.process_time() - self.cpu_s
        self.recording = False
        self.stopping = True

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1


class _Connection(asyncio.Protocol):
    def __init__(self, run: _Run) -> None:
        self.run = run
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.response_end = -1  # index in buffer where the current response ends; -1: headers not read
        self.ok = False
        self.sent_ns = 0
        self.failed = False
        self.closed: asyncio.Future[None] = run.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send()

    def send(self) -> None:
        if self.run.stopping:
            self.close()
            return
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(self.run.request)  # type: ignore[union-attr]

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if self.response_end < 0:
            end = buffer.find(_HEADER_END)
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            self.ok = head.startswith((b"http/1.1 200 ", b"http/1.0 200 "))
            start = head.find(_CONTENT_LENGTH)
            if start < 0:
                self.run.error("no content-length")
                self.failed = True
                self.close()
                return
            start += len(_CONTENT_LENGTH)
            stop = head.find(b"\r\n", start)
            self.response_end = end + 4 + int(head[start : stop if stop >= 0 else None])
        if len(buffer) < self.response_end:
            return
        now = time.perf_counter_ns()
        del buffer[: self.response_end]
        self.response_end = -1
        run = self.run
        run.completed += 1
        if run.recording:
            run.latencies.append(now - self.sent_ns)
        if not self.ok:
            run.error("status")
        if run.interval_ns:
            due = self.sent_ns + run.interval_ns
            if due > now:
                run.loop.call_later((due - now) / 1e9, self.send)
                return
        self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.run.stopping and not self.failed:
            self.run.error(f"connection lost: {exc!r}")
        if not self.closed.done():
            self.closed.set_result(None)


async def run_load(
    *,
    port: int,
    path: str,
    connections: int,
    duration: float,
    warmup: float,
    interval: float = 0.0,
    host: str = "127.0.0.1",
    samples: bool = False,
) -> dict[str, Any]:
    """One run: ``warmup`` seconds uncounted, then ``duration`` seconds measured; the figures as a dict."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\n\r\n".encode()
    run = _Run(request, round(interval * 1e9))
    loop = run.loop
    conns: list[_Connection] = []
    for _ in range(connections):
        conn = _Connection(run)
        try:
            await loop.create_connection(lambda c=conn: c, host, port)
        except OSError as exc:
            run.error(f"connect: {exc!r}")
            continue
        conns.append(conn)
    loop.call_later(warmup, run.start_recording)
    loop.call_later(warmup + duration, run.stop)
    waiting = [c.closed for c in conns]
    if waiting:
        # A connection closes after the response in flight when the run stops; a server
        # that never answers leaves it open: give it a few seconds, then count it.
        _, pending = await asyncio.wait(waiting, timeout=warmup + duration + 15)
        for conn in conns:
            if conn.closed in pending:
                run.error("no response in time")
                conn.close()
    window = max(run.stopped_ns - run.started_ns, 1) / 1e9
    latencies = sorted(run.latencies)
    result: dict[str, Any] = {
        "path": path,
        "connections": connections,
        "interval_s": interval,
        "window_s": round(window, 4),
        "requests": len(latencies),
        "all_requests": run.completed,
        "client_cpu_us_per_request": run.cpu_s / max(len(latencies), 1) * 1e6,
        "errors": run.errors,
        "error_kinds": run.error_kinds,
        "rps": len(latencies) / window,
        "p50_us": percentile(latencies, 0.50) / 1000,
        "p90_us": percentile(latencies, 0.90) / 1000,
        "p99_us": percentile(latencies, 0.99) / 1000,
        "max_us": (latencies[-1] / 1000) if latencies else 0.0,
    }
    if samples:
        result["samples_us"] = [round(x / 1000, 1) for x in run.latencies]
    return result


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks._loadgen", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--serve", action="store_true", help="read JSON commands from stdin, one per line")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int)
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=0.5, help="uncounted seconds first")
    parser.add_argument("--interval", type=float, default=0.0, help="per connection: at most one request per")
    parser.add_argument("--samples", action="store_true", help="also print every latency (µs)")
    args = parser.parse_args(argv)
    if not args.serve and args.port is None:
        parser.error("--port is required (or --serve)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if not args.serve:
        options = {k: v for k, v in vars(args).items() if k != "serve"}
        print(json.dumps(asyncio.run(run_load(**options))), flush=True)
        return 0
    for line in sys.stdin:  # the parent writes one command, then waits for its result
        if line.strip():
            print(json.dumps(asyncio.run(run_load(**json.loads(line)))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the notes service on a throw-away SQLite file and show, request by request, what the scope does.

`python3 dev.py demo` runs this: a real uvicorn server on 127.0.0.1, real HTTP
requests, a real SQLite file. Exits 0 when every expectation held, 1 otherwise.
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from .main import create_app

failures: list[str] = []


def show(title: str) -> None:
    print(f"\n== {title}")


def check(ok: bool, what: str) -> None:
    print(f"   {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def call(client: httpx.Client, method: str, url: str, **kwargs: Any) -> httpx.Response:
    response = client.request(method, url, **kwargs)
    body = kwargs.get("json")
    sent = f" {body}" if body is not None else ""
    print(f"   {method} {url}{sent} -> {response.status_code} {response.text[:100]}")
    return response


@contextmanager
def serve(app: Any) -> Iterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # uvicorn has no start-up event to wait on
    if not server.started:
        raise SystemExit("uvicorn did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def run_notes_demo(database: Path) -> None:
    app = create_app(f"sqlite:///{database}")
    with serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        print(f"notes service on {url}, database {database}")

        show("One session per request, shared by the endpoint, the service and both repositories")
        first = call(client, "GET", "/debug/sessions").json()
        second = call(client, "GET", "/debug/sessions").json()
        check(len(set(first.values())) == 1, "every injection in the first request got the same session")
        check(len(set(second.values())) == 1, "every injection in the second request got the same session")
        check(first["endpoint_first"] != second["endpoint_first"], "the second request got a new session")

        show("A successful request commits")
        user = call(client, "POST", "/users", json={"email": "ada@example.com", "name": "Ada"}).json()
        added = call(client, "POST", f"/users/{user['id']}/notes", json=["buy milk", "call Bob"])
        check(added.status_code == 201, "two notes were added")

        show("A failing request rolls back everything it wrote")
        failed = call(client, "POST", f"/users/{user['id']}/notes", json=["write report", "  "])
        check(failed.status_code == 422, "a blank note fails the whole request")
        notes = call(client, "GET", f"/users/{user['id']}").json()["notes"]
        check(notes == ["buy milk", "call Bob"], "'write report', added before the failure, was rolled back")
        taken = call(client, "POST", "/users", json={"email": "ada@example.com", "name": "Imposter"})
        check(taken.status_code == 409, "registering a taken email is refused")


def run_seed_issue_demo() -> None:
    from .. import seed_issue_app

    show("The app from the dependency-injector issue, with RequestScoped(SessionLocal)")
    with serve(seed_issue_app.app) as url, httpx.Client(base_url=url, timeout=30) as client:
        for path in ("/", "/sync"):
            ids = [call(client, "GET", path).json() for _ in range(2)]
            check(all(i["session_1_id"] == i["session_2_id"] for i in ids), f"{path}: both parameters equal")
            check(ids[0]["session_key"] != ids[1]["session_key"], f"{path}: a new session per request")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        run_notes_demo(Path(tmp) / "notes.sqlite3")
    run_seed_issue_demo()
    print()
    if failures:
        print(f"{len(failures)} expectation(s) failed: {failures}")
        return 1
    print("All expectations held.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""uvicorn --workers and --reload with a lifespan-managed engine leave no connection open (PostgreSQL)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from .conftest import free_port

APP = Path(__file__).parent / "apps" / "lifespan_app.py"
ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.postgres, pytest.mark.server]


def connections(postgres_url: str, name: str) -> int:
    """Open connections whose application_name matches the LIKE pattern ``name``."""
    engine = create_engine(postgres_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            query = text("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE :name")
            return int(conn.execute(query, {"name": name}).scalar_one())
    finally:
        engine.dispose()


def wait_until(condition: Any, what: str, seconds: float = 30) -> Any:
    """Poll a server-side state with no event to wait on; bounded."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting until {what}")


def get(url: str) -> dict[str, Any] | None:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    shutil.copy(APP, tmp_path / "lifespan_app.py")
    return tmp_path


@pytest.fixture
def run_uvicorn(app_dir: Path, postgres_url: str, unique_name: str) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> tuple[subprocess.Popen[str], str]:
        port = free_port()
        env = {
            **os.environ,
            "APP_DB_URL": postgres_url,
            "APP_NAME": unique_name,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "uvicorn", "lifespan_app:app", "--app-dir", str(app_dir)]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "info", *args]
        proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, cwd=app_dir)
        procs.append(proc)
        return proc, f"http://127.0.0.1:{port}/"

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    return stderr


def test_two_workers_leave_no_connection_after_shutdown(
    run_uvicorn: Any, postgres_url: str, unique_name: str
) -> None:
    """With --workers 2 each worker opens its pool in the lifespan and disposes it at shutdown."""
    proc, url = run_uvicorn("--workers", "2")
    wait_until(lambda: get(url), "the server answers")
    pids = {get(url)["pid"] for _ in range(40)}  # type: ignore[index]
    assert connections(postgres_url, f"{unique_name}-%") >= 1
    stderr = stop(proc)
    assert proc.returncode == 0, stderr
    assert stderr.count("pooled connections after shutdown: 0") == 2, stderr
    assert connections(postgres_url, f"{unique_name}-%") == 0
    assert pids  # the requests were served by the workers whose connections we counted


def test_reload_disposes_the_old_workers_pool(
    run_uvicorn: Any, app_dir: Path, postgres_url: str, unique_name: str
) -> None:
    """With --reload a code change restarts the worker; the old worker's connections are closed."""
    proc, url = run_uvicorn("--reload", "--reload-dir", str(app_dir))
    first = wait_until(lambda: get(url), "the server answers")
    assert first["version"] == 1
    old = f"{unique_name}-{first['pid']}"
    assert connections(postgres_url, old) == 1

    source = app_dir / "lifespan_app.py"
    source.write_text(source.read_text().replace("VERSION = 1", "VERSION = 2"))
    second = wait_until(lambda: (r := get(url)) and r["version"] == 2 and r, "the reloaded app answers")
    assert second["pid"] != first["pid"]
    assert connections(postgres_url, old) == 0
    stderr = stop(proc)
    assert stderr.count("pooled connections after shutdown: 0") == 2, stderr
    assert connections(postgres_url, f"{unique_name}-%") == 0

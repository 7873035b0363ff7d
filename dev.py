#!/usr/bin/env python3
"""The project's commands, needing nothing but Python >= 3.10.

    python3 dev.py demo    run the example service on SQLite and show what the scope does
    python3 dev.py serve   serve the example on http://127.0.0.1:8000 (try /docs)
    python3 dev.py test    lint, type-check and run the whole test suite (args go to pytest)
    python3 dev.py bench   run the benchmarks
    python3 dev.py soak    run the reliability suite's long versions (tests/reliability; args go to pytest)
    python3 dev.py docs    build the documentation site into site/ (warnings are errors)

Each command creates or reuses the virtualenv in .venv and installs what it needs
into it (again only when pyproject.toml changed).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("DI_REQUEST_SCOPE_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")


def ensure_venv(extra: str) -> None:
    """Create .venv if needed and install the project with one extra, once per pyproject change."""
    if sys.version_info < (3, 10):  # noqa: UP036 - dev.py may be started by an older python3
        sys.exit(f"di_request_scope needs Python >= 3.10; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating virtualenv {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extra.encode()).hexdigest()
    stamp = VENV / f".installed-{extra}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    print(f"installing di-request-scope[{extra}] into {VENV}", flush=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "--editable", f".[{extra}]"], check=True, cwd=ROOT)
    stamp.write_text(digest)


def run(*args: str) -> int:
    print("$", " ".join(args), flush=True)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner is not our output
    return subprocess.run(args, cwd=ROOT, check=False, env=env).returncode


def test(pytest_args: list[str]) -> int:
    ensure_venv("test")
    py = str(PYTHON)
    steps = [
        (py, "-m", "ruff", "check", "."),
        (py, "-m", "ruff", "format", "--check", "."),
        (py, "-m", "mypy"),
        (py, "-m", "mypy", "--strict", "typing_tests"),
        (py, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(VENV / "site")),
        (py, "-m", "benchmarks", "--smoke"),  # every benchmark still runs; its figures mean nothing
        (py, "-m", "pytest", *pytest_args),  # last, so its summary closes the output
    ]
    for step in steps:
        code = run(*step)
        if code != 0:
            # pytest's 5 ("no tests ran") is a failure here too.
            print(f"failed ({code}): {' '.join(step)}", file=sys.stderr)
            return code
    return 0


def soak(pytest_args: list[str]) -> int:
    """The long reliability runs: 20,000 requests per database, 100,000 in-process, more examples."""
    ensure_venv("test")
    os.environ["DI_REQUEST_SCOPE_SOAK"] = "1"  # tests/reliability/conftest.py switches the counts up
    return run(str(PYTHON), "-m", "pytest", "tests/reliability", *pytest_args)


def main(argv: list[str]) -> int:  # noqa: PLR0911 - one return per command
    command, rest = (argv[0], argv[1:]) if argv else ("help", [])
    if command == "demo":
        ensure_venv("demo")
        return run(str(PYTHON), "-m", "examples.notes_app.demo")
    if command == "serve":
        ensure_venv("demo")
        return run(str(PYTHON), "-m", "uvicorn", "examples.notes_app.main:app", "--host", "127.0.0.1", *rest)
    if command == "test":
        return test(rest)
    if command == "docs":
        ensure_venv("docs")
        return run(str(PYTHON), "-m", "mkdocs", "build", "--strict", *rest)
    if command == "bench":
        ensure_venv("bench")
        return run(str(PYTHON), "-m", "benchmarks", *rest)
    if command == "soak":
        return soak(rest)
    print(__doc__)
    return 0 if command in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

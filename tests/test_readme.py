"""The README's quick start runs as written."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

README = Path(__file__).parent.parent / "README.md"


def quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def test_quick_start_shares_one_session_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick start's app answers and its repository and endpoint share the request's session."""
    monkeypatch.chdir(tmp_path)  # its SQLite file lands here
    module_file = tmp_path / "readme_quick_start.py"
    module_file.write_text(quick_start())
    spec = importlib.util.spec_from_file_location("readme_quick_start", module_file)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_quick_start"] = module
    try:
        spec.loader.exec_module(module)
        with TestClient(module.app) as client:
            assert client.get("/").json() == {"same_session": True}
    finally:
        module.container.unwire()
        del sys.modules["readme_quick_start"]

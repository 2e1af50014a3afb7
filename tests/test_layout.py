"""The layout's import rules: sources -> pipeline -> sinks, and ports owned by their consumer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "src" / "xiaoai_bridge"


def imported_modules(path: Path) -> set[str]:
    """Every xiaoai_bridge module `path` imports, including under TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("xiaoai_bridge")}


def modules_under(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


@pytest.mark.parametrize("path", modules_under("sinks"), ids=lambda path: path.name)
def test_a_sink_never_imports_a_source(path: Path) -> None:
    assert not {name for name in imported_modules(path) if ".sources" in name}


@pytest.mark.parametrize("path", modules_under("pipeline"), ids=lambda path: path.name)
def test_the_pipeline_imports_no_adapter(path: Path) -> None:
    adapters = {name for name in imported_modules(path) if ".sinks" in name or ".sources" in name}
    assert not adapters


def test_the_http_server_does_not_import_the_app() -> None:
    assert "xiaoai_bridge.app" not in imported_modules(PACKAGE / "http.py")
    assert "xiaoai_bridge.http" in imported_modules(PACKAGE / "app.py")


def test_the_sink_port_lives_with_the_pipeline() -> None:
    sinks = modules_under("sinks")
    assert not [path for path in sinks if path.name == "base.py"]
    users = [
        path.name for path in sinks if "xiaoai_bridge.pipeline.ports" in imported_modules(path)
    ]
    assert users


@pytest.mark.parametrize("path", modules_under("tools"), ids=lambda path: path.name)
def test_a_tool_imports_no_source_or_sink(path: Path) -> None:
    adapters = {name for name in imported_modules(path) if ".sinks" in name or ".sources" in name}
    assert not adapters


@pytest.mark.parametrize("path", modules_under("pipeline"), ids=lambda path: path.name)
def test_the_pipeline_imports_no_tool(path: Path) -> None:
    assert not {name for name in imported_modules(path) if "xiaoai_bridge.tools" in name}


def test_the_mcp_sdk_is_loaded_only_for_configured_servers() -> None:
    # It and its web stack cost ~45 MB of resident memory, for users of MCP servers only.
    code = "import sys, xiaoai_bridge.cli; print(sorted(m for m in sys.modules if m == 'mcp'))"
    result = subprocess.run(  # noqa: S603 - our own interpreter, fixed arguments
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"

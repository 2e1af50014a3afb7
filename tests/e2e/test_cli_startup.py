"""`xiaoai-bridge run` refusing to start: one `error:` line naming the path, a documented code."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli import EXE, clean_env, run_cli
from tests.fakes.mosquitto import free_port
from xiaoai_bridge.cli import EXIT_DATA

NOBODY = 65534


def run_env(home: Path, data_dir: Path) -> dict[str, str]:
    """No config file: the data dir and a free embedded broker port from the environment."""
    return clean_env(
        home,
        XIAOAI_BRIDGE_DATA_DIR=str(data_dir),
        XIAOAI_BRIDGE_MQTT__EMBEDDED_PORT=str(free_port()),
        XIAOAI_BRIDGE_HTTP__ENABLED="false",
        OPENAI_API_KEY="sk-test-startup-key",  # no "no key" warning before the error
    )


def assert_one_error_line(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for word in words:
        assert word in lines[0], lines[0]


async def test_data_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("not a directory\n")
    data_dir = tmp_path / "plain" / "state"
    code, _, err = await run_cli("run", env=run_env(tmp_path, data_dir), cwd=tmp_path)
    assert code == EXIT_DATA
    assert_one_error_line(err, str(data_dir), "data_dir")


async def test_data_dir_is_a_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "plain"
    data_dir.write_text("not a directory\n")
    code, _, err = await run_cli("run", env=run_env(tmp_path, data_dir), cwd=tmp_path)
    assert code == EXIT_DATA
    assert_one_error_line(err, str(data_dir), "not a directory", "data_dir")


async def test_corrupt_memory_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    data_dir.mkdir()
    database = data_dir / "memory.sqlite3"
    database.write_bytes(b"garbage, not SQLite " * 400)
    code, _, err = await run_cli("run", env=run_env(tmp_path, data_dir), cwd=tmp_path)
    assert code == EXIT_DATA
    assert_one_error_line(err, str(database), "move it aside")
    assert database.read_bytes().startswith(b"garbage")  # the user's file is left as it was


async def test_ask_with_a_corrupt_memory_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "state"
    data_dir.mkdir()
    (data_dir / "memory.sqlite3").write_bytes(b"\x00garbage" * 500)
    env = run_env(tmp_path, data_dir)
    code, _, err = await run_cli("ask", "你好", env=env, cwd=tmp_path)
    assert code == EXIT_DATA
    assert_one_error_line(err, str(data_dir / "memory.sqlite3"))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can enter (pytest's tmp_path is owner-only)."""
    path = Path(tempfile.mkdtemp(prefix="xiaoai-bridge-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for sub in path.rglob("*"):
            if sub.is_dir():
                sub.chmod(0o755)
        shutil.rmtree(path)


def as_unprivileged(argv: list[str]) -> list[str]:
    """Root ignores directory permissions: run the command as nobody to test them for real."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot drop privileges")
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


@pytest.mark.parametrize("exists", [True, False], ids=["read-only", "cannot-create"])
async def test_unwritable_data_dir(shared_dir: Path, exists: bool) -> None:
    locked = shared_dir / "locked"
    locked.mkdir(mode=0o555)
    locked.chmod(0o555)
    data_dir = locked if exists else locked / "state"
    env = run_env(shared_dir, data_dir)
    proc = await asyncio.create_subprocess_exec(
        *as_unprivileged([*EXE, "run"]),
        env=env,
        cwd="/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, raw = await proc.communicate()
    err = raw.decode()
    assert proc.returncode == EXIT_DATA, err
    assert_one_error_line(err, str(data_dir), "writable")


async def test_check_reports_an_unusable_data_dir(tmp_path: Path) -> None:
    data_dir = tmp_path / "plain"
    data_dir.write_text("not a directory\n")
    code, out, _ = await run_cli("check", env=run_env(tmp_path, data_dir), cwd=tmp_path)
    assert code == 1
    config_line = out.splitlines()[0]
    assert config_line.startswith("FAIL config: data_dir ")
    assert str(data_dir) in config_line

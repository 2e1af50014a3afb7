"""The release artifacts: sdist and wheel build, pass twine, and work installed in a clean venv."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import API_KEY
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
EXAMPLE = ROOT / "xiaoai-bridge.example.toml"
# Building and installing take a minute and reach the package index: scripts/release-test
# (run by .ci/run) turns these on.
pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("XIAOAI_BRIDGE_RELEASE_TEST"), reason="run by scripts/release-test"
    ),
    pytest.mark.timeout(600),
]


def run(
    *command: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to the end; its output is in the failure message when it fails."""
    return subprocess.run(  # noqa: S603 - our own tools and artifacts
        [str(part) for part in command], capture_output=True, text=True, check=False, env=env
    )


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build`: the sdist, then the wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    result = run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv (no system packages, not this one's) with only the wheel and its deps."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    wheel = dist / f"xiaoai_bridge-{VERSION}-py3-none-any.whl"
    result = run(env_dir / "bin" / "python", "-m", "pip", "install", "-q", wheel)
    assert result.returncode == 0, result.stdout + result.stderr
    return env_dir / "bin" / "xiaoai-bridge"


def clean_env(**values: str) -> dict[str, str]:
    """The environment of a user's shell: none of this machine's XIAOAI_BRIDGE_ settings."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("XIAOAI_BRIDGE_", "OPENAI"))}
    return kept | values


def test_build_makes_an_sdist_and_a_wheel_of_the_version(dist: Path) -> None:
    assert sorted(p.name for p in dist.iterdir()) == [
        f"xiaoai_bridge-{VERSION}-py3-none-any.whl",
        f"xiaoai_bridge-{VERSION}.tar.gz",
    ]
    with zipfile.ZipFile(dist / f"xiaoai_bridge-{VERSION}-py3-none-any.whl") as wheel:
        names = set(wheel.namelist())
    sources = {
        p.relative_to(ROOT / "src").as_posix()
        for p in (ROOT / "src" / "xiaoai_bridge").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sources <= names
    assert "xiaoai_bridge/py.typed" in names


def test_twine_check_passes(dist: Path) -> None:
    result = run(sys.executable, "-m", "twine", "check", "--strict", *sorted(dist.iterdir()))
    assert result.returncode == 0, result.stdout + result.stderr


def test_installed_wheel_says_its_version(installed: Path) -> None:
    result = run(installed, "--version", env=clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"xiaoai-bridge {VERSION}"


async def test_installed_wheel_checks_the_sample_config(
    installed: Path, mosquitto: Mosquitto, llm: FakeOpenAI, tmp_path: Path
) -> None:
    # The example config as a user copies it, with the broker and LLM set as the README says.
    env = clean_env(
        XIAOAI_BRIDGE_MQTT__URL=mosquitto.url,
        XIAOAI_BRIDGE_LLM__BASE_URL=llm.base_url,
        XIAOAI_BRIDGE_LLM__MODEL="fake-model",
        XIAOAI_BRIDGE_DATA_DIR=str(tmp_path / "data"),
        OPENAI_API_KEY=API_KEY,
    )
    good = await asyncio.to_thread(run, installed, "check", "--config", EXAMPLE, env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok   mqtt" in good.stdout
    assert "ok   llm" in good.stdout

    wrong_key = env | {"OPENAI_API_KEY": "sk-wrong-0123456789"}
    bad = await asyncio.to_thread(run, installed, "check", "--config", EXAMPLE, env=wrong_key)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL llm" in bad.stdout

"""The built images run as users run them: scripts/container-test builds them, then runs these."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.conftest import API_KEY, Probe, open_probe
from tests.fakes.mosquitto import Mosquitto
from tests.fakes.openai_server import FakeOpenAI
from xiaoai_bridge.app import MEMORY_FILE

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("XIAOAI_BRIDGE_TEST_IMAGE", "")
ADDON_IMAGE = os.environ.get("XIAOAI_BRIDGE_TEST_ADDON_IMAGE", "")
BUILT_BY = "built and run by scripts/container-test (needs buildah and debootstrap)"
IMAGE_UID = 10001  # the Dockerfile's xiaoai user
ANSWER = "好的，这是容器里的回答。"
START_S = 60.0  # a cold start in a chroot on a loaded 2-core machine
STOP_S = 10.0  # what Docker waits after SIGTERM before it kills


class Container:
    """One buildah working container of an image; its command runs like `docker run` would."""

    def __init__(self, image: str, log: Path) -> None:
        self.image = image
        self.name = f"xiaoai-bridge-test-{uuid.uuid4().hex[:12]}"
        self.log = log
        self.config: dict[str, Any] = {}
        self.process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Container:
        inspected = await buildah("inspect", "--type", "image", self.image)
        self.config = json.loads(inspected)["Docker"]["config"]
        await buildah("from", "--pull-never", "--name", self.name, self.image)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process is not None and self.process.returncode is None:
            for pid in self._tree():
                with contextlib.suppress(psutil.NoSuchProcess):
                    psutil.Process(pid).kill()
            await self.process.wait()
        await buildah("rm", self.name)

    async def start(self, env: Mapping[str, str], volumes: Mapping[Path, str]) -> None:
        """Run the image's own command (Entrypoint + Cmd) as the image's user."""
        command = [*(self.config.get("Entrypoint") or []), *self.config["Cmd"]]
        # `docker run -v` replaces a VOLUME the image declares; buildah 1.28's run mounts an
        # anonymous copy of each declared volume instead, hiding the binds once there are two.
        declared = set(self.config.get("Volumes") or {})
        for inside in volumes.values():
            target = inside.split(":", 1)[0]
            if target in declared:
                await buildah("config", f"--volume={target}-", self.name)
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                "buildah",
                "run",
                *_flags(env, volumes),
                self.name,
                "--",
                *command,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def exec(self, command: Sequence[str], env: Mapping[str, str]) -> int:
        """Run `command` inside the container next to the running one; its exit status."""
        proc = await asyncio.create_subprocess_exec(
            "buildah",
            "run",
            *_flags(env, {}),
            self.name,
            "--",
            *command,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        return await proc.wait()

    async def wait_healthy(self, env: Mapping[str, str]) -> None:
        """The image's HEALTHCHECK command, run inside, until it passes."""
        test = self.config["Healthcheck"]["Test"]
        assert test[0] == "CMD"
        async with asyncio.timeout(START_S):
            while await self.exec(test[1:], env) != 0:
                assert self.process is not None
                assert self.process.returncode is None, self.log.read_text(errors="replace")
                await asyncio.sleep(1)

    def bridge(self) -> psutil.Process:
        """The `xiaoai-bridge run` process inside the container."""
        for pid in self._tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                process = psutil.Process(pid)
                cmdline = process.cmdline()
                if any(part.endswith("/xiaoai-bridge") for part in cmdline) and "run" in cmdline:
                    return process
        raise AssertionError(f"no xiaoai-bridge process: {self.log.read_text(errors='replace')}")

    async def stop_within(self, seconds: float) -> int:
        """SIGTERM to the bridge, as `docker stop` sends; its exit status once it is gone."""
        assert self.process is not None
        self.bridge().send_signal(signal.SIGTERM)
        async with asyncio.timeout(seconds):
            return await self.process.wait()

    def _tree(self) -> list[int]:
        if self.process is None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.process.pid)
            return [child.pid for child in root.children(recursive=True)] + [root.pid]
        return []


def _flags(env: Mapping[str, str], volumes: Mapping[Path, str]) -> list[str]:
    flags = [f"--env={key}={value}" for key, value in env.items()]
    return flags + [f"--volume={host}:{inside}" for host, inside in volumes.items()]


async def buildah(*args: str) -> str:
    """Run buildah; its output, or a failure that shows what it said."""
    proc = await asyncio.create_subprocess_exec(
        "buildah", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"buildah {' '.join(args)}: {err.decode(errors='replace')}"
    return out.decode()


def owned_dir(path: Path, uid: int, mode: int = 0o700) -> Path:
    """A host directory for a volume, owned by the image's user as a named volume would be."""
    path.mkdir(parents=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


@pytest.fixture
async def answering_llm() -> AsyncIterator[FakeOpenAI]:
    """The fake LLM with one fixed answer."""
    async with FakeOpenAI(api_key=API_KEY, model="fake-model", answer=ANSWER) as server:
        yield server


@pytest.fixture
async def broker_probe(mosquitto: Mosquitto) -> AsyncIterator[Probe]:
    """A Node-RED stand-in on the test broker, which the container reaches on the host loopback."""
    async with open_probe(mosquitto, client_id=f"probe-{uuid.uuid4().hex[:8]}") as probe:
        yield probe


async def ask(probe: Probe, question_id: str) -> None:
    """One question over MQTT, answered by the bridge in the container through the fake LLM."""
    await probe.ask({"text": "你好", "id": question_id})
    reply = await probe.reply_json(START_S)
    assert reply["id"] == question_id
    assert reply["text"] == ANSWER


def free_port() -> int:
    """A port free on the loopback now: the container shares the host's network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(not IMAGE, reason=BUILT_BY)
async def test_image_runs_from_the_environment_as_its_user_and_stops_on_sigterm(
    tmp_path: Path, mosquitto: Mosquitto, answering_llm: FakeOpenAI, broker_probe: Probe
) -> None:
    data = owned_dir(tmp_path / "data", IMAGE_UID)
    port = free_port()
    env = {
        "XIAOAI_BRIDGE_MQTT__URL": mosquitto.url,
        "XIAOAI_BRIDGE_LLM__BASE_URL": answering_llm.base_url,
        "XIAOAI_BRIDGE_LLM__API_KEY": API_KEY,
        "XIAOAI_BRIDGE_LLM__MODEL": "fake-model",
        "XIAOAI_BRIDGE_HTTP__PORT": str(port),
    }
    async with Container(IMAGE, tmp_path / "container.log") as container:
        assert container.config["User"] not in ("", "root", "0")
        await container.start(env, {data: "/data"})
        await container.wait_healthy({"XIAOAI_BRIDGE_HTTP__PORT": str(port)})
        assert container.bridge().uids().real == IMAGE_UID

        await ask(broker_probe, "env-1")
        memory = data / MEMORY_FILE
        assert memory.is_file()
        assert memory.stat().st_uid == IMAGE_UID
        assert "no config file at /config/xiaoai-bridge.toml" in container.log.read_text()

        assert await container.stop_within(STOP_S) == 0


@pytest.mark.skipif(not IMAGE, reason=BUILT_BY)
async def test_image_uses_the_config_file_mounted_at_config(
    tmp_path: Path, mosquitto: Mosquitto, answering_llm: FakeOpenAI, broker_probe: Probe
) -> None:
    port = free_port()
    config = owned_dir(tmp_path / "config", IMAGE_UID, 0o755)
    config_file = config / "xiaoai-bridge.toml"
    config_file.write_text(
        f'[mqtt]\nurl = "{mosquitto.url}"\n'
        f'[llm]\nbase_url = "{answering_llm.base_url}"\napi_key = "{API_KEY}"\n'
        f'model = "fake-model"\n[http]\nport = {port}\n',
        encoding="utf-8",
    )
    config_file.chmod(0o600)  # it holds the API key, as the README tells users
    os.chown(config_file, IMAGE_UID, IMAGE_UID)
    data = owned_dir(tmp_path / "data", IMAGE_UID)
    async with Container(IMAGE, tmp_path / "container.log") as container:
        # Nothing in the environment: the broker, the LLM and the port come from the file alone.
        await container.start({}, {config: "/config:ro", data: "/data"})
        await container.wait_healthy({"XIAOAI_BRIDGE_HTTP__PORT": str(port)})
        await ask(broker_probe, "file-1")
        assert "no config file" not in container.log.read_text()
        assert await container.stop_within(STOP_S) == 0


@pytest.mark.skipif(not ADDON_IMAGE, reason=BUILT_BY)
async def test_addon_image_runs_from_the_options_the_supervisor_writes(
    tmp_path: Path, mosquitto: Mosquitto, answering_llm: FakeOpenAI, broker_probe: Probe
) -> None:
    addon = yaml.safe_load((ROOT / "addon" / "xiaoai-bridge" / "config.yaml").read_text())
    # The Supervisor writes every option, the user's values over the defaults, as one JSON object.
    options = addon["options"] | {
        "llm_base_url": answering_llm.base_url,
        "llm_api_key": API_KEY,
        "llm_model": "fake-model",
        "homeassistant_mode": False,
        "mqtt_mode": True,
        "mqtt_url": mosquitto.url,
        "mqtt_discovery": False,
    }
    data = tmp_path / "data"
    data.mkdir()
    (data / "options.json").write_text(json.dumps(options, ensure_ascii=False), encoding="utf-8")
    port = free_port()
    # What the Supervisor sets in every add-on's environment; the port only keeps parallel runs
    # on this shared loopback apart (the Supervisor gives each add-on its own network).
    env = {"SUPERVISOR_TOKEN": "supervisor-token-0123456789", "XIAOAI_BRIDGE_HTTP__PORT": str(port)}
    async with Container(ADDON_IMAGE, tmp_path / "addon.log") as container:
        await container.start(env, {data: "/data"})
        await container.wait_healthy({"XIAOAI_BRIDGE_HTTP__PORT": str(port)})
        await ask(broker_probe, "addon-1")
        assert (data / "xiaoai-bridge.toml").stat().st_mode & 0o777 == 0o600
        assert (data / MEMORY_FILE).is_file()
        assert await container.stop_within(STOP_S) == 0

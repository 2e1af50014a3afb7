"""The blog's setup for real: Node-RED runs the example flow against the bridge, HA and a broker."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from tests.conftest import Probe
from tests.fakes.homeassistant_server import FakeHomeAssistant, FakeSpeaker, RecordedCall
from tests.fakes.mosquitto import Mosquitto, free_port
from tests.fakes.openai_server import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
FLOW = REPO / "examples" / "node-red" / "flows.json"
# scripts/setup installs tests/node_red/package.json here.
RED_JS = REPO / ".node-red" / "node_modules" / "node-red" / "red.js"
LOOPBACK = "127.0.0.1"
START_S = 20.0  # Node-RED is up and connected in ~1 s here; slower machines get slack
ANSWER_S = 10.0
# A watcher added to the flow reports the nodes' status here (retained), so the test knows
# when the HA nodes are running and the mqtt-in node has subscribed.
STATUS_TOPIC = "xiaoai-bridge-e2e/node-red-status"
SPEAK = ("xiaomi_miot", "intelligent_speaker")
PLACEHOLDER_PLAYER = "media_player.xiaomi_lx06_xxxx_play_control"

# Node-RED without anything that reaches beyond this machine: no telemetry or update check, no
# palette manager, no module installs; editor and admin API on loopback only, no login.
SETTINGS_JS = """module.exports = {settings};
"""


def _settings(port: int) -> dict[str, Any]:
    return {
        "flowFile": "flows.json",
        "credentialSecret": False,
        "uiHost": LOOPBACK,
        "uiPort": port,
        "telemetry": {"enabled": False, "updateNotification": False},
        "diagnostics": {"enabled": False, "ui": False},
        "runtimeState": {"enabled": False, "ui": False},
        "externalModules": {
            "autoInstall": False,
            "palette": {"allowInstall": False, "allowUpdate": False, "allowUpload": False},
            "modules": {"allowInstall": False},
        },
        "functionExternalModules": False,
        "editorTheme": {
            "tours": False,
            "palette": {"catalogues": []},
            "projects": {"enabled": False},
            "multiplayer": {"enabled": False},
        },
        "logging": {"console": {"level": "info", "metrics": False, "audit": False}},
    }


def _node(nodes: list[dict[str, Any]], node_type: str) -> dict[str, Any]:
    (found,) = [node for node in nodes if node["type"] == node_type]
    return found


def derive_flow(
    broker: Mosquitto, ha: FakeHomeAssistant, speaker: FakeSpeaker
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """The example flow filled in as a user would after import; returns (flow, credentials)."""
    nodes: list[dict[str, Any]] = copy.deepcopy(json.loads(FLOW.read_text(encoding="utf-8")))
    heard = _node(nodes, "server-state-changed")
    heard["entities"]["entity"] = [speaker.sensor]
    # Speak through Home Assistant: the xiaoai-tts node would log into Xiaomi's cloud.
    _node(nodes, "xiaoai-tts")["d"] = True
    action = _node(nodes, "api-call-service")
    action.pop("d", None)
    assert PLACEHOLDER_PLAYER in action["data"]
    action["data"] = action["data"].replace(PLACEHOLDER_PLAYER, speaker.media_player)
    broker_node = _node(nodes, "mqtt-broker")
    broker_node["broker"], broker_node["port"] = broker.host, broker.port
    server = _node(nodes, "server")
    answers = _node(nodes, "mqtt in")
    tab = _node(nodes, "tab")["id"]
    nodes += [
        {
            "id": "e2estatus000001",
            "type": "status",
            "z": tab,
            "name": "test: node status",
            "scope": [heard["id"], answers["id"]],
            "wires": [["e2estatusfn0001"]],
        },
        {
            "id": "e2estatusfn0001",
            "type": "function",
            "z": tab,
            "name": "test: all statuses",
            "func": (
                "const seen = flow.get('e2e_status') || {};\n"
                "seen[msg.status.source.id] = msg.status.text || '';\n"
                "flow.set('e2e_status', seen);\n"
                "msg.payload = seen;\n"
                "return msg;\n"
            ),
            "outputs": 1,
            "wires": [["e2estatusout001"]],
        },
        {
            "id": "e2estatusout001",
            "type": "mqtt out",
            "z": tab,
            "name": "test: report status",
            "topic": STATUS_TOPIC,
            "qos": "1",
            "retain": "true",
            "broker": broker_node["id"],
            "wires": [],
        },
    ]
    # The server node's Base URL and token are credentials: they live in flows_cred.json.
    return nodes, {server["id"]: {"host": ha.url, "access_token": ha.token}}


@dataclass
class NodeRed:
    """A running Node-RED process and where its log goes."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        """The end of Node-RED's log, for failure messages."""
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def flow_warnings(self) -> list[str]:
        """Warnings and errors logged once the flows started (startup notices excluded)."""
        text = self.log.read_text(encoding="utf-8", errors="replace")
        _, _, running = text.partition("Started flows")
        return [line for line in running.splitlines() if "[warn]" in line or "[error]" in line]

    def remote_addresses(self) -> set[str]:
        """Every remote address Node-RED's TCP sockets are connected to right now (Linux)."""
        return _remote_addresses(self.process.pid)


def _decode_address(hex_address: str) -> str:
    # /proc/net/tcp{,6}: the address is hex, in 32-bit words of host (little-endian) order.
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _remote_addresses(pid: int) -> set[str]:
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    remote: set[str] = set()
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text(encoding="ascii").splitlines()[1:]
        for line in lines:
            fields = line.split()
            if fields[9] in inodes and fields[3] != "0A":  # 0A: listening, no peer
                remote.add(_decode_address(fields[2].split(":")[0]))
    return remote


def _node_js() -> str:
    """The node binary, or skip: without it and the local install there is no Node-RED."""
    node = shutil.which("node") or shutil.which("node", path="/usr/local/bin:/usr/bin")
    if node is None or not RED_JS.exists():
        pytest.skip("Node-RED is not installed locally: run scripts/setup (it needs npm)")
    return node


@contextlib.contextmanager
def _process(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 - the local Node-RED install, fixed arguments
            args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


async def _wait_http(node_red: NodeRed) -> None:
    url = f"http://{LOOPBACK}:{node_red.port}/settings"
    async with aiohttp.ClientSession() as session, asyncio.timeout(START_S):
        while True:
            if node_red.process.poll() is not None:
                pytest.fail(
                    f"Node-RED exited with {node_red.process.returncode}:\n{node_red.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)


def _word(status: str | None) -> str:
    # Status texts are message keys here, e.g. "home-assistant.status.running".
    return (status or "").rsplit(".", 1)[-1].strip().lower()


async def _wait_flow_ready(
    broker: Mosquitto, node_red: NodeRed, heard_id: str, answers_id: str
) -> None:
    """Until the HA node says running and the mqtt-in node says connected."""
    client = aiomqtt.Client(broker.host, broker.port, identifier="node-red-watcher")
    last: dict[str, str] = {}
    try:
        async with client, asyncio.timeout(START_S):
            await client.subscribe(STATUS_TOPIC, qos=1)
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                last = json.loads(message.payload)
                if _word(last.get(heard_id)) == "running" and _word(last.get(answers_id)) == (
                    "connected"
                ):
                    return
    except TimeoutError:
        pytest.fail(f"Node-RED's flow did not connect (status {last}):\n{node_red.log_tail()}")


@contextlib.asynccontextmanager
async def run_node_red(
    tmp_path: Path, flow: list[dict[str, Any]], credentials: dict[str, dict[str, str]]
) -> AsyncIterator[NodeRed]:
    """Node-RED as a subprocess with its own user dir, deployed with `flow`."""
    node = _node_js()
    user_dir = tmp_path / "node-red"
    user_dir.mkdir()
    port = free_port()
    (user_dir / "settings.js").write_text(
        SETTINGS_JS.format(settings=json.dumps(_settings(port), indent=2)), encoding="utf-8"
    )
    (user_dir / "flows.json").write_text(json.dumps(flow, ensure_ascii=False), encoding="utf-8")
    # credentialSecret false: the credentials file is plain JSON, keyed by node id.
    (user_dir / "flows_cred.json").write_text(json.dumps(credentials), encoding="utf-8")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(user_dir),  # nothing lands in the real home directory
        "NODE_ENV": "production",
    }
    args = [
        node,
        str(RED_JS),
        "--userDir",
        str(user_dir),
        "--settings",
        str(user_dir / "settings.js"),
        "--port",
        str(port),
        "flows.json",
    ]
    with _process(args, tmp_path / "node-red.log", env) as process:
        yield NodeRed(process=process, port=port, log=tmp_path / "node-red.log")


@pytest.fixture
def speaker(ha: FakeHomeAssistant) -> FakeSpeaker:
    return ha.add_speaker()


@pytest.fixture
async def node_red(
    tmp_path: Path,
    mosquitto: Mosquitto,
    ha: FakeHomeAssistant,
    speaker: FakeSpeaker,
    start_bridge: Callable[..., Any],
) -> AsyncIterator[NodeRed]:
    """The bridge online, then Node-RED with the example flow, connected to HA and the broker."""
    _node_js()
    await start_bridge()
    flow, credentials = derive_flow(mosquitto, ha, speaker)
    async with run_node_red(tmp_path, flow, credentials) as running:
        await _wait_http(running)
        await _wait_flow_ready(
            mosquitto,
            running,
            _node(flow, "server-state-changed")["id"],
            _node(flow, "mqtt in")["id"],
        )
        # Running implies subscribed: the HA nodes subscribe before they ask for the config.
        assert any(msg.get("event_type") == "state_changed" for msg in ha.received)
        yield running


async def _spoken(ha: FakeHomeAssistant, count: int, node_red: NodeRed) -> RecordedCall:
    try:
        calls = await ha.wait_for_calls(count, domain=SPEAK[0], within_s=ANSWER_S)
    except TimeoutError:
        pytest.fail(f"no speak call #{count}:\n{node_red.log_tail()}")
    return calls[count - 1]


async def test_example_flow_in_real_node_red_speaks_the_bridges_answers(
    node_red: NodeRed,
    ha: FakeHomeAssistant,
    speaker: FakeSpeaker,
    probe: Probe,
    llm: FakeOpenAI,
) -> None:
    async def ask(sentence: str, count: int) -> tuple[str, RecordedCall]:
        ha.set_conversation(speaker.sensor, sentence)
        answer = await probe.reply_text(ANSWER_S)
        return answer, await _spoken(ha, count, node_red)

    # A question the way the speaker hears it: the wake word and 机器人 in front.
    answer, call = await ask("小爱同学机器人今天天气怎么样", 1)
    assert llm.requests[-1].last_user_message == "今天天气怎么样"
    assert "今天天气怎么样" in answer
    assert (call.domain, call.service) == SPEAK
    assert call.text == answer
    assert call.entity_id == speaker.media_player
    assert call.service_data["execute"] is False
    assert call.service_data["silent"] is False

    # XiaoAi's own answer lands a moment later: attributes change, no new utterance.
    current = ha.states[speaker.sensor]
    later = dict(current["attributes"], answers=[{"type": "TTS", "tts": {"text": "晴"}}])
    ha.set_state(speaker.sensor, current["state"], later)

    # The same sentence again (only the timestamp changes) is answered again.
    again, call = await ask("小爱同学机器人今天天气怎么样", 2)
    assert again == answer
    assert call.text == again

    # Quotes, a line break and a backslash survive Node-RED, the broker, the bridge and the
    # action node's JSONata.
    answer, call = await ask('机器人他说"你好"\n然后呢\\', 3)
    assert llm.requests[-1].last_user_message == '他说"你好"\n然后呢\\'
    assert call.text == answer
    assert '"你好"' in answer

    # Nothing was asked or spoken more than once per utterance.
    await asyncio.sleep(0.5)
    assert len(llm.requests) == 3
    assert len(ha.calls_to(*SPEAK)) == 3
    assert probe.replies.empty()
    # Node-RED only ever talked to this machine, and to HA only over the websocket API.
    peers = node_red.remote_addresses()
    assert peers, "Node-RED holds connections to HA and the broker"
    assert all(ipaddress.ip_address(peer).is_loopback for peer in peers), peers
    assert set(ha.http_requests) == {"GET /api/websocket"}
    assert node_red.flow_warnings() == []
    assert node_red.process.poll() is None, node_red.log_tail()

"""The Node-RED example flow is wired like the seed's, onto the bridge's topics."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from xiaoai_bridge.config import DEFAULT_QUESTION_TOPIC, DEFAULT_REPLY_TOPIC

FLOW = Path(__file__).resolve().parents[1] / "examples" / "node-red" / "flows.json"
CONFIG_TYPES = {"server", "mqtt-broker", "xiaoai-tts-configurator"}
# Node types of Node-RED core, node-red-contrib-home-assistant-websocket and
# node-red-contrib-xiaoai-tts, as each package registers them.
KNOWN_TYPES = CONFIG_TYPES | {
    "tab",
    "comment",
    "function",
    "mqtt in",
    "mqtt out",
    "server-state-changed",
    "api-call-service",
    "xiaoai-tts",
}
# Config-node references: property -> the type it must point at.
REFERENCES = {"server": "server", "broker": "mqtt-broker", "xiaoai": "xiaoai-tts-configurator"}
# Node outputs per type (wires must have one list per output).
OUTPUTS = {"xiaoai-tts": 2, "mqtt out": 0}


def load_flow() -> list[dict[str, Any]]:
    nodes = json.loads(FLOW.read_text(encoding="utf-8"))
    assert isinstance(nodes, list)
    return nodes


@pytest.fixture
def flow() -> dict[str, dict[str, Any]]:
    nodes = load_flow()
    by_id = {node["id"]: node for node in nodes}
    assert len(by_id) == len(nodes), "node ids must be unique"
    return by_id


def of_type(flow: dict[str, dict[str, Any]], node_type: str) -> dict[str, Any]:
    found = [node for node in flow.values() if node["type"] == node_type]
    assert len(found) == 1, node_type
    return found[0]


def targets(node: dict[str, Any]) -> set[str]:
    return {target for output in node.get("wires", []) for target in output}


def test_every_node_is_a_real_type_on_the_tab_and_every_wire_lands(
    flow: dict[str, dict[str, Any]],
) -> None:
    tab = of_type(flow, "tab")
    for node in flow.values():
        assert node["type"] in KNOWN_TYPES, node["type"]
        if node["type"] in CONFIG_TYPES or node["type"] == "tab":
            assert "z" not in node or node["z"] == ""
            assert "wires" not in node
            continue
        assert node["z"] == tab["id"]
        assert targets(node) <= set(flow), f"{node['id']} is wired to a missing node"
        assert all(flow[t]["type"] not in CONFIG_TYPES for t in targets(node))
        expected_outputs = OUTPUTS.get(node["type"], 1)
        if node["type"] != "comment" and expected_outputs:
            assert len(node["wires"]) == expected_outputs, node["type"]
        for key, wanted in REFERENCES.items():
            if key in node:
                assert flow[node[key]]["type"] == wanted, f"{node['id']}.{key}"


def test_heard_sentences_go_to_the_question_topic(flow: dict[str, dict[str, Any]]) -> None:
    heard = of_type(flow, "server-state-changed")
    assert heard["version"] == 6
    (sensor,) = heard["entities"]["entity"]
    assert sensor.startswith("sensor.")
    assert sensor.endswith("_conversation")
    # The same sentence twice changes only attributes; the node must still fire.
    assert heard["outputOnlyOnStateChange"] is False
    assert heard["outputInitially"] is False  # no old utterance at deploy time
    assert {"property": "data", "propertyType": "msg", "value": "", "valueType": "eventData"} in (
        heard["outputProperties"]
    )
    (fresh_id,) = targets(heard)
    fresh = flow[fresh_id]
    assert fresh["type"] == "function"
    (ask_id,) = targets(fresh)
    ask = flow[ask_id]
    assert ask["type"] == "mqtt out"
    assert ask["topic"] == DEFAULT_QUESTION_TOPIC
    assert ask["qos"] == "1"  # the bridge's persistent session keeps questions while it restarts
    assert ask["retain"] == "false"  # a retained question would be asked again on every restart


def test_answers_on_the_reply_topic_reach_a_speaking_node(
    flow: dict[str, dict[str, Any]],
) -> None:
    answers = of_type(flow, "mqtt in")
    assert answers["topic"] == DEFAULT_REPLY_TOPIC
    assert answers["datatype"] == "utf8"  # the reply is plain text, spoken as it is
    assert answers["broker"] == of_type(flow, "mqtt out")["broker"]
    speakers = {flow[t]["type"]: flow[t] for t in targets(answers)}
    assert set(speakers) == {"xiaoai-tts", "api-call-service"}
    tts = speakers["xiaoai-tts"]
    assert tts["tts"] == ""  # set, it would replace every answer with its own text
    action = speakers["api-call-service"]
    assert action["action"] == "xiaomi_miot.intelligent_speaker"
    assert (action["domain"], action["service"]) == ("xiaomi_miot", "intelligent_speaker")
    # intelligent_speaker takes the speaker as a field, not a target: the action node wants it
    # in the data (a target entity is moved there with a warning, and refused from 1.0 on).
    assert action["entityId"] == []
    assert action["dataType"] == "jsonata"
    assert '"entity_id": "media_player.' in action["data"]
    assert "payload" in action["data"]
    enabled = [node for node in speakers.values() if not node.get("d")]
    assert len(enabled) == 1, "exactly one speaking node on, or answers are spoken twice"


def test_no_secrets_in_the_export(flow: dict[str, dict[str, Any]]) -> None:
    for node in flow.values():
        assert "credentials" not in node
    account = of_type(flow, "xiaoai-tts-configurator")
    assert account["username"] == ""
    assert account["password"] == ""
    broker = of_type(flow, "mqtt-broker")
    assert "@" not in broker["broker"]
    assert broker["port"] == 1883


_HARNESS = """
const func = new Function("msg", "context", {func});
const store = {{}};
const context = {{get: (k) => store[k], set: (k, v) => {{ store[k] = v; }}}};
const out = [];
for (const msg of {messages}) {{
    const result = func(msg, context);
    out.push(result === null ? null : result.payload);
}}
console.log(JSON.stringify(out));
"""


def _event(text: str, stamp: datetime, state: str | None = None) -> dict[str, Any]:
    return {
        "payload": text,
        "data": {
            "entity_id": "sensor.xiaomi_lx06_xxxx_conversation",
            "new_state": {
                "state": state if state is not None else text,
                "attributes": {"timestamp": stamp.isoformat()},
            },
        },
    }


def test_function_passes_each_fresh_utterance_once() -> None:
    node_js = shutil.which("node")
    if node_js is None:
        pytest.skip("Node.js is not installed")
    flow = {node["id"]: node for node in load_flow()}
    func = of_type(flow, "function")["func"]
    now = datetime.now(UTC)
    messages = [
        _event("机器人讲个笑话", now),
        _event("机器人讲个笑话", now),  # XiaoAi's own answer arrived: attributes only
        _event("机器人讲个笑话", now + timedelta(seconds=5)),  # asked again
        _event("打开客厅灯", now - timedelta(minutes=10)),  # replayed after a restart
        _event("", now + timedelta(seconds=9), state="unavailable"),
    ]
    script = _HARNESS.format(func=json.dumps(func), messages=json.dumps(messages))
    result = subprocess.run(  # noqa: S603 - our own script, run by the system's node
        [node_js, "-e", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert json.loads(result.stdout) == ["机器人讲个笑话", None, "机器人讲个笑话", None, None]

"""docker-compose.yml is a valid Compose file and runs the image the Dockerfile builds."""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from xiaoai_bridge.config import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
# The Compose Specification's JSON schema (compose-spec/compose-spec on GitHub), as the
# check-jsonschema package vendors it: no network needed.
SCHEMA = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
# ${VAR:-default} / ${VAR-default} / ${VAR:?error} / ${VAR}: Compose's interpolation forms.
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def bridge_service() -> dict[str, Any]:
    service = compose()["services"]["xiaoai-bridge"]
    assert isinstance(service, dict)
    return service


def dockerfile_instruction(name: str) -> str:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    found = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    assert found, name
    return found[-1].removeprefix(f"{name} ")


def schema_errors(path: Path) -> list[str]:
    """What is wrong with `path` against the Compose schema (nothing when it is valid)."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        f"{list(error.absolute_path)}: {error.message}" for error in validator.iter_errors(document)
    ]


def test_compose_file_matches_the_compose_schema() -> None:
    assert schema_errors(COMPOSE) == []


@pytest.mark.parametrize(
    "mistake",
    [
        {"portz": ["8099:8099"]},  # a misspelt key
        {"volumes": "xiaoai-data:/data"},  # a string where a list belongs
        {"depends_on": {"mosquitto": {"condition": "sometime"}}},  # no such condition
    ],
)
def test_schema_check_catches_a_broken_service(tmp_path: Path, mistake: dict[str, Any]) -> None:
    broken = compose()
    broken["services"]["xiaoai-bridge"] |= mistake
    path = tmp_path / "docker-compose.yml"
    path.write_text(json.dumps(broken), encoding="utf-8")
    assert schema_errors(path) != []


def test_compose_builds_and_names_the_image_the_readme_builds() -> None:
    service = bridge_service()
    assert service["build"] == "."
    assert (ROOT / service["build"] / "Dockerfile").is_file()
    # README: `docker build -t xiaoai-bridge .`, i.e. xiaoai-bridge:latest.
    assert service["image"] == "xiaoai-bridge:latest"


def test_compose_mounts_the_image_volumes_and_publishes_its_port() -> None:
    service = bridge_service()
    targets = {volume.split(":")[1] for volume in service["volumes"]}
    assert targets == set(json.loads(dockerfile_instruction("VOLUME")))
    config_mount = next(v for v in service["volumes"] if v.split(":")[1] == "/config")
    assert config_mount.endswith(":ro")  # the config holds secrets; the bridge never writes it
    named = {v.split(":")[0] for v in service["volumes"] if not v.startswith((".", "/"))}
    assert named <= set(compose()["volumes"])
    published = {str(port).rsplit(":", 1)[-1] for port in service["ports"]}
    assert published == {dockerfile_instruction("EXPOSE")}


def test_compose_environment_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("XIAOAI_BRIDGE_")]:
        monkeypatch.delenv(key)
    for key, value in bridge_service()["environment"].items():
        match = INTERPOLATION.fullmatch(str(value))
        monkeypatch.setenv(key, (match.group(3) or "") if match else str(value))
    settings = Settings()
    assert settings.mqtt_enabled
    endpoint = settings.mqtt.endpoint()
    assert (endpoint.host, endpoint.port) == ("mosquitto", 1883)
    assert "mosquitto" in compose()["services"]
    assert "mosquitto" in bridge_service()["depends_on"]

#!/usr/bin/env python3
"""Home Assistant add-on entry: turn the add-on options into a config file, then run the bridge."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

_LOGGER = logging.getLogger("xiaoai-bridge-addon")

OPTIONS_PATH = Path("/data/options.json")
CONFIG_PATH = Path("/data/xiaoai-bridge.toml")
DATA_DIR = "/data"
SUPERVISOR_URL = "http://supervisor"
# The Supervisor proxies Home Assistant's API (websocket included) for add-ons with
# homeassistant_api: true; SUPERVISOR_TOKEN is the access token.
HA_CORE_URL = "http://supervisor/core"
SUPERVISOR_TIMEOUT_S = 10.0
HTTP_ANY_HOST = "0.0.0.0"  # noqa: S104 - only with an access token, see build_config

# Add-on option -> the config key it sets (dotted); the test holds config.yaml to this table.
OPTION_KEYS: Mapping[str, str] = {
    "llm_base_url": "llm.base_url",
    "llm_api_key": "llm.api_key",
    "llm_model": "llm.model",
    "llm_system_prompt": "llm.system_prompt",
    "trigger_keywords": "homeassistant.trigger.keywords",
    "memory_max_turns": "memory.max_turns",
    "homeassistant_mode": "homeassistant.url",
    "speakers": "homeassistant.speakers",
    "speak_service": "homeassistant.speak_service",
    "acknowledgement": "homeassistant.acknowledgement",
    "mqtt_mode": "mqtt.enabled",
    "mqtt_url": "mqtt.url",
    "mqtt_discovery": "mqtt.discovery",
    "question_topic": "mqtt.question_topic",
    "reply_topic": "mqtt.reply_topic",
    "http_token": "http.token",
    "log_level": "log_level",
    "tools_enabled": "tools.enabled",
    "tools_timezone": "tools.timezone",
    "tools_mcp": "tools.mcp",
}

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


class AddonError(Exception):
    """The options cannot make a working configuration; the message says what to change."""


def load_options(path: Path = OPTIONS_PATH) -> dict[str, Any]:
    """The options the Supervisor wrote for this add-on."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AddonError(
            f"{path} is missing: is this running as a Home Assistant add-on?"
        ) from None
    except (OSError, ValueError) as err:
        raise AddonError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise AddonError(f"{path} does not hold a JSON object")
    return data


def fetch_mqtt_service(token: str, base_url: str = SUPERVISOR_URL) -> dict[str, Any] | None:
    """The broker the Supervisor offers (Mosquitto add-on), or None when there is none."""
    request = urllib.request.Request(  # noqa: S310 - a fixed http:// URL of the Supervisor
        f"{base_url}/services/mqtt", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=SUPERVISOR_TIMEOUT_S) as response:  # noqa: S310
            body = json.loads(response.read())
    except urllib.error.HTTPError as err:
        # 400 {"result": "error", ...}: no add-on provides the service.
        _LOGGER.info("no MQTT service from the Supervisor (HTTP %s)", err.code)
        return None
    except (urllib.error.URLError, OSError, ValueError) as err:
        _LOGGER.warning("could not ask the Supervisor for the MQTT service: %s", err)
        return None
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, dict) or not data.get("host"):
        return None
    return data


def mqtt_url(service: Mapping[str, Any]) -> str:
    """An mqtt(s):// URL for the Supervisor's MQTT service description."""
    scheme = "mqtts" if service.get("ssl") else "mqtt"
    auth = ""
    if service.get("username"):
        auth = quote(str(service["username"]), safe="")
        if service.get("password"):
            auth += ":" + quote(str(service["password"]), safe="")
        auth += "@"
    return f"{scheme}://{auth}{service['host']}:{int(service.get('port') or 1883)}"


def strip_regex(keywords: Sequence[str]) -> str:
    """The seed's "(.*机器人)" for any keywords: everything through the last keyword goes."""
    alternatives = "|".join(re.escape(k) for k in keywords)
    return f"(.*(?:{alternatives}))"


def build_config(
    options: Mapping[str, Any],
    *,
    mqtt_service: Mapping[str, Any] | None,
    supervisor_token: str | None,
) -> dict[str, Any]:
    """The service's config (as nested tables) for these add-on options."""
    llm: dict[str, Any] = {
        "base_url": options.get("llm_base_url") or "https://api.openai.com/v1",
        "model": options.get("llm_model") or "gpt-4o-mini",
    }
    if options.get("llm_api_key"):
        llm["api_key"] = options["llm_api_key"]
    if options.get("llm_system_prompt"):
        llm["system_prompt"] = options["llm_system_prompt"]
    config: dict[str, Any] = {
        "data_dir": DATA_DIR,
        "log_level": str(options.get("log_level") or "info").upper(),
        "llm": llm,
        "memory": {"max_turns": int(options.get("memory_max_turns", 10))},
    }
    ha_mode = bool(options.get("homeassistant_mode", True))
    if ha_mode:
        config["homeassistant"] = _homeassistant_section(options, supervisor_token)
    config["mqtt"] = _mqtt_section(options, mqtt_service)
    config["tools"] = _tools_section(options)
    if not ha_mode and not config["mqtt"]["enabled"]:
        raise AddonError("turn on homeassistant_mode or mqtt_mode: with neither, nothing is heard")
    # /healthz answers the health check inside the container either way; the status page is
    # reachable from outside only with a token, which the service demands beyond loopback.
    # Any host name, since the page is opened by whatever name Home Assistant's machine has
    # (homeassistant.local, its IP, a proxy): DNS rebinding cannot guess the token.
    if options.get("http_token"):
        config["http"] = {
            "host": HTTP_ANY_HOST,
            "token": options["http_token"],
            "allowed_hosts": ["*"],
        }
    return config


def _homeassistant_section(options: Mapping[str, Any], token: str | None) -> dict[str, Any]:
    if not token:
        raise AddonError(
            "homeassistant_mode needs the Supervisor's token (SUPERVISOR_TOKEN): the add-on "
            "must declare homeassistant_api: true"
        )
    section: dict[str, Any] = {"url": HA_CORE_URL, "token": token}
    for key in ("speak_service", "acknowledgement"):
        if options.get(key):
            section[key] = options[key]
    speakers = {
        str(s["sensor"]): str(s.get("media_player") or "")
        for s in options.get("speakers") or ()
        if isinstance(s, Mapping) and s.get("sensor")
    }
    if speakers:  # none listed: every XiaoAi conversation sensor is discovered
        section["speakers"] = speakers
    keywords = [str(k) for k in options.get("trigger_keywords") or () if str(k).strip()]
    if keywords:
        section["trigger"] = {
            "mode": "keyword",
            "keywords": keywords,
            "strip_regex": strip_regex(keywords),
        }
    return section


def _tools_section(options: Mapping[str, Any]) -> dict[str, Any]:
    section: dict[str, Any] = {"enabled": bool(options.get("tools_enabled", True))}
    if options.get("tools_timezone"):
        section["timezone"] = str(options["tools_timezone"])
    servers = []
    for server in options.get("tools_mcp") or ():
        if not isinstance(server, Mapping) or not server.get("name") or not server.get("url"):
            continue
        entry = {"name": str(server["name"]), "url": str(server["url"])}
        if server.get("token"):
            entry["token"] = str(server["token"])
        servers.append(entry)
    if servers:
        section["mcp"] = servers
    return section


def _mqtt_section(options: Mapping[str, Any], service: Mapping[str, Any] | None) -> dict[str, Any]:
    section: dict[str, Any] = {"enabled": bool(options.get("mqtt_mode", False))}
    if not section["enabled"]:
        return section
    url = options.get("mqtt_url") or (mqtt_url(service) if service else None)
    if not url:
        raise AddonError(
            "mqtt_mode needs a broker: install the Mosquitto broker add-on, or set mqtt_url"
        )
    section["url"] = url
    if "mqtt_discovery" in options:
        section["discovery"] = bool(options["mqtt_discovery"])
    for key in ("question_topic", "reply_topic"):
        if options.get(key):
            section[key] = options[key]
    return section


def to_toml(config: Mapping[str, Any]) -> str:
    """TOML for nested dicts of strings, numbers, booleans, lists of those and of flat dicts."""
    lines: list[str] = []
    _emit_table(config, [], lines)
    return "\n".join(lines).strip() + "\n"


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else json.dumps(name, ensure_ascii=False)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string: the same escapes, \uXXXX included.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _emit_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    arrays = {k: v for k, v in table.items() if _is_table_array(v)}
    scalars = {k: v for k, v in table.items() if not isinstance(v, Mapping) and k not in arrays}
    tables = {k: v for k, v in table.items() if isinstance(v, Mapping)}
    if path and (scalars or not (tables or arrays)):
        lines.append("")
        lines.append("[" + ".".join(_key(p) for p in path) + "]")
    lines.extend(f"{_key(k)} = {_value(v)}" for k, v in scalars.items())
    for name, sub in tables.items():
        _emit_table(sub, [*path, name], lines)
    for name, items in arrays.items():  # [[tools.mcp]]: one table per entry, flat values
        for item in items:
            lines.append("")
            lines.append("[[" + ".".join(_key(p) for p in [*path, name]) + "]]")
            lines.extend(f"{_key(k)} = {_value(v)}" for k, v in item.items())


def write_private(path: Path, text: str) -> None:
    """Write `text` readable by its owner only: the file holds tokens and passwords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)  # an older file may have had wider permissions
        file.write(text)


def prepare(
    options_path: Path = OPTIONS_PATH,
    config_path: Path = CONFIG_PATH,
    environ: Mapping[str, str] = os.environ,
) -> Path:
    """Read the options (and the Supervisor's broker), write the config file, return its path."""
    options = load_options(options_path)
    token = environ.get("SUPERVISOR_TOKEN") or None
    service = None
    if token and options.get("mqtt_mode") and not options.get("mqtt_url"):
        service = fetch_mqtt_service(token, environ.get("SUPERVISOR_URL", SUPERVISOR_URL))
    config = build_config(options, mqtt_service=service, supervisor_token=token)
    write_private(config_path, to_toml(config))
    return config_path


def main() -> int:
    """Prepare the config, then become `xiaoai-bridge run` (signals go straight to it)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = prepare()
    except AddonError as err:
        _LOGGER.error("%s", err)  # noqa: TRY400 - a configuration mistake, not a crash
        return 3
    os.execvp("xiaoai-bridge", ["xiaoai-bridge", "run", "--config", str(path)])  # noqa: S606, S607


if __name__ == "__main__":
    sys.exit(main())

"""The one validated configuration model: a TOML file plus environment variables."""

from __future__ import annotations

import logging
import os
import re
import string
import tomllib
import zoneinfo
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from xiaoai_bridge.errors import ConfigError
from xiaoai_bridge.pipeline.tool_loop import (
    DEFAULT_CALL_TIMEOUT_S,
    DEFAULT_CANCEL_WORDS,
    DEFAULT_CONFIRM_WINDOW_S,
    DEFAULT_CONFIRM_WORDS,
    DEFAULT_FILLER,
    DEFAULT_FILLER_AFTER_S,
    DEFAULT_MAX_ROUNDS,
)

_LOGGER = logging.getLogger(__name__)

ENV_PREFIX = "XIAOAI_BRIDGE_"
CONFIG_ENV = "XIAOAI_BRIDGE_CONFIG"
CONFIG_FILE_NAME = "xiaoai-bridge.toml"

DEFAULT_QUESTION_TOPIC = "/xiaomi/chatgpt"
DEFAULT_REPLY_TOPIC = "/xiaomi/reply"
DEFAULT_STATUS_TOPIC = "xiaoai-bridge/status"
DEFAULT_CLIENT_ID = "xiaoai-bridge"
DEFAULT_EMBEDDED_HOST = "127.0.0.1"
DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883
DEFAULT_MAX_PAYLOAD_BYTES = 4096

OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_SYSTEM_PROMPT = (
    "你是一个智能音箱里的语音助手，你的回答会被直接朗读出来。"
    "请用用户提问的语言回答，简短口语化，一般不超过三句话。"
    "不要使用 Markdown、列表、表格、代码、链接或表情符号。"
)
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_RETRIES = 2
DEFAULT_MAX_CONCURRENT_LLM = 64
DEFAULT_ANSWER_TIMEOUT_S = 120.0

DEFAULT_STRIP_REGEX = "(.*机器人)"
DEFAULT_KEYWORDS = ("机器人",)

DEFAULT_CONTINUOUS_START = ("开始持续对话",)
DEFAULT_CONTINUOUS_STOP = ("结束持续对话",)
DEFAULT_CONTINUOUS_IDLE_S = 30.0

# Home Assistant and Xiaomi modes hear everything said to the speaker, XiaoAi's own commands
# included, so they answer only triggered utterances by default.
DEFAULT_HA_KEYWORDS = ("机器人",)
DEFAULT_HA_SPEAK_SERVICE = "xiaomi_miot.intelligent_speaker"
DEFAULT_HA_FRESHNESS_S = 60.0
DEFAULT_SPEECH_CHARS_PER_S = 4.5

DEFAULT_MAX_TURNS = 10
DEFAULT_MAX_HISTORY_TOKENS = 2000
DEFAULT_FORGET_COMMANDS = ("清空对话", "忘掉之前的对话")

DEFAULT_MAX_PENDING = 10_000
DEFAULT_RESUME_FRESHNESS_S = 60.0
DEFAULT_MIN_CHUNK_CHARS = 4
DEFAULT_MAX_CHUNK_CHARS = 120
DEFAULT_FIRST_CLAUSE_CHARS = 8


def default_data_dir() -> Path:
    """Per-user state directory, following the XDG convention."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "xiaoai-bridge"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttSettings(_Section):
    """`[mqtt]`: the broker and the seed's topics."""

    url: str | None = Field(
        default=None,
        description="Broker URL, e.g. mqtt://user:pass@host:1883 or mqtts://host:8883. "
        "Unset: run an embedded broker on 127.0.0.1:1883.",
    )
    question_topic: str = Field(
        default=DEFAULT_QUESTION_TOPIC, description="Where questions arrive (the seed's topic)."
    )
    reply_topic: str = Field(
        default=DEFAULT_REPLY_TOPIC,
        description="Where complete answers go; sentences go to <reply_topic>/stream.",
    )
    status_topic: str = Field(
        default=DEFAULT_STATUS_TOPIC, description="Retained availability topic: online/offline."
    )
    client_id: str = Field(
        default=DEFAULT_CLIENT_ID,
        min_length=1,
        max_length=23,
        description="MQTT client id; also names the persistent session.",
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive.")
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        ge=16,
        description="Larger questions get an apology, not an answer.",
    )
    enabled: bool | None = Field(
        default=None,
        description="Run MQTT mode. Unset: on when url is set or no other mode is configured.",
    )
    discovery: bool | None = Field(
        default=None,
        description="Home Assistant MQTT discovery: the bridge appears in HA with sensors, an "
        "answering switch and forget buttons. Unset: on when url is set.",
    )
    discovery_prefix: str = Field(default="homeassistant", description="HA's discovery prefix.")
    discovery_base_topic: str = Field(
        default="xiaoai-bridge", description="Where the discovered entities' topics live."
    )
    embedded_port: int = Field(
        default=DEFAULT_MQTT_PORT,
        ge=1,
        le=65535,
        description="Port of the embedded broker (when url is unset).",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError("must start with mqtt:// or mqtts://")
        if not parts.hostname:
            raise ValueError("has no host name")
        try:
            parts.port  # noqa: B018  # urlsplit only validates the port when asked
        except ValueError as err:
            raise ValueError(f"has an invalid port: {err}") from None
        return value

    @field_validator(
        "question_topic", "reply_topic", "status_topic", "discovery_prefix", "discovery_base_topic"
    )
    @classmethod
    def _check_topic(cls, value: str) -> str:
        if not value or "+" in value or "#" in value:
            raise ValueError("must be a non-empty topic without wildcards")
        return value

    @property
    def discovery_enabled(self) -> bool:
        """Discovery runs when asked for, or by default next to a real (external) broker."""
        return self.discovery if self.discovery is not None else self.url is not None

    @property
    def embedded(self) -> bool:
        """True when no external broker is configured."""
        return self.url is None

    def endpoint(self) -> MqttEndpoint:
        """Where to connect: the configured broker, or the embedded one."""
        if self.url is None:
            return MqttEndpoint(host=DEFAULT_EMBEDDED_HOST, port=self.embedded_port)
        parts = urlsplit(self.url)
        tls = parts.scheme in ("mqtts", "ssl")
        return MqttEndpoint(
            host=parts.hostname or "",
            port=parts.port or (DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT),
            username=unquote(parts.username) if parts.username else None,
            password=SecretStr(unquote(parts.password)) if parts.password else None,
            tls=tls,
        )

    @property
    def stream_topic(self) -> str:
        """Where each sentence is published as soon as it is ready."""
        return f"{self.reply_topic}/stream"

    @property
    def error_topic(self) -> str:
        """Where rejected input is reported."""
        return f"{self.reply_topic}/error"


class MqttEndpoint(BaseModel):
    """A broker address resolved from `[mqtt] url`."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    username: str | None = None
    password: SecretStr | None = None
    tls: bool = False


class LLMSettings(_Section):
    """`[llm]`: any OpenAI-compatible chat-completions provider."""

    base_url: str = Field(
        default=OPENAI_BASE_URL,
        description="API base URL (OpenAI SDK convention, ends in /v1 for "
        "most providers). Falls back to $OPENAI_BASE_URL.",
    )
    api_key: SecretStr | None = Field(
        default=None, description="API key. Falls back to $OPENAI_API_KEY."
    )
    model: str = Field(default=DEFAULT_MODEL, min_length=1, description="Model name.")
    system_prompt: str = Field(
        default=DEFAULT_SYSTEM_PROMPT, description="System prompt; the default suits a speaker."
    )
    timeout_s: float = Field(
        default=DEFAULT_TIMEOUT_S,
        gt=0,
        description="Seconds to wait for the first words, retries included (then the "
        "apology); after them, the longest silence between two reads.",
    )
    max_retries: int = Field(
        default=DEFAULT_MAX_RETRIES,
        ge=0,
        le=10,
        description="Retries on 429/5xx/connection errors, with backoff.",
    )
    max_concurrent: int = Field(
        default=DEFAULT_MAX_CONCURRENT_LLM,
        ge=1,
        description="In-flight LLM calls at most (protects the provider).",
    )
    answer_timeout_s: float = Field(
        default=DEFAULT_ANSWER_TIMEOUT_S,
        gt=0,
        description="Deadline for a whole answer, in seconds.",
    )
    temperature: float | None = Field(
        default=None, ge=0, le=2, description="Sampling temperature (provider default)."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Answer length cap in tokens (provider default)."
    )

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def needs_key(self) -> bool:
        """Hosted OpenAI needs a key; local servers (Ollama, vLLM) usually do not."""
        return urlsplit(self.base_url).hostname == urlsplit(OPENAI_BASE_URL).hostname


class TriggerSettings(_Section):
    """`[trigger]`: which messages are questions and what prefix to strip."""

    strip_regex: str = Field(
        default=DEFAULT_STRIP_REGEX,
        description="Removed from the text before it is asked (the seed's wake prefix).",
    )
    mode: Literal["all", "keyword"] = Field(
        default="all",
        description="all: answer every message; keyword: "
        "only messages containing one of `keywords`.",
    )
    keywords: tuple[str, ...] = Field(
        default=DEFAULT_KEYWORDS, description="Trigger words for mode = keyword."
    )

    @field_validator("strip_regex")
    @classmethod
    def _check_regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"is not a valid regular expression: {err}") from None
        return value


class ConversationSettings(_Section):
    """`[conversation]`: continuous conversation, switched on and off by voice."""

    start_commands: tuple[str, ...] = Field(
        default=DEFAULT_CONTINUOUS_START,
        description="Phrases that start a continuous conversation: every utterance is then a "
        "question, no keyword needed.",
    )
    stop_commands: tuple[str, ...] = Field(
        default=DEFAULT_CONTINUOUS_STOP, description="Phrases that end it."
    )
    idle_timeout_s: float = Field(
        default=DEFAULT_CONTINUOUS_IDLE_S,
        gt=0,
        description="It ends by itself after this long without a question.",
    )


def _keyword_trigger(keywords: tuple[str, ...]) -> TriggerSettings:
    return TriggerSettings(mode="keyword", keywords=keywords)


class HomeAssistantSettings(_Section):
    """`[homeassistant]`: hear and speak through Home Assistant's websocket API."""

    url: str | None = Field(
        default=None,
        description="Home Assistant URL, e.g. http://homeassistant.local:8123. Unset: this "
        "mode is off.",
    )
    token: SecretStr | None = Field(
        default=None, description="Long-lived access token (Profile > Security)."
    )
    speakers: dict[str, str] | None = Field(
        default=None,
        description='Conversation sensor -> media_player to use; "" takes the sensor\'s '
        "parent_entity_id. Unset: discover every hass-xiaomi-miot conversation sensor.",
    )
    freshness_s: float = Field(
        default=DEFAULT_HA_FRESHNESS_S,
        gt=0,
        description="Utterances older than this are never answered (restarts replay them).",
    )
    speak_service: str = Field(
        default=DEFAULT_HA_SPEAK_SERVICE,
        description="Service that speaks: xiaomi_miot.intelligent_speaker, "
        "notify.send_message, or any domain.service taking a text field.",
    )
    speak_text_field: str | None = Field(
        default=None, description="Field carrying the text for other services (default text)."
    )
    speak_targets: dict[str, str] = Field(
        default_factory=dict,
        description="media_player -> entity to speak on, e.g. a notify entity.",
    )
    chars_per_second: float = Field(
        default=DEFAULT_SPEECH_CHARS_PER_S,
        gt=0,
        description="Speech rate used to pace sentences (the service says nothing about when "
        "speech ends).",
    )
    stop_xiaoai: Literal["none", "pause", "stop"] = Field(
        default="none",
        description="Pause or stop the speaker when a triggered question arrives, cutting "
        "XiaoAi's own answer short.",
    )
    acknowledgement: str = Field(
        default="", description="Said at once when a question is accepted, e.g. 让我想想."
    )
    trigger: TriggerSettings = Field(
        default_factory=lambda: _keyword_trigger(DEFAULT_HA_KEYWORDS),
        description="Which utterances are questions (default: keyword mode, 机器人).",
    )
    speaker_keywords: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="media_player -> its own trigger keywords, replacing trigger.keywords "
        "for that speaker.",
    )

    @field_validator("speak_service")
    @classmethod
    def _check_service(cls, value: str) -> str:
        domain, _, service = value.partition(".")
        if not domain or not service:
            raise ValueError("must look like domain.service")
        return value

    @field_validator("url")
    @classmethod
    def _check_ha_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise ValueError("must be an http(s):// or ws(s):// URL")
        return value

    @property
    def enabled(self) -> bool:
        """True when Home Assistant mode is configured."""
        return self.url is not None


DEFAULT_XIAOMI_KEYWORDS = ("请问", "帮我", "机器人")
XIAOMI_TOKEN_FILE = "xiaomi-token.json"  # noqa: S105  # a file name, not a secret


class XiaomiEndpoints(_Section):
    """`[xiaomi.endpoints]`: base URLs, for self-hosted proxies (and tests)."""

    account: str = Field(default="https://account.xiaomi.com", description="Account login.")
    mina: str = Field(default="https://api2.mina.mi.com", description="MiNA speaker API.")
    conversation: str = Field(
        default="https://userprofile.mina.mi.com", description="The conversation log."
    )
    miot: str = Field(default="https://api.io.mi.com/app", description="MIoT API.")

    @field_validator("account", "mina", "conversation", "miot")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s):// URL")
        return value.rstrip("/")


class XiaomiModelActions(_Section):
    """One row of `[xiaomi.models]`: where a speaker model keeps its MIoT actions."""

    play_text: tuple[int, int] | None = Field(default=None, description="(siid, aiid).")
    wake_up: tuple[int, int] | None = Field(default=None, description="(siid, aiid).")
    execute_text_directive: tuple[int, int] | None = Field(
        default=None, description="(siid, aiid)."
    )
    prefer_miot_tts: bool = Field(
        default=False, description="Speak with play-text instead of MiNA text_to_speech."
    )
    reports_play_status: bool = Field(
        default=True, description="MiNA play status says when speech ends."
    )


DEFAULT_TTS_HTTP_TIMEOUT_S = 10.0
_TTS_FIELDS = frozenset({"text", "voice"})


class XiaomiTtsHttp(_Section):
    """`[xiaomi.tts_http]`: the external TTS used when `[xiaomi] tts = "url"`."""

    engine: Literal["http", "edge"] = Field(
        default="http",
        description="http: the service at url; edge: Microsoft Edge's online voices "
        "(needs `pip install edge-tts` and the internet).",
    )
    url: str = Field(
        default="",
        description="URL template; {text} and {voice} are filled in URL-encoded, e.g. "
        "http://192.168.1.5:5000/tts?text={text}&voice={voice}. The answer is the audio.",
    )
    method: Literal["GET", "POST"] = Field(
        default="GET", description='POST sends {"text": ..., "voice": ...} as JSON.'
    )
    voice: str = Field(
        default="", description="Voice name for {voice} (edge: e.g. zh-CN-XiaoxiaoNeural)."
    )
    timeout_s: float = Field(
        default=DEFAULT_TTS_HTTP_TIMEOUT_S, gt=0, description="Per-sentence TTS deadline."
    )

    @field_validator("url")
    @classmethod
    def _check_template(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s):// URL")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as err:
            raise ValueError(f"is not a valid template ({err}); write {{{{ for a brace") from None
        if fields - _TTS_FIELDS:
            unknown = ", ".join(sorted(f"{{{name}}}" for name in fields - _TTS_FIELDS))
            raise ValueError(f"has unknown placeholders {unknown}; only {{text}} and {{voice}}")
        return value

    @model_validator(mode="after")
    def _text_goes_somewhere(self) -> XiaomiTtsHttp:
        if self.url and self.method == "GET" and "{text}" not in self.url:
            raise ValueError("xiaomi.tts_http.url: a GET template needs {text}")
        return self


class XiaomiSettings(_Section):
    """`[xiaomi]`: hear and speak through the Xiaomi cloud itself, no Home Assistant."""

    account: str = Field(
        default="",
        description="Xiaomi account: the numeric Xiaomi ID works best, phone or e-mail too. "
        "Unset (and no pass_token): this mode is off.",
    )
    password: SecretStr | None = Field(
        default=None,
        description="Account password; only needed until a login is cached "
        "(`xiaoai-bridge login`).",
    )
    pass_token: SecretStr | None = Field(
        default=None,
        description="passToken cookie pasted from a logged-in browser: the way past 2FA and "
        "captchas (with user_id).",
    )
    user_id: str | None = Field(default=None, description="userId cookie, with pass_token.")
    speakers: tuple[str, ...] = Field(
        default=(), description="Names, aliases or MiNA deviceIDs; empty: every speaker."
    )
    poll_interval_s: float = Field(
        default=1.0, ge=0.2, description="How often each speaker's conversation log is read."
    )
    freshness_s: float = Field(
        default=60.0, gt=0, description="Utterances older than this are never answered."
    )
    timeout_s: float = Field(default=10.0, gt=0, description="Per-request cloud timeout.")
    tts: Literal["auto", "mina", "miot", "url"] = Field(
        default="auto",
        description="How to speak: per the model table, or forced; url: an external TTS "
        "([xiaomi.tts_http]) served from the HTTP server (needs http.public_url).",
    )
    tts_http: XiaomiTtsHttp = Field(default_factory=XiaomiTtsHttp)
    silence: Literal["pause_stop", "pause", "stop", "none"] = Field(
        default="pause_stop", description="How to cut XiaoAi's own answer short."
    )
    wake: Literal["auto", "wake_up", "directive", "none"] = Field(
        default="auto",
        description="How to make the speaker listen again in a continuous conversation.",
    )
    chars_per_second: float = Field(
        default=DEFAULT_SPEECH_CHARS_PER_S, gt=0, description="Speech rate used for pacing."
    )
    models: dict[str, XiaomiModelActions] = Field(
        default_factory=dict, description="Hardware (e.g. LX06) -> its MIoT actions."
    )
    trigger: TriggerSettings = Field(
        default_factory=lambda: _keyword_trigger(DEFAULT_XIAOMI_KEYWORDS),
        description="Which utterances are questions (default: keyword mode).",
    )
    speaker_keywords: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description="MiNA deviceID -> its own trigger keywords, replacing trigger.keywords.",
    )
    endpoints: XiaomiEndpoints = Field(default_factory=XiaomiEndpoints)

    @property
    def enabled(self) -> bool:
        """True when Xiaomi cloud mode is configured."""
        return bool(self.account or self.pass_token)


DEFAULT_HTTP_PORT = 8099
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# A token guessable in an afternoon is no lock once the page is on the LAN.
MIN_HTTP_TOKEN_CHARS = 16
ANY_HOST = "*"
_HOST_NAME_RE = re.compile(r"[a-z0-9_]([a-z0-9_.-]{0,251}[a-z0-9_])?")


class HttpSettings(_Section):
    """`[http]`: the status page, /healthz and /metrics."""

    enabled: bool = Field(default=True, description="Serve the status page and endpoints.")
    host: str = Field(
        default="127.0.0.1",
        description="Address to listen on; beyond loopback a token is required.",
    )
    port: int = Field(default=DEFAULT_HTTP_PORT, ge=0, le=65535, description="TCP port.")
    token: SecretStr | None = Field(
        default=None,
        description="Access token for the page and API (Authorization: Bearer, or ?token=); "
        "/healthz and /audio/ (random names) stay open.",
    )
    public_url: str | None = Field(
        default=None,
        description="This server as the speakers reach it, e.g. http://192.168.1.5:8099; "
        'needed by [xiaomi] tts = "url".',
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="More host names the page answers to (e.g. a reverse proxy's name); "
        "localhost, address literals, this machine's hostname and public_url's host always "
        'work; "*" allows any (turns off the DNS-rebinding check).',
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        names = []
        for entry in value:
            name = entry.strip().lower().rstrip(".")
            if name != ANY_HOST and not _HOST_NAME_RE.fullmatch(name):
                raise ValueError(
                    f"{entry!r} is not a host name; give names without scheme or port, "
                    f'e.g. "bridge.home.arpa", or "{ANY_HOST}" for any'
                )
            names.append(name)
        return tuple(names)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if not value:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s):// URL, e.g. http://192.168.1.5:8099")
        if parts.hostname in _LOOPBACK_HOSTS:
            raise ValueError("must be the LAN address the speakers reach, not loopback")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> HttpSettings:
        if not self.enabled or self.host in _LOOPBACK_HOSTS:
            return self
        generate = "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"
        if self.token is None:
            raise ValueError(
                f"http.token: required when http.host is {self.host!r} (beyond loopback); "
                f"generate one with {generate} and set it, or ${ENV_PREFIX}HTTP__TOKEN"
            )
        if len(self.token.get_secret_value().strip()) < MIN_HTTP_TOKEN_CHARS:
            raise ValueError(
                f"http.token: too short to guard http.host {self.host!r} (beyond loopback): "
                f"use at least {MIN_HTTP_TOKEN_CHARS} characters; generate one with {generate}"
            )
        return self


class MemorySettings(_Section):
    """`[memory]`: conversation history kept per device."""

    max_turns: int = Field(
        default=DEFAULT_MAX_TURNS,
        ge=0,
        description="Question/answer pairs sent with each question (0 disables memory).",
    )
    max_tokens: int = Field(
        default=DEFAULT_MAX_HISTORY_TOKENS,
        ge=0,
        description="Approximate token budget for that history.",
    )
    forget_commands: tuple[str, ...] = Field(
        default=DEFAULT_FORGET_COMMANDS, description="Phrases that clear a device's memory."
    )


class InboxSettings(_Section):
    """`[inbox]`: questions accepted and not yet answered, kept on disk across restarts."""

    max_pending: int = Field(
        default=DEFAULT_MAX_PENDING,
        ge=1,
        description="Questions waiting for an answer, all speakers together; past it a new "
        'question gets a spoken "busy, ask again later" at once.',
    )
    freshness_s: float = Field(
        default=DEFAULT_RESUME_FRESHNESS_S,
        gt=0,
        description="After a restart, questions left unanswered are answered only if asked "
        "at most this many seconds ago; older ones are dropped (logged and counted).",
    )


class SpeechSettings(_Section):
    """`[speech]`: how answers are cut into spoken chunks."""

    min_chars: int = Field(
        default=DEFAULT_MIN_CHUNK_CHARS,
        ge=1,
        description="Shorter sentences are merged with the next one.",
    )
    max_chars: int = Field(
        default=DEFAULT_MAX_CHUNK_CHARS,
        ge=8,
        description="Longer runs are cut at a comma or space.",
    )
    first_clause_chars: int = Field(
        default=DEFAULT_FIRST_CLAUSE_CHARS,
        ge=0,
        description="An answer's first chunk already ends at a comma (，、： , :) once it is "
        "this long, so the first words are spoken sooner; 0 waits for the first sentence.",
    )


_MCP_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,24}")


class McpServerSettings(_Section):
    """`[[tools.mcp]]`: one MCP server whose tools the model may call."""

    name: str = Field(
        description="Short name (letters, digits, _ and -), shown with its tools and used as "
        "their prefix."
    )
    url: str | None = Field(
        default=None,
        description="Streamable HTTP (or SSE) endpoint, e.g. http://127.0.0.1:8123/api/mcp.",
    )
    transport: Literal["streamable_http", "sse", "stdio"] | None = Field(
        default=None,
        description="Unset: stdio with a command, streamable_http with a url; sse for "
        "servers that only speak the older SSE transport.",
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="Extra HTTP headers (kept secret, never logged)."
    )
    token: SecretStr | None = Field(
        default=None, description="Bearer token sent as Authorization (e.g. an HA token)."
    )
    command: str | None = Field(
        default=None, description="A program speaking MCP on stdin/stdout, e.g. uvx."
    )
    args: tuple[str, ...] = Field(default=(), description="Its arguments.")
    env: dict[str, SecretStr] = Field(
        default_factory=dict, description="Extra environment for it (kept secret)."
    )
    allow: tuple[str, ...] = Field(
        default=(), description="Only these of its tools (by the server's names); empty: all."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _MCP_NAME_RE.fullmatch(value):
            raise ValueError('use 1-24 letters, digits, _ or -, e.g. "search"')
        return value

    @model_validator(mode="after")
    def _one_way_to_reach(self) -> McpServerSettings:
        if (self.url is None) == (self.command is None):
            raise ValueError(f"tools.mcp {self.name!r}: give either url or command")
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"tools.mcp {self.name!r}: url must be http(s)://...")
            if self.transport == "stdio":
                raise ValueError(f"tools.mcp {self.name!r}: stdio needs a command, not a url")
        elif self.transport not in (None, "stdio"):
            raise ValueError(f"tools.mcp {self.name!r}: {self.transport} needs a url")
        return self

    @property
    def kind(self) -> Literal["streamable_http", "sse", "stdio"]:
        """The transport, resolved."""
        if self.transport is not None:
            return self.transport
        return "stdio" if self.command is not None else "streamable_http"


class ToolsHomeAssistantSettings(_Section):
    """`[tools.homeassistant]`: act on what the user exposed to Assist."""

    enabled: bool | None = Field(
        default=None,
        description="Unset: on whenever [homeassistant] is configured (its Assist exposure "
        "settings decide which entities the model sees).",
    )
    assist: bool = Field(
        default=False,
        description="Also offer a tool that hands a command to Home Assistant's own "
        "conversation agent (conversation/process).",
    )
    assist_agent_id: str | None = Field(
        default=None, description="That agent (unset: Home Assistant's default)."
    )
    language: str = Field(default="zh-cn", description="Language sent with those commands.")


class ToolsSettings(_Section):
    """`[tools]`: functions the model may call to act, not only talk."""

    enabled: bool = Field(
        default=True,
        description="Offer tools to the model; off for a model without function calling.",
    )
    max_rounds: int = Field(
        default=DEFAULT_MAX_ROUNDS,
        ge=1,
        le=16,
        description="Tool rounds per question; a model asking for more gets an apology.",
    )
    call_timeout_s: float = Field(
        default=DEFAULT_CALL_TIMEOUT_S,
        gt=0,
        description="Each call's deadline; a late tool is told to the model as failed.",
    )
    filler: str = Field(
        default=DEFAULT_FILLER,
        max_length=60,
        description='Said when tools keep the speaker silent for filler_after_s; "" for none.',
    )
    filler_after_s: float = Field(
        default=DEFAULT_FILLER_AFTER_S, ge=0, description="Silence before the filler."
    )
    confirm_window_s: float = Field(
        default=DEFAULT_CONFIRM_WINDOW_S,
        gt=0,
        description="How long a lock or alarm action waits for a spoken yes.",
    )
    confirm_words: tuple[str, ...] = Field(
        default=DEFAULT_CONFIRM_WORDS, description="Replies that confirm such an action."
    )
    cancel_words: tuple[str, ...] = Field(
        default=DEFAULT_CANCEL_WORDS, description="Replies that cancel it."
    )
    builtin: bool = Field(
        default=True,
        description="Date and time, forgetting the conversation, continuous conversation on/off.",
    )
    timezone: str | None = Field(
        default=None,
        description='IANA time zone for the date/time tool, e.g. "Asia/Shanghai"; unset: the '
        "system's.",
    )
    xiaoai: bool = Field(
        default=True,
        description="Let the model ask XiaoAi to carry out a command with its own skills "
        "(alarms, timers, music, Mi Home devices), in Home Assistant and Xiaomi cloud modes.",
    )
    xiaoai_silent: bool = Field(
        default=False,
        description="XiaoAi carries such commands out without answering aloud (the model's "
        "own answer then says it is done).",
    )
    homeassistant: ToolsHomeAssistantSettings = Field(default_factory=ToolsHomeAssistantSettings)
    mcp: tuple[McpServerSettings, ...] = Field(
        default=(), description="MCP servers, each a [[tools.mcp]] table."
    )

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str | None) -> str | None:
        if not value:
            return None
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}; use an IANA name such as Asia/Shanghai"
            ) from None
        return value

    @field_validator("mcp")
    @classmethod
    def _unique_servers(cls, value: tuple[McpServerSettings, ...]) -> tuple[McpServerSettings, ...]:
        names = [server.name for server in value]
        if len(names) != len(set(names)):
            raise ValueError("each [[tools.mcp]] server needs its own name")
        return value


class Settings(BaseSettings):
    """Everything xiaoai-bridge reads at start, validated before anything connects."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where state lives (memory database, token caches).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Log verbosity."
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    trigger: TriggerSettings = Field(default_factory=TriggerSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    inbox: InboxSettings = Field(default_factory=InboxSettings)
    speech: SpeechSettings = Field(default_factory=SpeechSettings)
    conversation: ConversationSettings = Field(default_factory=ConversationSettings)
    homeassistant: HomeAssistantSettings = Field(default_factory=HomeAssistantSettings)
    xiaomi: XiaomiSettings = Field(default_factory=XiaomiSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    tools: ToolsSettings = Field(default_factory=ToolsSettings)

    @model_validator(mode="after")
    def _check_modes(self) -> Settings:
        if self.homeassistant.enabled and self.homeassistant.token is None:
            raise ValueError(
                "homeassistant.token: Home Assistant mode needs a long-lived access token "
                f"(set it in the file or with ${ENV_PREFIX}HOMEASSISTANT__TOKEN)"
            )
        if self.xiaomi.pass_token is not None and not self.xiaomi.user_id:
            raise ValueError(
                "xiaomi.user_id: needed with xiaomi.pass_token (both are cookies of a "
                "logged-in browser)"
            )
        if self.xiaomi.tts == "url":
            self._check_url_tts()
        return self

    def _check_url_tts(self) -> None:
        why = 'with xiaomi.tts = "url" the speaker fetches audio from the HTTP server'
        if not self.http.enabled:
            raise ValueError(f"http.enabled: must be true ({why})")
        if self.http.public_url is None:
            raise ValueError(
                f"http.public_url: required ({why}); set the address the speaker reaches, "
                f"e.g. http://192.168.1.5:8099, or ${ENV_PREFIX}HTTP__PUBLIC_URL"
            )
        if self.http.host in _LOOPBACK_HOSTS:
            raise ValueError(
                f"http.host: {self.http.host!r} is loopback, the speaker cannot reach it ({why}); "
                "set it to the LAN address or 0.0.0.0 (and set http.token)"
            )
        if self.xiaomi.tts_http.engine == "http" and not self.xiaomi.tts_http.url:
            raise ValueError(
                'xiaomi.tts_http.url: required by xiaomi.tts = "url", e.g. '
                "http://192.168.1.5:5000/tts?text={text}"
            )

    @property
    def mqtt_enabled(self) -> bool:
        """MQTT mode runs when configured, or as the default when no other mode is."""
        if self.mqtt.enabled is not None:
            return self.mqtt.enabled
        return self.mqtt.url is not None or not (self.homeassistant.enabled or self.xiaomi.enabled)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; environment variables win over it.
        return (env_settings, init_settings)


def find_config_file(explicit: Path | None) -> Path | None:
    """The config file to read: --config, $XIAOAI_BRIDGE_CONFIG, ./xiaoai-bridge.toml, or none."""
    if explicit is not None:
        return explicit
    from_env = os.environ.get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    local = Path(CONFIG_FILE_NAME)
    if local.is_file():
        return local
    user = Path.home() / ".config" / "xiaoai-bridge" / "config.toml"
    return user if user.is_file() else None


def load_settings(path: Path | None = None) -> Settings:
    """Read and validate the configuration; raise ConfigError naming each bad key."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path} is not valid TOML: {err}") from err
    _apply_openai_fallbacks(data)
    try:
        settings = Settings(**data)
    except ValidationError as err:
        raise ConfigError(_describe(err, path)) from None
    if path is not None and path.stat().st_mode & 0o077 and _holds_secrets(data):
        _LOGGER.warning("%s holds secrets and is readable by other users: chmod 600 %s", path, path)
    return settings


def _holds_secrets(data: dict[str, Any]) -> bool:
    """True when the file itself sets a key, token or password (env vars do not count)."""
    secret_keys = {"api_key", "token", "password", "pass_token", "headers", "env"}
    for value in data.values():
        tables = value if isinstance(value, list) else [value]  # [[tools.mcp]] is a list
        for table in tables:
            if isinstance(table, dict) and (
                secret_keys & {k for k, v in table.items() if v} or _holds_secrets(table)
            ):
                return True
    url = data.get("mqtt", {}).get("url") if isinstance(data.get("mqtt"), dict) else None
    return bool(url and urlsplit(str(url)).password)


def _apply_openai_fallbacks(data: dict[str, Any]) -> None:
    # OPENAI_* only fill what neither the file nor XIAOAI_BRIDGE_LLM__* set, so a global
    # OpenAI key is never sent to the other provider a config file names.
    llm = data.setdefault("llm", {})
    if not isinstance(llm, dict):
        return
    for key, env in (("api_key", "OPENAI_API_KEY"), ("base_url", "OPENAI_BASE_URL")):
        ours = f"{ENV_PREFIX}LLM__{key.upper()}"
        if not llm.get(key) and not os.environ.get(ours) and os.environ.get(env):
            llm[key] = os.environ[env]
        elif llm.get(key) == "":
            del llm[key]


def _describe(err: ValidationError, path: Path | None) -> str:
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for problem in err.errors():
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and section)"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        if not problem["loc"]:  # a check across keys: its message names them
            lines.append(f"  {message}")
            continue
        key = ".".join(str(part) for part in problem["loc"])
        env = ENV_PREFIX + "__".join(str(part).upper() for part in problem["loc"])
        lines.append(f"  {key}: {message} (set it in the file or with ${env})")
    return "\n".join(lines)

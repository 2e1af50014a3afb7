"""One utterance in, spoken chunks out: trigger, commands, memory, streaming LLM, cleanup."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from xiaoai_bridge.errors import BridgeError, LLMError
from xiaoai_bridge.llm.base import ChatBackend, ChatMessage
from xiaoai_bridge.models import Answer, Outcome, SpeakerId, SpeechChunk, Utterance
from xiaoai_bridge.pipeline.chunker import DEFAULT_FIRST_CLAUSE_CHARS, SentenceChunker
from xiaoai_bridge.pipeline.controls import Controls
from xiaoai_bridge.pipeline.memory import ConversationMemory
from xiaoai_bridge.pipeline.ports import Sink
from xiaoai_bridge.pipeline.speech import SpeechCleaner
from xiaoai_bridge.pipeline.trigger import Trigger
from xiaoai_bridge.spoken import join_spoken

_LOGGER = logging.getLogger(__name__)

# What the speaker says when something goes wrong: short, fixed, never the raw error.
APOLOGIES: Mapping[str, str] = {
    "not_configured": "还没有配置大模型的密钥，请在 xiaoai-bridge 的配置里设置 API key。",
    "timeout": "抱歉，大模型响应超时了，请稍后再问一次。",
    "connection": "抱歉，暂时连不上大模型，请稍后再试。",
    "rate_limited": "抱歉，现在提问的人太多了，请稍后再试。",
    "server_error": "抱歉，大模型服务出错了，请稍后再试。",
    "auth": "抱歉，大模型拒绝了我们的密钥，请检查 API key 的配置。",
    "empty": "抱歉，这次没有得到回答，请换个说法再问一次。",
    "too_long": "抱歉，这个问题太长了，请说得简短一些。",
    "bad_input": "抱歉，我没能读懂这条消息。",
    "busy": "抱歉，现在要回答的问题太多了，请稍后再问。",
}
GENERIC_APOLOGY = "抱歉，出了点问题，请稍后再试。"
INTERRUPTED_APOLOGY = "抱歉，回答被打断了。"
FORGET_REPLY = "好的，之前的对话我已经忘掉了。"
CONTINUOUS_ON_REPLY = "好的，我们开始持续对话，不用再说唤醒词了。"
CONTINUOUS_OFF_REPLY = "好的，持续对话结束了。"
WAKE_ONLY_REPLY = "我在，请问有什么可以帮你？"


def apology_for(reason: str) -> str:
    """The spoken phrase for a failure reason."""
    return APOLOGIES.get(reason, GENERIC_APOLOGY)


def join_sentences(parts: Iterable[str]) -> str:
    """Join spoken chunks back into one text: no space after CJK, one after Western text."""
    return functools.reduce(join_spoken, parts, "")


def _command_set(phrases: Iterable[str]) -> frozenset[str]:
    return frozenset(_normalize_command(p) for p in phrases) - {""}


def _normalize_command(text: str) -> str:
    # Speech recognition adds punctuation and spaces at will; compare letters only.
    return "".join(c for c in text if unicodedata.category(c)[0] in "LN").lower()


@dataclass
class PipelineSettings:
    """The knobs of the pipeline, resolved from config by the app."""

    system_prompt: str
    forget_commands: Iterable[str] = ()
    min_chunk_chars: int = 4
    max_chunk_chars: int = 120
    first_clause_chars: int = DEFAULT_FIRST_CLAUSE_CHARS
    max_concurrent_llm: int = 64
    answer_timeout_s: float = 120.0
    # By source name, or "source/device" for one speaker; else the default trigger.
    triggers: Mapping[str, Trigger] = field(default_factory=dict)
    continuous_start_commands: Iterable[str] = ()
    continuous_stop_commands: Iterable[str] = ()
    continuous_idle_s: float = 30.0


class Pipeline:
    """Answers utterances by driving a sink through begin, chunks and end."""

    def __init__(
        self,
        *,
        backend: ChatBackend,
        memory: ConversationMemory,
        settings: PipelineSettings,
        default_trigger: Trigger,
        clock: Callable[[], float] = time.monotonic,
        controls: Controls | None = None,
    ) -> None:
        self._backend = backend
        self._memory = memory
        self._settings = settings
        self._default_trigger = default_trigger
        self._forget = _command_set(settings.forget_commands)
        self._continuous_start = _command_set(settings.continuous_start_commands)
        self._continuous_stop = _command_set(settings.continuous_stop_commands)
        # Speaker -> clock time when its continuous conversation lapses.
        self._continuous: dict[SpeakerId, float] = {}
        # Answering on/off and "forget", shared with the status page and Home Assistant.
        self.controls = controls or Controls(memory)
        self._llm_slots = asyncio.Semaphore(settings.max_concurrent_llm)
        self._clock = clock

    async def handle(self, utterance: Utterance, sink: Sink) -> Answer:
        """Answer one utterance through `sink`; never raises for an expected failure."""
        run = _Run(utterance, sink, self._clock)
        if utterance.rejected:
            _LOGGER.warning(
                "rejected %s message from %s: %s",
                utterance.source,
                utterance.device,
                utterance.rejected,
            )
            await run.say(apology_for(utterance.rejected), final=True)
            return await run.end(Outcome.FAILED, reason=utterance.rejected)
        if not self.controls.answering:
            return await run.end(Outcome.IGNORED, reason="disabled")
        device = utterance.device
        triggers = self._settings.triggers
        trigger = triggers.get(f"{utterance.source}/{device}") or triggers.get(
            utterance.source, self._default_trigger
        )
        command = _normalize_command(trigger.apply(utterance.text, require_keyword=False) or "")
        if command in self._continuous_start or command in self._continuous_stop:
            return await self._switch_continuous(run, on=command in self._continuous_start)
        speaker = utterance.speaker
        continuous = self.continuous(speaker)
        question = trigger.apply(utterance.text, require_keyword=not continuous)
        if question is None:
            _LOGGER.debug("not triggered, left to XiaoAi: %r", utterance.text)
            return await run.end(Outcome.IGNORED, reason="not_triggered")
        if continuous:
            self._continuous[speaker] = self._clock() + self._settings.continuous_idle_s
        run.keep_listening = continuous
        await run.begin()
        if not question:
            await run.say(WAKE_ONLY_REPLY, final=True)
            return await run.end(Outcome.COMMAND, reason="wake_only")
        if _normalize_command(question) in self._forget:
            await self.controls.forget(speaker, by="voice")
            await run.say(FORGET_REPLY, final=True)
            return await run.end(Outcome.COMMAND, reason="forget")
        return await self._ask(run, question)

    @property
    def memory(self) -> ConversationMemory:
        """The conversation memory (forgetting goes through `controls`)."""
        return self._memory

    def continuous(self, speaker: SpeakerId) -> bool:
        """True while `speaker` is in a continuous conversation (no keyword needed)."""
        deadline = self._continuous.get(speaker)
        if deadline is None:
            return False
        if deadline <= self._clock():
            del self._continuous[speaker]
            _LOGGER.info("continuous conversation with %s ended after being idle", speaker)
            return False
        return True

    async def _switch_continuous(self, run: _Run, *, on: bool) -> Answer:
        speaker = run.utterance.speaker
        if on:
            self._continuous[speaker] = self._clock() + self._settings.continuous_idle_s
        else:
            self._continuous.pop(speaker, None)
        _LOGGER.info("continuous conversation with %s %s", speaker, "on" if on else "off")
        run.keep_listening = on
        await run.begin()
        await run.say(CONTINUOUS_ON_REPLY if on else CONTINUOUS_OFF_REPLY, final=True)
        return await run.end(Outcome.COMMAND, reason="continuous_on" if on else "continuous_off")

    async def _ask(self, run: _Run, question: str) -> Answer:
        device = run.utterance.device
        messages = [
            ChatMessage("system", self._settings.system_prompt),
            *await self._memory.history(run.utterance.speaker),
            ChatMessage("user", question),
        ]
        chunker = SentenceChunker(
            min_chars=self._settings.min_chunk_chars,
            max_chars=self._settings.max_chunk_chars,
            first_clause_chars=self._settings.first_clause_chars,
        )
        cleaner = SpeechCleaner()
        try:
            async with self._llm_slots, asyncio.timeout(self._settings.answer_timeout_s):
                async for delta in self._backend.stream(messages):
                    for sentence in chunker.feed(delta):
                        await run.say(cleaner.clean(sentence), final=False)
            await run.say(cleaner.clean(chunker.flush()), final=True)
        except (LLMError, TimeoutError) as err:
            reason = err.reason if isinstance(err, LLMError) else "timeout"
            detail = err.detail if isinstance(err, LLMError) else "answer deadline passed"
            _LOGGER.warning("LLM failed for %s (%s): %s", device, reason, detail)
            if reason == "not_configured":
                _LOGGER.warning(
                    "set an API key: [llm] api_key in the config file, or the "
                    "OPENAI_API_KEY / XIAOAI_BRIDGE_LLM__API_KEY environment "
                    "variable (and [llm] base_url for other providers)"
                )
            phrase = apology_for(reason) if run.seq == 0 else INTERRUPTED_APOLOGY
            await run.say(phrase, final=True)
            return await run.end(Outcome.FAILED, reason=reason)
        if not run.spoken:
            _LOGGER.warning("LLM answer for %s had nothing speakable", device)
            await run.say(apology_for("empty"), final=True)
            return await run.end(Outcome.FAILED, reason="empty")
        await self._memory.remember(run.utterance.speaker, question, run.text)
        return await run.end(Outcome.ANSWERED)


class _Run:
    """The state of one answer while it is being spoken."""

    def __init__(self, utterance: Utterance, sink: Sink, clock: Callable[[], float]) -> None:
        self.utterance = utterance
        self.sink = sink
        self.seq = 0
        self.spoken: list[str] = []
        self.keep_listening = False
        self._clock = clock
        self._started = clock()
        self._first_chunk: float | None = None

    @property
    def text(self) -> str:
        return join_sentences(self.spoken)

    async def begin(self) -> None:
        await self._guard(self.sink.begin(self.utterance))

    async def say(self, text: str, *, final: bool) -> None:
        # An empty non-final chunk says nothing; an empty final one still closes the stream.
        if not text and not final:
            return
        if self._first_chunk is None and text:
            self._first_chunk = self._clock() - self._started
        if text:
            self.spoken.append(text)
        chunk = SpeechChunk(self.utterance.id, self.utterance.device, self.seq, text, final)
        self.seq += 1
        await self._guard(self.sink.chunk(self.utterance, chunk))

    async def end(self, outcome: Outcome, *, reason: str = "") -> Answer:
        answer = Answer(
            self.utterance,
            outcome,
            self.text,
            reason,
            self._first_chunk,
            self._clock() - self._started,
            keep_listening=self.keep_listening,
        )
        await self._guard(self.sink.end(answer))
        return answer

    async def _guard(self, call: Awaitable[None]) -> None:
        # A sink failure is that sink's problem; the answer goes on for the others' sake.
        try:
            await call
        except BridgeError as err:
            _LOGGER.warning("sink %s failed: %s", self.sink.name, err)

"""One utterance in, spoken chunks out: trigger, commands, memory, streaming LLM, cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from xiaoai_bridge.errors import BridgeError, LLMError
from xiaoai_bridge.llm.base import AssistantToolCalls, ChatMessage, Message, ToolChatBackend
from xiaoai_bridge.models import (
    Answer,
    Outcome,
    SpeakerId,
    SpeechChunk,
    ToolCallRecord,
    Utterance,
)
from xiaoai_bridge.pipeline.chunker import DEFAULT_FIRST_CLAUSE_CHARS, SentenceChunker
from xiaoai_bridge.pipeline.controls import Controls
from xiaoai_bridge.pipeline.memory import ConversationMemory
from xiaoai_bridge.pipeline.ports import Sink
from xiaoai_bridge.pipeline.speech import SpeechCleaner
from xiaoai_bridge.pipeline.tool_loop import (
    CANCELLED_REPLY,
    CONFIRMED_FAILED_REPLY,
    DISPLAY_CHARS,
    Confirmations,
    ToolLoopSettings,
    attempt,
    run_round,
    shorten,
)
from xiaoai_bridge.pipeline.tool_ports import NeedsConfirmation, ToolContext
from xiaoai_bridge.pipeline.toolbox import OfferedTool, Toolbox
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
TOOL_LIMIT_APOLOGY = "抱歉，这件事我没能办完，请换个说法再试一次。"


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
    # None: the model is offered no tools.
    tools: ToolLoopSettings | None = None


class Pipeline:
    """Answers utterances by driving a sink through begin, chunks and end."""

    def __init__(
        self,
        *,
        backend: ToolChatBackend,
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
        # Tool sources are added by the app once the modes they need are up.
        self.tools = Toolbox()
        self._tool_settings = settings.tools
        # The loop's knobs; with tools off, only a confirmation held from before could use them.
        self._loop = settings.tools or ToolLoopSettings()
        self._confirmations = Confirmations(self._loop.confirm_window_s, clock)
        self._confirm_words = _command_set(self._loop.confirm_words)
        self._cancel_words = _command_set(self._loop.cancel_words)
        # Cleared, for good, by a provider that refuses `tools`.
        self._tools_supported = True

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
        if self._confirmations.waiting(utterance.speaker):
            if command in self._confirm_words or command in self._cancel_words:
                return await self._confirm(run, yes=command in self._confirm_words)
            # Anything else moves on: the action waits no longer.
            self._confirmations.take(utterance.speaker)
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

    def set_continuous(self, speaker: SpeakerId, *, on: bool) -> None:
        """Start or stop a continuous conversation with `speaker` (the built-in tools' way)."""
        if on:
            self._continuous[speaker] = self._clock() + self._settings.continuous_idle_s
        else:
            self._continuous.pop(speaker, None)
        _LOGGER.info("continuous conversation with %s %s", speaker, "on" if on else "off")

    async def _switch_continuous(self, run: _Run, *, on: bool) -> Answer:
        self.set_continuous(run.utterance.speaker, on=on)
        run.keep_listening = on
        await run.begin()
        await run.say(CONTINUOUS_ON_REPLY if on else CONTINUOUS_OFF_REPLY, final=True)
        return await run.end(Outcome.COMMAND, reason="continuous_on" if on else "continuous_off")

    async def _confirm(self, run: _Run, *, yes: bool) -> Answer:
        """The speaker answered a confirmation question: run the held action, or drop it."""
        speaker = run.utterance.speaker
        pending = self._confirmations.take(speaker)
        await run.begin()
        if pending is None or not yes:
            await run.say(CANCELLED_REPLY, final=True)
            return await run.end(Outcome.COMMAND, reason="cancelled")
        started = self._clock()
        tried = await attempt(
            pending.confirmation.action(),
            timeout_s=self._loop.call_timeout_s,
            name=pending.name,
            source=pending.source,
        )
        outcome, spoken = tried.outcome, tried.value or CONFIRMED_FAILED_REPLY
        if tried.outcome == "error":
            _LOGGER.warning(
                "confirmed %s of %s failed: %s", pending.name, pending.source, tried.error
            )
        run.tool_calls.append(
            ToolCallRecord(
                name=pending.name,
                source=pending.source,
                arguments="(confirmed)",
                outcome=outcome,
                result=shorten(spoken, DISPLAY_CHARS),
                seconds=self._clock() - started,
            )
        )
        await run.say(spoken, final=True)
        await self._memory.remember(speaker, run.utterance.text, run.answer_text)
        if outcome != "ok":
            return await run.end(Outcome.FAILED, reason=f"tool_{outcome}")
        return await run.end(Outcome.ANSWERED)

    def _offered_tools(self, utterance: Utterance) -> dict[str, OfferedTool]:
        if self._tool_settings is None or not self._tools_supported:
            return {}
        return self.tools.offered(ToolContext(utterance))

    async def _ask(self, run: _Run, question: str) -> Answer:
        device = run.utterance.device
        messages: list[Message] = [
            ChatMessage("system", self._settings.system_prompt),
            *await self._memory.history(run.utterance.speaker),
            ChatMessage("user", question),
        ]
        speech = _Speech(
            run,
            SentenceChunker(
                min_chars=self._settings.min_chunk_chars,
                max_chars=self._settings.max_chunk_chars,
                first_clause_chars=self._settings.first_clause_chars,
            ),
        )
        offered = self._offered_tools(run.utterance)
        try:
            async with self._llm_slots, asyncio.timeout(self._settings.answer_timeout_s):
                if offered:
                    ended = await self._ask_with_tools(run, speech, messages, offered)
                    if ended is not None:
                        return ended
                else:
                    await self._stream_text(speech, messages)
            await speech.finish()
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
            phrase = apology_for(reason) if not run.answered else INTERRUPTED_APOLOGY
            await run.say(phrase, final=True)
            return await run.end(Outcome.FAILED, reason=reason)
        if not run.answered:
            _LOGGER.warning("LLM answer for %s had nothing speakable", device)
            await run.say(apology_for("empty"), final=True)
            return await run.end(Outcome.FAILED, reason="empty")
        await self._memory.remember(run.utterance.speaker, question, run.answer_text)
        # A tool may have started or stopped a continuous conversation while answering.
        run.keep_listening = self.continuous(run.utterance.speaker)
        return await run.end(Outcome.ANSWERED)

    async def _stream_text(self, speech: _Speech, messages: Sequence[Message]) -> None:
        # Without tools only text messages are sent: a tool round is never left half-told.
        texts = [m for m in messages if isinstance(m, ChatMessage)]
        async for delta in self._backend.stream(texts):
            await speech.feed(delta)

    async def _ask_with_tools(
        self,
        run: _Run,
        speech: _Speech,
        messages: list[Message],
        offered: Mapping[str, OfferedTool],
    ) -> Answer | None:
        """Rounds of model and tools until the model answers in words; an Answer if it ended."""
        settings = self._loop
        specs = [entry.tool.spec for entry in offered.values()]
        context = ToolContext(run.utterance)
        conversation = list(messages)
        filler = _Filler(run, settings.filler, settings.filler_after_s, self._clock)
        try:
            for round_number in itertools.count(1):
                calls = None
                text_before = len(speech.heard)
                try:
                    async for event in self._backend.stream(conversation, tools=specs):
                        if isinstance(event, str):
                            await filler.stop()
                            await speech.feed(event)
                        else:
                            calls = event.calls
                except LLMError as err:
                    if err.reason != "tools_unsupported":
                        raise
                    self._tools_refused(err)
                    await filler.stop()
                    await self._stream_text(speech, messages)
                    return None
                if not calls:
                    await filler.stop()
                    return None
                await speech.flush()  # words the model said before its calls go out now
                if round_number > settings.max_rounds:
                    await filler.stop()
                    _LOGGER.warning(
                        "the model still asked for tools after %d rounds for %s: gave up",
                        settings.max_rounds,
                        run.utterance.device,
                    )
                    await run.say(TOOL_LIMIT_APOLOGY, final=True)
                    return await run.end(Outcome.FAILED, reason="tool_rounds")
                filler.arm()
                round_ = await run_round(
                    calls, offered, context, timeout_s=settings.call_timeout_s, clock=self._clock
                )
                run.tool_calls.extend(round_.records)
                if round_.confirmation is not None and round_.confirming is not None:
                    await filler.stop()
                    return await self._ask_to_confirm(
                        run, round_.confirmation, round_.confirming, messages
                    )
                said = "".join(speech.heard[text_before:]) or None
                conversation.append(AssistantToolCalls(calls, content=said))
                conversation.extend(round_.results)
        finally:
            await filler.stop()
        return None  # not reached: the loop returns

    async def _ask_to_confirm(
        self,
        run: _Run,
        confirmation: NeedsConfirmation,
        record: ToolCallRecord,
        messages: Sequence[Message],
    ) -> Answer:
        speaker = run.utterance.speaker
        self._confirmations.ask(speaker, confirmation, name=record.name, source=record.source)
        # The answer ("确定") must be heard without the wake keyword.
        run.keep_listening = True
        await run.say(confirmation.prompt, final=True)
        question = messages[-1]
        if isinstance(question, ChatMessage):
            await self._memory.remember(speaker, question.content, confirmation.prompt)
        return await run.end(Outcome.ANSWERED, reason="confirm")

    def _tools_refused(self, err: LLMError) -> None:
        self._tools_supported = False
        _LOGGER.warning(
            "the LLM refused tools (%s): asking without tools from now on; set [tools] "
            "enabled = false to skip the try, or use a model with function calling",
            err.detail,
        )


class _Speech:
    """An answer's text on its way to the speaker: cut into sentences, cleaned, said."""

    def __init__(self, run: _Run, chunker: SentenceChunker) -> None:
        self._run = run
        self._chunker = chunker
        self._cleaner = SpeechCleaner()
        # Every delta the model streamed, for the assistant turn of a tool round.
        self.heard: list[str] = []

    async def feed(self, delta: str) -> None:
        self.heard.append(delta)
        for sentence in self._chunker.feed(delta):
            await self._run.say(self._cleaner.clean(sentence), final=False)

    async def flush(self) -> None:
        """Say what is held back, without ending the answer."""
        await self._run.say(self._cleaner.clean(self._chunker.flush()), final=False)

    async def finish(self) -> None:
        """Say what is held back and end the answer."""
        await self._run.say(self._cleaner.clean(self._chunker.flush()), final=True)


class _Filler:
    """Says a short filler once when tools keep the speaker silent too long."""

    def __init__(self, run: _Run, text: str, after_s: float, clock: Callable[[], float]) -> None:
        self._run = run
        self._text = text
        self._after_s = after_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._saying = False
        self._said = not text

    def arm(self) -> None:
        """Start waiting, unless a filler was said already or is pending."""
        if self._said or self._task is not None:
            return
        silent_since = self._run.last_spoken_at or self._run.started
        delay = max(0.0, silent_since + self._after_s - self._clock())
        self._task = asyncio.create_task(self._say_after(delay), name="pipeline:filler")

    async def _say_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._saying = self._said = True
        await self._run.say(self._text, final=False, remember=False)

    async def stop(self) -> None:
        """Not needed any more: cancel the wait, or let a filler being said finish first."""
        task, self._task = self._task, None
        if task is None:
            return
        if not self._saying:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _Run:
    """The state of one answer while it is being spoken."""

    def __init__(self, utterance: Utterance, sink: Sink, clock: Callable[[], float]) -> None:
        self.utterance = utterance
        self.sink = sink
        self.seq = 0
        # What the model answered, for memory: the spoken text without fillers.
        self.answer: list[str] = []
        self.keep_listening = False
        self.tool_calls: list[ToolCallRecord] = []
        self._clock = clock
        self.started = clock()
        self.last_spoken_at: float | None = None
        self._first_chunk: float | None = None
        # A filler is said from its own task: chunks must still reach the sink one at a time.
        self._saying = asyncio.Lock()

    @property
    def answer_text(self) -> str:
        return join_sentences(self.answer)

    @property
    def answered(self) -> bool:
        """True once some of the model's answer (not only a filler) was spoken."""
        return bool(self.answer)

    async def begin(self) -> None:
        await self._guard(self.sink.begin(self.utterance))

    async def say(self, text: str, *, final: bool, remember: bool = True) -> None:
        # An empty non-final chunk says nothing; an empty final one still closes the stream.
        if not text and not final:
            return
        async with self._saying:
            now = self._clock()
            if self._first_chunk is None and text:
                self._first_chunk = now - self.started
            if text:
                self.last_spoken_at = now
                if remember:
                    self.answer.append(text)
            chunk = SpeechChunk(self.utterance.id, self.utterance.device, self.seq, text, final)
            self.seq += 1
            await self._guard(self.sink.chunk(self.utterance, chunk))

    async def end(self, outcome: Outcome, *, reason: str = "") -> Answer:
        answer = Answer(
            self.utterance,
            outcome,
            # The whole reply (MQTT's /xiaomi/reply, the page) leaves the filler out: said while
            # waiting, it is no part of the answer.
            self.answer_text,
            reason,
            self._first_chunk,
            self._clock() - self.started,
            keep_listening=self.keep_listening,
            tool_calls=tuple(self.tool_calls),
        )
        await self._guard(self.sink.end(answer))
        return answer

    async def _guard(self, call: Awaitable[None]) -> None:
        # A sink failure is that sink's problem; the answer goes on for the others' sake.
        try:
            await call
        except BridgeError as err:
            _LOGGER.warning("sink %s failed: %s", self.sink.name, err)

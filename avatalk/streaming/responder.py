"""The responder stage: a committed turn in, reply audio into the clock.

user text -> dialogue memory -> LLM stream -> sentence splitter -> TTS
(``tts`` executor for resampling) -> the clock's bounded audio queue.

One reply at a time. The responder owns cancelling it and what "spoken so
far" means: every sentence's audio is a ``QueuedAudio`` whose ``released``
count the clock advances tick by tick, so an interrupted reply keeps exactly
the words the user heard, in the events and in the history.

A reply may be *prepared* before the user's turn is over (``prepare``, from
the transcript of the first pause): LLM and TTS run, but nothing reaches the
client, the history or the clock until ``commit``; ``discard`` drops it
without a trace. Committed, its first audio goes out on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from avatalk.config import LLMSettings, PersonaSettings, TTSSettings
from avatalk.executors import run_in
from avatalk.llm import LLM, LLMError
from avatalk.llm.base import ChatMessage
from avatalk.llm.memory import DialogueMemory
from avatalk.llm.sentences import SentenceSplitter
from avatalk.media.audio import resample
from avatalk.media.timebase import ENGINE_SAMPLE_RATE
from avatalk.streaming.clock import MediaClock, QueuedAudio
from avatalk.streaming.events import (
    ErrorEvent,
    InterruptReason,
    ResponseCreated,
    ResponseDone,
    ResponseInterrupted,
    ResponseTextDelta,
    ResponseTextDone,
    ServerEvent,
    State,
)
from avatalk.streaming.stage import ConversationState, Emit, cancel_and_wait
from avatalk.tts import TTS, TTSError

logger = logging.getLogger(__name__)

FIRST_AUDIO_HOLD_S = 0.5  # longest the LLM waits for the first sentence's audio (it keeps the model meanwhile)


@dataclass(frozen=True, slots=True)
class ReplyRequest:
    """What to answer: the user's words (``text``), or a fixed reply to speak as is (greeting, fallback)."""

    turn_id: int
    started_at: float  # t0 of the latency marks: end of user speech, or text receipt
    text: str | None = None
    fixed_reply: str | None = None
    marks: dict[str, float] = field(default_factory=dict)  # marks made before the reply (asr_final)


@dataclass(eq=False)
class Reply:
    """Book-keeping of one assistant reply."""

    turn_id: int
    started_at: float
    marks: dict[str, float] = field(default_factory=dict)
    sentences: list[tuple[str, QueuedAudio]] = field(default_factory=list)
    generated_text: str = ""
    first_audio_ready: asyncio.Event = field(default_factory=asyncio.Event)
    heard: str | None = None  # the user's words it answers
    preemptive: bool = False  # prepared before the end of the turn
    committed: asyncio.Event = field(default_factory=asyncio.Event)  # its events, history and audio may go out
    held: list[ServerEvent | State] = field(default_factory=list)  # what it said before being committed

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def marks_ms(self) -> dict[str, float]:
        """Milliseconds after ``started_at``; a prepared reply's stages done before it count as 0."""
        return {name: max(0.0, round((at - self.started_at) * 1000.0, 1)) for name, at in self.marks.items()}

    def spoken_text(self) -> str:
        """The reply text whose audio reached the client (a partly played sentence is cut by words)."""
        parts: list[str] = []
        for text, audio in self.sentences:
            total, played = len(audio.samples), audio.released
            if played >= total:
                parts.append(text)
                continue
            keep = int(len(text.split()) * played / total) if total else 0
            if keep:
                parts.append(" ".join(text.split()[:keep]))
            break
        return " ".join(parts).strip()


class Responder:
    """Answers one turn at a time and feeds the reply audio to the clock."""

    def __init__(
        self,
        *,
        llm: LLM,
        tts: TTS,
        memory: DialogueMemory,
        clock: MediaClock,
        emit: Emit,
        state: ConversationState,
        llm_settings: LLMSettings,
        tts_settings: TTSSettings,
        persona: PersonaSettings,
        tts_executor: Executor,
        with_render_audio: bool,
        new_turn_id: Callable[[], int],
        queue_size: int,
        name: str = "responder",
    ) -> None:
        self._llm = llm
        self._tts = tts
        self.memory = memory
        self._clock = clock
        self._emit = emit
        self._state = state
        self._llm_settings = llm_settings
        self._tts_settings = tts_settings
        self.persona = persona
        self._tts_executor = tts_executor
        self._with_render_audio = with_render_audio
        self._new_turn_id = new_turn_id
        self._queue_size = queue_size
        self._name = name
        self.current: Reply | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending_user_text: str | None = None  # a prepared reply's user text, recorded on commit
        self._prefill: asyncio.Task[None] | None = None

    @property
    def active(self) -> bool:
        """A reply the client knows of is being generated or played (a prepared one does not count)."""
        return self.current is not None and self.current.committed.is_set()

    @property
    def prepared(self) -> Reply | None:
        """The reply prepared ahead of the end of the turn, not yet committed."""
        reply = self.current
        return reply if reply is not None and not reply.committed.is_set() else None

    def prefill(self, heard_so_far: str) -> None:
        """The user is still speaking: have the LLM cache the prompt their reply will have so far.

        The reply's own request then only prefills the words heard since
        (see ``LLM.prefill``). Never while a reply exists (it holds the
        session's LLM slot), at most one at a time; a reply that begins
        cancels it.
        """
        if self.current is None:
            self._start_prefill(self.memory.preview_user(heard_so_far))

    def _start_prefill(self, messages: list[ChatMessage]) -> None:
        """Prefill ``messages`` in the background (``llm.prefill_ahead``), unless one is running."""
        if self._llm_settings.prefill_ahead and (self._prefill is None or self._prefill.done()):
            self._prefill = asyncio.create_task(self._run_prefill(messages), name=f"{self._name}:prefill")

    async def _run_prefill(self, messages: list[ChatMessage]) -> None:
        try:
            await self._llm.prefill(messages, session_key=self._name)
        except Exception as error:  # only a missed head start: the reply prefills it all
            logger.debug("prefill ahead of a reply failed: %s", error)

    def start(self, request: ReplyRequest) -> Reply:
        """Begin answering ``request`` (the caller has interrupted any reply in progress)."""
        return self._begin(request, committed=True)

    def prepare(self, request: ReplyRequest) -> Reply:
        """Begin answering ``request`` in the background, invisible until ``commit``."""
        return self._begin(request, committed=False)

    async def commit(self, started_at: float, marks: dict[str, float]) -> Reply:
        """The turn ended as the prepared reply assumed: let it out (its audio from the next tick on)."""
        reply = self.prepared
        assert reply is not None, "no prepared reply to commit"
        reply.started_at = started_at
        reply.marks.update(marks)
        if self._pending_user_text is not None:
            self.memory.add_user(self._pending_user_text)
            self._pending_user_text = None
        reply.committed.set()
        for held in reply.held:
            if isinstance(held, str):
                await self._state.set(held)  # type: ignore[arg-type]
            else:
                await self._emit(held)
        reply.held.clear()
        logger.info("turn %d: prepared reply committed", reply.turn_id)
        return reply

    async def discard(self) -> None:
        """Drop the prepared reply, if any: nothing of it ever reached the client or the history."""
        reply = self.prepared
        if reply is None:
            return
        self.current = None
        self._pending_user_text = None
        if self._task is not None:
            await cancel_and_wait(self._task)
        logger.debug("turn %d: prepared reply discarded", reply.turn_id)

    def _begin(self, request: ReplyRequest, committed: bool) -> Reply:
        if self._prefill is not None:
            self._prefill.cancel()  # the reply's own request must not queue behind it for the slot
        reply = Reply(
            request.turn_id, request.started_at, dict(request.marks), heard=request.text, preemptive=not committed
        )
        if committed:
            reply.committed.set()
        self.current = reply
        self._task = asyncio.create_task(self._run(reply, request), name=f"{self._name}:reply-{request.turn_id}")
        return reply

    async def _say(self, reply: Reply, what: ServerEvent | State) -> None:
        """An event or state change of ``reply``: sent now, or held until it is committed."""
        if not reply.committed.is_set():
            reply.held.append(what)
        elif isinstance(what, str):
            await self._state.set(what)  # type: ignore[arg-type]
        else:
            await self._emit(what)

    async def interrupt(self, reason: InterruptReason) -> Reply | None:
        """Stop the current reply; the history keeps what was heard. None when there was none.

        A prepared reply is not the client's to interrupt: it is discarded silently.
        """
        if self.prepared is not None:
            await self.discard()
            return None
        reply, task = self.current, self._task
        if reply is None:
            return None
        self.current = None
        if task is not None:
            await cancel_and_wait(task)
        spoken = reply.spoken_text()
        if spoken:
            self.memory.add_assistant(spoken)
        self._start_prefill(self.memory.preview_next_turn())
        await self._emit(ResponseInterrupted(turn_id=reply.turn_id, reason=reason, spoken_text=spoken))
        if reason != "new_input":
            await self._state.set("listening")
        await self._emit(ResponseDone(turn_id=reply.turn_id, status="interrupted", text=spoken))
        logger.info("turn %d interrupted (%s); kept %r", reply.turn_id, reason, spoken)
        return reply

    async def set_aside(self, request: ReplyRequest) -> None:
        """The user went on speaking before this turn could be answered: no reply of its own.

        Their words stay in the history, so they join the next question (the
        memory merges consecutive user messages), and the turn ends as an
        interrupted one, as it would had its reply started and been barged in on.
        """
        if request.text:
            self.memory.add_user(request.text)
        await self._emit(ResponseInterrupted(turn_id=request.turn_id, reason="barge_in", spoken_text=""))
        await self._emit(ResponseDone(turn_id=request.turn_id, status="interrupted", text=""))

    async def close(self) -> None:
        for task in (self._task, self._prefill):
            if task is not None:
                await cancel_and_wait(task)
        self.current = None
        self._pending_user_text = None

    async def _run(self, reply: Reply, request: ReplyRequest) -> None:
        try:
            await self._respond(reply, request)
        except Exception as error:  # one turn's failure never ends the session
            if not reply.committed.is_set():
                # Nobody knows of a prepared reply: drop it; the turn is answered afresh when it ends.
                logger.info("turn %d: prepared reply failed (%s); dropped", reply.turn_id, error)
                if self.current is reply:
                    self.current = None
                    self._pending_user_text = None
            elif isinstance(error, (LLMError, TTSError)):
                logger.warning("turn %d: %s", reply.turn_id, error)
                await self._finish_failed(reply, "llm_error" if isinstance(error, LLMError) else "tts_error", str(error))
            else:
                logger.exception("turn %d failed", reply.turn_id)
                await self._finish_failed(reply, "internal_error", f"the reply failed: {error}")

    async def _finish_failed(
        self, reply: Reply, code: Literal["llm_error", "tts_error", "internal_error"], message: str
    ) -> None:
        if self.current is reply:
            self.current = None
        spoken = reply.spoken_text()
        if spoken:
            self.memory.add_assistant(spoken)
        await self._emit(ErrorEvent(code=code, message=message, turn_id=reply.turn_id))
        await self._state.set("listening")
        await self._emit(ResponseDone(turn_id=reply.turn_id, status="failed", text=spoken))
        if code == "llm_error" and not spoken and self.persona.fallback.strip() and self.current is None:
            # Say something rather than leave the user in silence; TTS may still work.
            self.start(ReplyRequest(self._new_turn_id(), time.monotonic(), fixed_reply=self.persona.fallback))

    async def _respond(self, reply: Reply, request: ReplyRequest) -> None:
        turn_id = reply.turn_id
        messages = self.memory.messages()
        if request.text is not None:
            if reply.committed.is_set():
                self.memory.add_user(request.text)
                messages = self.memory.messages()
            else:  # recorded on commit; the LLM sees the history as it will be then
                self._pending_user_text = request.text
                messages = self.memory.preview_user(request.text)
            await self._say(reply, "thinking")
        await self._say(reply, ResponseCreated(turn_id=turn_id))
        sentences: asyncio.Queue[str | None] = asyncio.Queue(maxsize=self._queue_size)
        speaker = asyncio.create_task(self._speak(reply, sentences), name=f"{self._name}:tts-{turn_id}")
        writer = asyncio.create_task(
            self._write(reply, sentences, request.fixed_reply, messages), name=f"{self._name}:llm-{turn_id}"
        )
        try:
            # Whichever fails first ends the turn; the other is cancelled.
            await asyncio.wait({writer, speaker}, return_when=asyncio.FIRST_EXCEPTION)
            if writer.done() and writer.exception() is None:
                await self._say(reply, ResponseTextDone(turn_id=turn_id, text=reply.generated_text))
            for task in (writer, speaker):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            await speaker
        finally:
            await cancel_and_wait(writer, speaker)
        # The LLM is done with this reply while its audio plays: cache the next turn's prompt meanwhile.
        self._start_prefill(self.memory.preview_next_turn(" ".join(text for text, _ in reply.sentences)))
        await self._clock.wait_idle()  # let the clock play out what is queued, then close the turn
        if self.current is reply:
            self.current = None
        spoken = reply.spoken_text()
        if request.fixed_reply is not None or spoken:
            self.memory.add_assistant(spoken or reply.generated_text)
        await self._state.set("listening")
        await self._emit(
            ResponseDone(
                turn_id=turn_id,
                status="completed",
                text=spoken,
                latency_ms=reply.marks_ms(),
                preemptive=reply.preemptive or None,
            )
        )

    def _splitter(self, first_chunk: bool) -> SentenceSplitter:
        splitter = SentenceSplitter(
            min_chars=self._tts_settings.min_sentence_chars, max_chars=self._tts_settings.max_sentence_chars
        )
        if first_chunk:
            splitter.max_chars = max(self._tts_settings.first_chunk_chars, splitter.min_chars + 1)
        return splitter

    async def _write(
        self,
        reply: Reply,
        sentences: asyncio.Queue[str | None],
        fixed_reply: str | None,
        messages: list[ChatMessage],
    ) -> None:
        """Produce the reply's sentences (from the LLM, or a fixed text), then the end marker."""
        if fixed_reply is not None:
            reply.generated_text = fixed_reply
            await self._say(reply, ResponseTextDelta(turn_id=reply.turn_id, delta=fixed_reply))
            splitter = self._splitter(first_chunk=False)
            for sentence in splitter.push(fixed_reply) + splitter.flush():
                await sentences.put(sentence)
        else:
            await self._generate(reply, sentences, messages)
        await sentences.put(None)

    async def _generate(self, reply: Reply, sentences: asyncio.Queue[str | None], messages: list[ChatMessage]) -> None:
        splitter = self._splitter(first_chunk=True)
        stream = self._llm.stream(messages, session_key=self._name)  # the session keeps its LLM slot (cached prefix)
        wait_s = self._llm_settings.first_token_timeout_s
        try:
            async with asyncio.timeout(wait_s) as first_token:
                async for delta in stream:
                    if not delta:
                        continue
                    first_token.reschedule(None)
                    reply.mark("llm_first_token")
                    reply.generated_text += delta
                    await self._say(reply, ResponseTextDelta(turn_id=reply.turn_id, delta=delta))
                    for sentence in splitter.push(delta):
                        first = "first_sentence" not in reply.marks
                        reply.mark("first_sentence")
                        splitter.max_chars = self._tts_settings.max_sentence_chars
                        await sentences.put(sentence)
                        if first:
                            # On a small CPU the LLM and the TTS compete: hold generation (the
                            # LLM's bounded queue stops it within a token or two) until the
                            # first sentence is voiced, so the user hears the reply sooner.
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(FIRST_AUDIO_HOLD_S):
                                    await reply.first_audio_ready.wait()
        except TimeoutError as error:
            raise LLMError(f"the LLM gave no answer within {wait_s:.0f} s") from error
        finally:
            await stream.aclose()  # type: ignore[attr-defined]
        for sentence in splitter.flush():
            reply.mark("first_sentence")
            await sentences.put(sentence)

    async def _speak(self, reply: Reply, sentences: asyncio.Queue[str | None]) -> None:
        """TTS each sentence as it arrives and queue its audio on the clock."""
        tts = self._tts
        while (sentence := await sentences.get()) is not None:
            pieces: list[np.ndarray] = []
            started = time.monotonic()
            stream = tts.synthesize(sentence)
            try:
                async with asyncio.timeout(self._tts_settings.timeout_s):
                    async for chunk in stream:
                        reply.mark("tts_first_audio")
                        pieces.append(chunk)
            except TimeoutError as error:
                raise TTSError(
                    f"the TTS took longer than {self._tts_settings.timeout_s:.0f} s for one sentence"
                ) from error
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            if not pieces:
                continue
            speech = np.concatenate(pieces)
            logger.debug(
                "%.1f s of speech for %d chars in %.0f ms",
                len(speech) / tts.sample_rate, len(sentence), (time.monotonic() - started) * 1000,
            )
            samples, render_samples = await run_in(self._tts_executor, self._resample, speech, tts.sample_rate)
            await reply.committed.wait()  # a prepared reply's audio waits here for the end of the turn
            queued = await self._clock.enqueue(reply.turn_id, samples, render_samples)
            reply.sentences.append((sentence, queued))
            reply.first_audio_ready.set()

    def _resample(self, speech: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The sentence at the clock's rate and, with video, at the renderer's 16 kHz."""
        samples = resample(speech, rate, self._clock.sample_rate)
        render_samples = resample(speech, rate, ENGINE_SAMPLE_RATE) if self._with_render_audio else None
        return samples, render_samples

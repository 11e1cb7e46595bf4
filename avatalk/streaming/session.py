"""One conversation: wires VAD, turn-taking, ASR, LLM, TTS and the media clock.

Tasks of a session:
- the input loop: client audio -> 16 kHz -> VAD (worker thread) -> turn detector;
- at most one response task at a time: transcript -> LLM deltas -> sentences ->
  TTS (worker threads) -> the clock's bounded audio queue;
- the clock loop, releasing one 40 ms tick at a time to the output.

Barge-in cancels the response task (which cancels LLM and TTS) and clears the
clock's queue synchronously, so no reply audio leaves after the next tick. The
dialogue history keeps only the reply text whose audio was actually played.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from avatalk.avatars.renderers.base import RENDER_SAMPLE_RATE, RendererSession
from avatalk.avatars.store import AvatarNotFound, AvatarStore, InvalidAvatarId
from avatalk.config import Settings
from avatalk.llm import LLMError
from avatalk.llm.memory import DialogueMemory
from avatalk.llm.sentences import SentenceSplitter
from avatalk.media.audio import StreamResampler, pcm16_to_float, resample
from avatalk.media.timebase import ENGINE_SAMPLE_RATE
from avatalk.observability import task_context
from avatalk.streaming.asr import TurnTranscriber, ends_sentence
from avatalk.streaming.clock import MediaClock, Tick
from avatalk.streaming.models import EngineModels
from avatalk.streaming.protocol import (
    AudioCommit,
    ClientEvent,
    PersonaOptions,
    ProtocolError,
    ResponseCancel,
    SessionOptions,
    SessionUpdate,
    TextInput,
    check_sample_rate,
)
from avatalk.streaming.turns import TurnDetector, TurnEvent, TurnEventKind
from avatalk.tts import TTSError

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_SAMPLE_RATE = 24000
FIRST_AUDIO_HOLD_S = 0.5  # longest the LLM waits for the first sentence's audio (it keeps the model meanwhile)
RENDER_BUDGET_S = 0.060  # a frame later than this (clock lead 40 ms + slack) is replaced by an idle frame


class SessionOutput(Protocol):
    """Where a session's events, audio and video go (WebSocket, WebRTC)."""

    async def send_event(self, kind: str, **fields: object) -> None: ...

    async def send_tick(self, tick: int, audio: np.ndarray | None, frame: np.ndarray | None) -> None:
        """One 40 ms tick: its reply audio (None when silent) and its frame (None without video)."""
        ...


@dataclass
class _Response:
    """Book-keeping of one assistant reply."""

    turn_id: int
    started_at: float  # t0 of the latency marks: end of user speech, or text receipt
    marks: dict[str, float] = field(default_factory=dict)
    segments: dict[int, tuple[str, int]] = field(default_factory=dict)  # segment id -> (text, samples)
    played: dict[int, int] = field(default_factory=dict)  # segment id -> samples played
    generated_text: str = ""
    task: asyncio.Task[None] | None = None
    audio_pending: bool = False  # the user's audio is still being transcribed
    first_audio_ready: asyncio.Event = field(default_factory=asyncio.Event)

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.monotonic())

    def marks_ms(self) -> dict[str, float]:
        return {name: round((at - self.started_at) * 1000.0, 1) for name, at in self.marks.items()}

    def spoken_text(self) -> str:
        """The reply text whose audio reached the client (a partly played sentence is cut by words)."""
        parts: list[str] = []
        for segment_id in sorted(self.segments):
            text, total = self.segments[segment_id]
            played = self.played.get(segment_id, 0)
            if played >= total:
                parts.append(text)
            elif played > 0:
                words = text.split()
                keep = int(len(words) * played / total)
                if keep:
                    parts.append(" ".join(words[:keep]))
                break
            else:
                break
        return " ".join(parts).strip()


class ConversationSession:
    """A spoken conversation with one client."""

    def __init__(
        self,
        session_id: str,
        models: EngineModels,
        settings: Settings,
        output: SessionOutput,
        avatars: AvatarStore | None = None,
    ) -> None:
        self.id = session_id
        self.avatars = avatars
        self.avatar_id: str | None = None
        self.video_size: int | None = None
        self._renderer: RendererSession | None = None
        self._renderer_reset = False
        self._render_job: asyncio.Future[np.ndarray] | None = None
        self.late_frames = 0
        self._late_warned_at = float("-inf")
        self.models = models
        self.settings = settings
        self.output = output
        self.persona = settings.persona.model_copy()
        self.input_sample_rate: int | None = None
        self.output_sample_rate: int | None = None
        self.clock: MediaClock | None = None
        self.memory = DialogueMemory(
            system_prompt=self.persona.system_prompt,
            max_turns=settings.llm.history_turns,
            max_tokens=settings.llm.history_tokens,
            count_tokens=models.llm.count_tokens,
        )
        self._input: asyncio.Queue[bytes] = asyncio.Queue(maxsize=settings.limits.queue_chunks)
        self._resampler: StreamResampler | None = None
        self._vad = models.vad.stream()
        self._turns = TurnDetector(settings.turns, settings.vad)
        self._asr = TurnTranscriber(models.asr)
        self._tasks: set[asyncio.Task[None]] = set()
        self._response: _Response | None = None
        self._next_turn_id = 1
        self._state = "idle"
        self._playback_idle = asyncio.Event()
        self._playback_idle.set()
        self._listening_turn: int | None = None  # turn id of the utterance in progress
        self._started_at = time.monotonic()
        self._last_activity = self._started_at
        self.on_end: Callable[[], Awaitable[None]] | None = None  # the transport hangs up

    # ---- public API used by the transports -------------------------------------------------

    @property
    def configured(self) -> bool:
        return self.input_sample_rate is not None

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "input_sample_rate": self.input_sample_rate,
            "output_sample_rate": self.output_sample_rate,
            "video": self._renderer is not None,
            "avatar": self.avatar_id,
            "video_size": list(self._renderer.output_shape[::-1]) if self._renderer else None,
            "persona": self.persona.model_dump(),
            "turn_detection": self.settings.turns.model_dump(),
        }

    async def configure(self, options: SessionOptions) -> None:
        """Apply a ``session.update``; the first one with sample rates starts the session."""
        first = not self.configured
        if first:
            input_rate = check_sample_rate(options.input_sample_rate, "input_sample_rate")
            output_rate = check_sample_rate(
                options.output_sample_rate or DEFAULT_OUTPUT_SAMPLE_RATE, "output_sample_rate"
            )
            if options.video or options.avatar is not None:
                await self._open_video(options.avatar, options.video_size)
        else:
            for name in ("input_sample_rate", "output_sample_rate", "avatar", "video", "video_size"):
                value = getattr(options, name)
                current = {
                    "video": self._renderer is not None,
                    "avatar": self.avatar_id,
                }.get(name, getattr(self, name, None))
                if value is not None and value != current:
                    raise ProtocolError("invalid_session_config", f"{name} cannot change once the session started")
        if options.persona is not None:
            self._apply_persona(options.persona)
        if first:
            self.input_sample_rate = input_rate
            self.output_sample_rate = output_rate
            self._resampler = StreamResampler(input_rate, ENGINE_SAMPLE_RATE)
            self.clock = MediaClock(output_rate)
            self._spawn(self._input_loop(), "input")
            self._spawn(self._watch_limits(), "limits")
            prepare = self._render_tick if self._renderer is not None else None
            self._spawn(self.clock.run(self._on_tick, prepare), "clock")
        await self.output.send_event("session.updated", session=self.describe())
        if first:
            await self._set_state("listening")
            if options.greeting if options.greeting is not None else True:
                self.greet()

    def greet(self) -> None:
        """Speak the persona's greeting (a no-op when it is empty)."""
        if self.configured and self.persona.greeting.strip():
            self._start_response(text=None, started_at=time.monotonic(), fixed_reply=self.persona.greeting)

    async def handle_event(self, event: ClientEvent) -> None:
        """Act on one decoded client event (any transport); raises ProtocolError."""
        if isinstance(event, SessionUpdate):
            await self.configure(event.session)
        elif isinstance(event, TextInput):
            await self.send_text(event.text)
        elif isinstance(event, ResponseCancel):
            if not await self.interrupt("client_cancel"):
                raise ProtocolError("no_response", "there is no response to cancel")
        elif isinstance(event, AudioCommit):
            await self.commit_audio()

    async def push_audio(self, data: bytes) -> None:
        """Queue one binary frame of client audio (waits when the session is behind)."""
        if not self.configured:
            raise ProtocolError(
                "audio_before_configuration",
                "send session.update with input_sample_rate before any audio; this frame was dropped",
            )
        if len(data) % 2:
            raise ProtocolError("invalid_audio", "audio frames must be PCM16 (an even number of bytes)")
        await self._input.put(data)

    async def send_text(self, text: str) -> None:
        """The user typed instead of speaking."""
        if not self.configured:
            raise ProtocolError("not_configured", "send session.update before conversation.item.create")
        text = text.strip()
        if not text:
            raise ProtocolError("invalid_event", "text must not be empty")
        if len(text) > self.settings.limits.max_text_input_chars:
            raise ProtocolError(
                "text_too_long", f"text is {len(text)} characters; the limit is {self.settings.limits.max_text_input_chars}"
            )
        started = self._last_activity = time.monotonic()
        await self.interrupt("new_input")
        self._start_response(text=text, started_at=started)

    async def commit_audio(self) -> None:
        """End the user's turn now (push-to-talk)."""
        event = self._turns.force_end(time.monotonic())
        if event is not None:
            await self._handle_turn_event(event)

    async def interrupt(self, reason: str = "barge_in") -> bool:
        """Stop the current reply at once; True if there was one."""
        response = self._response
        if response is None:
            return False
        self._response = None
        assert self.clock is not None
        self.clock.clear(response.turn_id)  # silence (and a closed mouth) from the next tick on
        self._renderer_reset = True
        if response.task is not None and not response.task.done():
            response.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await response.task
        spoken = response.spoken_text()
        if spoken:
            self.memory.add_assistant(spoken)
        await self.output.send_event(
            "response.interrupted", turn_id=response.turn_id, reason=reason, spoken_text=spoken
        )
        if reason != "new_input":
            await self._set_state("listening")
        await self.output.send_event("response.done", turn_id=response.turn_id, status="interrupted", text=spoken)
        logger.info("session %s turn %d interrupted (%s); kept %r", self.id, response.turn_id, reason, spoken)
        return True

    async def _watch_limits(self) -> None:
        """End the session when it is too long or idle too long (limits.*)."""
        limits = self.settings.limits
        while True:
            await asyncio.sleep(min(1.0, limits.idle_timeout_s / 4, limits.max_session_s / 4))
            now = time.monotonic()
            if now - self._started_at >= limits.max_session_s:
                await self._end("session_expired", f"the session reached its maximum length of {limits.max_session_s:.0f} s")
                return
            if self._response is None and now - self._last_activity >= limits.idle_timeout_s:
                await self._end("idle_timeout", f"nobody spoke for {limits.idle_timeout_s:.0f} s; the session was closed")
                return

    async def _end(self, code: str, message: str) -> None:
        logger.info("session %s ending: %s", self.id, code)
        await self.output.send_event("error", code=code, message=message, fatal=True)
        if self.on_end is not None:
            await self.on_end()

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: tell the client, let the reply in progress finish (up to ``timeout_s``)."""
        await self.output.send_event(
            "error", code="server_shutdown", message="the server is shutting down; please reconnect shortly", fatal=True
        )
        deadline = time.monotonic() + timeout_s
        while (self._response is not None or (self.clock is not None and self.clock.busy)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        tasks = list(self._tasks)
        if self._response is not None and self._response.task is not None:
            tasks.append(self._response.task)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._asr.reset()

    # ---- internals ----------------------------------------------------------------------------

    async def _open_video(self, avatar_id: str | None, size: int | None) -> None:
        """Load the avatar and open a renderer session (blocking work in a thread)."""
        if self.avatars is None or self.models.renderer is None:
            raise ProtocolError("video_unavailable", "this server has no avatars or renderer configured")
        avatar_id = avatar_id or self.settings.avatars.default_avatar
        size = size or self.settings.avatars.output_size
        if size % 2:
            raise ProtocolError("invalid_session_config", f"video_size must be even, not {size}")
        try:
            avatar = await asyncio.to_thread(self.avatars.load, avatar_id)
        except InvalidAvatarId as error:
            raise ProtocolError("invalid_session_config", f"invalid avatar id: {error}")
        except AvatarNotFound:
            raise ProtocolError("unknown_avatar", f"there is no avatar {avatar_id!r}; GET /v1/avatars lists them")
        self._renderer = await asyncio.to_thread(self.models.renderer.open, avatar, size)
        self.avatar_id = avatar_id
        self.video_size = size

    async def _render_tick(self, tick: Tick) -> None:
        """The clock's prepare hook: this tick's frame, rendered in a worker thread.

        A renderer that falls behind never stalls the clock: when the frame is
        not ready within a tick, the avatar's idle frame goes out instead (audio
        continues), the late frame is counted, and no new render starts until
        the slow one has finished.
        """
        renderer = self._renderer
        assert renderer is not None
        speaking = tick.audio is not None and tick.render_audio is not None
        if self._render_job is not None and not self._render_job.done():
            tick.frame = await self._idle_frame(tick.index)
            await self._frame_late(tick)
            return
        reset, self._renderer_reset = self._renderer_reset, False
        # Renderers that generate ahead (MuseTalk) get the audio the next ticks will carry.
        look_ahead = getattr(renderer, "look_ahead", None)
        upcoming = None
        if speaking and look_ahead is not None and self.clock is not None:
            upcoming = self.clock.peek_render_audio(renderer.look_ahead_ticks)  # type: ignore[attr-defined]

        def render() -> np.ndarray:
            if reset:
                renderer.reset()
            if not speaking:
                return renderer.idle_frame(tick.index)
            if upcoming is not None and look_ahead is not None:
                look_ahead(tick.index, np.concatenate([tick.render_audio, upcoming]))
            return renderer.render(tick.index, tick.render_audio)

        self._render_job = asyncio.ensure_future(asyncio.to_thread(render))
        done, _ = await asyncio.wait({self._render_job}, timeout=RENDER_BUDGET_S)
        if done:
            tick.frame = self._render_job.result()
            return
        tick.frame = await self._idle_frame(tick.index)
        await self._frame_late(tick)

    async def _idle_frame(self, index: int) -> np.ndarray:
        assert self._renderer is not None
        return await asyncio.to_thread(self._renderer.idle_frame, index)

    async def _frame_late(self, tick: Tick) -> None:
        self.late_frames += 1
        now = time.monotonic()
        if now - self._late_warned_at >= 5.0:
            self._late_warned_at = now
            logger.warning("session %s renderer behind at tick %d (%d late frames)", self.id, tick.index, self.late_frames)
            await self.output.send_event(
                "warning", code="renderer_behind", message="the renderer is behind; showing idle frames",
                late_frames=self.late_frames,
            )

    def _apply_persona(self, persona: PersonaOptions) -> None:
        update = {key: value for key, value in persona.model_dump().items() if value is not None}
        self.persona = self.persona.model_copy(update=update)
        self.memory.system_prompt = self.persona.system_prompt

    def _spawn(self, coro: Coroutine[object, object, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"{self.id}:{name}", context=task_context(self.id))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("session %s task %s failed", self.id, task.get_name(), exc_info=task.exception())

    async def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            await self.output.send_event("state", state=state)

    async def _input_loop(self) -> None:
        assert self._resampler is not None
        while True:
            data = await self._input.get()
            arrived = time.monotonic()
            samples = self._resampler.process(pcm16_to_float(data))
            if len(samples) == 0:
                continue
            windows = await asyncio.to_thread(self._vad.process, samples)
            for window, probability in windows:
                for event in self._turns.push(window, probability, arrived):
                    await self._handle_turn_event(event)
                if self._turns.in_speech:
                    await self._while_speaking()

    async def _while_speaking(self) -> None:
        """Barge-in and partial transcripts while the user talks."""
        response = self._response
        # While the previous turn is still being transcribed, more speech is the user going on,
        # not an interruption: cancelling now would lose their question (it is merged instead).
        if (
            response is not None
            and not response.audio_pending
            and self._turns.speech_ms >= self.settings.turns.barge_in_ms
        ):
            await self.interrupt("barge_in")
        # No partials during a pause: the pause's own early pass must get the recogniser at once.
        if self._turns.silence_ms == 0 and self._asr.partial_due(self._turns.utterance_samples):
            self._spawn(self._partial(self._turns.utterance()), "asr-partial")

    async def _partial(self, audio: np.ndarray) -> None:
        text = await self._asr.partial(audio)
        if text and self._turns.in_speech:
            self._turns.sentence_complete = ends_sentence(text)
            await self.output.send_event("input_audio_transcription.partial", turn_id=self._listening_turn, transcript=text)

    async def _early_final(self, task: asyncio.Task[str]) -> None:
        """When the pause transcription ends a sentence, the turn may end after the shorter silence."""
        text = await task
        if text and self._turns.in_speech and ends_sentence(text):
            self._turns.sentence_complete = True

    async def _handle_turn_event(self, event: TurnEvent) -> None:
        if event.kind is TurnEventKind.SPEECH_STARTED:
            self._last_activity = time.monotonic()
            self._listening_turn = self._next_turn_id
            self._asr.reset()
            await self.output.send_event("input_audio_buffer.speech_started", turn_id=self._listening_turn)
        elif event.kind is TurnEventKind.SPEECH_PAUSED:
            task = self._asr.start_early(self._turns.utterance())
            self._spawn(self._early_final(task), "asr-early")
        elif event.kind is TurnEventKind.SPEECH_RESUMED:
            self._asr.invalidate_early()
        elif event.kind is TurnEventKind.BLIP:
            logger.debug("session %s ignored a %.0f ms blip", self.id, event.speech_ms)
            self._asr.reset()
            await self.output.send_event("input_audio_buffer.speech_ignored", speech_ms=event.speech_ms)
        elif event.kind is TurnEventKind.TURN_ENDED:
            assert event.audio is not None
            await self.output.send_event("input_audio_buffer.speech_stopped", turn_id=self._listening_turn)
            if self._response is not None:
                await self.interrupt("new_input")
            early = self._asr.take_early()
            self._asr.reset()
            self._start_response(
                text=None, started_at=event.speech_end_at or event.at, audio=event.audio, early=early
            )

    def _start_response(
        self,
        text: str | None,
        started_at: float,
        audio: np.ndarray | None = None,
        fixed_reply: str | None = None,
        early: asyncio.Task[str] | None = None,
    ) -> None:
        turn_id = self._next_turn_id
        self._next_turn_id += 1
        response = _Response(turn_id=turn_id, started_at=started_at)
        self._response = response
        response.task = asyncio.create_task(
            self._run_response(response, text, audio, fixed_reply, early),
            name=f"{self.id}:response-{turn_id}",
            context=task_context(self.id, turn_id),
        )

    async def _run_response(
        self,
        response: _Response,
        text: str | None,
        audio: np.ndarray | None,
        fixed_reply: str | None,
        early: asyncio.Task[str] | None,
    ) -> None:
        try:
            await self._respond(response, text, audio, fixed_reply, early)
        except asyncio.CancelledError:
            raise
        except (LLMError, TTSError) as error:
            code = "llm_error" if isinstance(error, LLMError) else "tts_error"
            logger.warning("session %s turn %d: %s", self.id, response.turn_id, error)
            await self._finish_failed(response, code, str(error))
        except Exception as error:  # one turn's failure never ends the session
            logger.exception("session %s turn %d failed", self.id, response.turn_id)
            await self._finish_failed(response, "internal_error", f"the reply failed: {error}")

    async def _finish_failed(self, response: _Response, code: str, message: str) -> None:
        if self._response is response:
            self._response = None
        spoken = response.spoken_text()
        if spoken:
            self.memory.add_assistant(spoken)
        await self.output.send_event("error", code=code, message=message, turn_id=response.turn_id)
        await self._set_state("listening")
        await self.output.send_event("response.done", turn_id=response.turn_id, status="failed", text=spoken)
        if code == "llm_error" and not spoken and self.persona.fallback.strip() and self._response is None:
            # Say something rather than leave the user in silence; TTS may still work.
            self._start_response(text=None, started_at=time.monotonic(), fixed_reply=self.persona.fallback)

    async def _respond(
        self,
        response: _Response,
        text: str | None,
        audio: np.ndarray | None,
        fixed_reply: str | None,
        early: asyncio.Task[str] | None,
    ) -> None:
        turn_id = response.turn_id
        if audio is not None:
            await self._set_state("thinking")
            response.audio_pending = True
            text = await self._asr.final(audio, early)
            response.audio_pending = False
            response.mark("asr_final")
            await self.output.send_event("input_audio_transcription.completed", turn_id=turn_id, transcript=text)
            if not text.strip():
                # Noise that looked like speech: nothing to answer.
                self._response = None
                await self._set_state("listening")
                await self.output.send_event("response.done", turn_id=turn_id, status="empty", text="")
                return
        if text is not None:
            self.memory.add_user(text)
            await self._set_state("thinking")
        await self.output.send_event("response.created", turn_id=turn_id)

        sentences: asyncio.Queue[str | None] = asyncio.Queue(maxsize=self.settings.limits.queue_chunks)
        speaker = asyncio.create_task(self._speak(response, sentences), name=f"{self.id}:tts-{turn_id}")
        writer = asyncio.create_task(self._write(response, sentences, fixed_reply), name=f"{self.id}:llm-{turn_id}")
        try:
            # Whichever fails first ends the turn; the other is cancelled.
            await asyncio.wait({writer, speaker}, return_when=asyncio.FIRST_EXCEPTION)
            if writer.done() and writer.exception() is None:
                await self.output.send_event("response.text.done", turn_id=turn_id, text=response.generated_text)
            for task in (writer, speaker):
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            await speaker
        finally:
            for task in (writer, speaker):
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
        # Let the clock play out what is queued, then close the turn.
        while self.clock is not None and self.clock.busy:
            self._playback_idle.clear()
            await self._playback_idle.wait()
        if self._response is response:
            self._response = None
        spoken = response.spoken_text()
        if fixed_reply is not None or spoken:
            self.memory.add_assistant(spoken or response.generated_text)
        await self._set_state("listening")
        await self.output.send_event(
            "response.done", turn_id=turn_id, status="completed", text=spoken, latency_ms=response.marks_ms()
        )

    def _splitter(self) -> SentenceSplitter:
        return SentenceSplitter(
            min_chars=self.settings.tts.min_sentence_chars, max_chars=self.settings.tts.max_sentence_chars
        )

    async def _write(
        self, response: _Response, sentences: asyncio.Queue[str | None], fixed_reply: str | None
    ) -> None:
        """Produce the reply's sentences (from the LLM, or a fixed text), then the end marker."""
        if fixed_reply is not None:
            response.generated_text = fixed_reply
            await self.output.send_event("response.text.delta", turn_id=response.turn_id, delta=fixed_reply)
            splitter = self._splitter()
            for sentence in splitter.push(fixed_reply) + splitter.flush():
                await sentences.put(sentence)
        else:
            await self._generate(response, sentences)
        await sentences.put(None)

    async def _generate(self, response: _Response, sentences: asyncio.Queue[str | None]) -> None:
        splitter = self._splitter()
        splitter.max_chars = max(self.settings.tts.first_chunk_chars, splitter.min_chars + 1)
        stream = self.models.llm.stream(self.memory.messages())
        wait_s = self.settings.llm.first_token_timeout_s
        try:
            async with asyncio.timeout(wait_s) as first_token:
                async for delta in stream:
                    if not delta:
                        continue
                    first_token.reschedule(None)
                    response.mark("llm_first_token")
                    response.generated_text += delta
                    await self.output.send_event("response.text.delta", turn_id=response.turn_id, delta=delta)
                    for sentence in splitter.push(delta):
                        first = "first_sentence" not in response.marks
                        response.mark("first_sentence")
                        splitter.max_chars = self.settings.tts.max_sentence_chars
                        await sentences.put(sentence)
                        if first:
                            # On a small CPU the LLM and the TTS compete: hold generation (the
                            # LLM's bounded queue stops it within a token or two) until the
                            # first sentence is voiced, so the user hears the reply sooner.
                            with contextlib.suppress(TimeoutError):
                                async with asyncio.timeout(FIRST_AUDIO_HOLD_S):
                                    await response.first_audio_ready.wait()
        except TimeoutError as error:
            raise LLMError(f"the LLM gave no answer within {wait_s:.0f} s") from error
        finally:
            await stream.aclose()
        for sentence in splitter.flush():
            response.mark("first_sentence")
            await sentences.put(sentence)

    async def _speak(self, response: _Response, sentences: asyncio.Queue[str | None]) -> None:
        """TTS each sentence as it arrives and queue its audio on the clock."""
        assert self.clock is not None and self.output_sample_rate is not None
        tts = self.models.tts
        while (sentence := await sentences.get()) is not None:
            pieces: list[np.ndarray] = []
            started = time.monotonic()
            stream = tts.synthesize(sentence)
            try:
                async with asyncio.timeout(self.settings.tts.timeout_s):
                    async for chunk in stream:
                        response.mark("tts_first_audio")
                        pieces.append(chunk)
            except TimeoutError as error:
                raise TTSError(f"the TTS took longer than {self.settings.tts.timeout_s:.0f} s for one sentence") from error
            finally:
                await stream.aclose()
            if not pieces:
                continue
            speech = np.concatenate(pieces)
            logger.debug(
                "session %s: %.1f s of speech for %d chars in %.0f ms",
                self.id, len(speech) / tts.sample_rate, len(sentence), (time.monotonic() - started) * 1000,
            )
            samples = await asyncio.to_thread(resample, speech, tts.sample_rate, self.output_sample_rate)
            render_samples = (
                await asyncio.to_thread(resample, speech, tts.sample_rate, RENDER_SAMPLE_RATE) if self._renderer else None
            )
            segment_id = await self.clock.enqueue(response.turn_id, samples, render_samples)
            response.segments[segment_id] = (sentence, len(samples))
            response.first_audio_ready.set()
            self._playback_idle.clear()

    async def _on_tick(self, tick: Tick) -> None:
        """The clock's sink: book-keeping and latency marks, then the tick's media goes out."""
        if tick.audio is None:
            self._playback_idle.set()
        else:
            response = self._response
            if response is not None and response.turn_id == tick.turn_id:
                for segment_id, samples in tick.spans:
                    response.played[segment_id] = response.played.get(segment_id, 0) + samples
                if "first_audio" not in response.marks:
                    response.mark("first_audio")
                    if tick.frame is not None:
                        response.mark("first_frame")
                    await self._set_state("speaking")
                    marks = response.marks_ms()
                    logger.info("session %s turn %d latency %s", self.id, response.turn_id, marks)
                    await self.output.send_event("latency", turn_id=response.turn_id, marks_ms=marks)
        await self.output.send_tick(tick.index, tick.audio, tick.frame)

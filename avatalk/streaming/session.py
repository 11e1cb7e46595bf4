"""One conversation: wires the stages, the clock and the output; owns barge-in and the session's lifetime.

    client audio -> Listener --(turn messages)--> session --(ReplyRequest)--> Responder
                                                                                  |
            output <-- session._on_tick <-- MediaClock (+ VideoStage.prepare) <---+ reply audio

Data flows one way: the listener reports what the user does, the session
decides (start a reply, interrupt one), the responder queues reply audio on
the clock, and the clock releases one 40 ms tick at a time to the output.
Barge-in is one call (``interrupt``): clear the clock, then cancel the
responder; the history keeps only what was heard.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal

from avatalk.avatars.store import AvatarNotFound, AvatarStore, InvalidAvatarId
from avatalk.config import Settings
from avatalk.executors import run_in
from avatalk.llm.memory import DialogueMemory
from avatalk.logs import task_context
from avatalk.streaming.asr import TurnTranscriber, same_words
from avatalk.streaming.clock import MediaClock, Tick
from avatalk.streaming.events import (
    ErrorEvent,
    InterruptReason,
    Latency,
    ResponseDone,
    SessionDescription,
    SessionUpdated,
    SpeechIgnored,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionPartial,
)
from avatalk.streaming.listener import (
    BargeInSpeech,
    Listener,
    ListenerMessage,
    PartialHeard,
    PauseHeard,
    SpeechBegan,
    SpeechEnded,
    SpeechIgnoredBlip,
    SpeechResumed,
    UserTurn,
)
from avatalk.streaming.models import EngineModels
from avatalk.streaming.protocol import (
    AudioCommit,
    ClientEvent,
    OutputAudioClear,
    OutputAudioCommit,
    PersonaOptions,
    ProtocolError,
    ResponseCancel,
    SessionMode,
    SessionOptions,
    SessionUpdate,
    TextInput,
    check_sample_rate,
)
from avatalk.streaming.render_feed import RenderFeed
from avatalk.streaming.responder import ReplyRequest, Responder
from avatalk.streaming.stage import ConversationState, SessionOutput, TaskSet
from avatalk.streaming.turns import TurnDetector
from avatalk.streaming.video import VideoStage
from avatalk.streaming.viewers import Viewers

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_SAMPLE_RATE = 24000


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
        self.models = models
        self.settings = settings
        self.output = output
        self.avatars = avatars
        self.persona = settings.persona.model_copy()
        self.input_sample_rate: int | None = None
        self.output_sample_rate: int | None = None
        self.avatar_id: str | None = None
        self.video_size: int | None = None
        self.clock: MediaClock | None = None
        self.video: VideoStage | None = None
        self.listener: Listener | None = None
        self.responder: Responder | None = None
        self.mode: SessionMode = "conversation"
        self.render_feed: RenderFeed | None = None  # render mode: the client's reply audio
        self.state = ConversationState(self.output.send_event)
        self.memory = DialogueMemory(
            system_prompt=self.persona.system_prompt,
            max_turns=settings.llm.history_turns,
            max_tokens=settings.llm.history_tokens,
            count_tokens=models.llm.count_tokens,
            examples=self.persona.examples,
        )
        self._tasks = TaskSet(session_id, task_context(session_id))
        self._next_turn_id = 1
        self._listening_turn = 0  # turn id of the utterance in progress (or the last one)
        self._transcribing_turns: deque[int] = deque()  # ended turns whose transcript is still coming
        self._started_at = time.monotonic()
        self._last_activity = self._started_at
        self.on_end: Callable[[], Awaitable[None]] | None = None  # the transport hangs up
        self.viewers = Viewers(session_id, self._tasks.spawn)  # render sessions: WebRTC viewers of the ticks

    # ---- what the transports call --------------------------------------------------------------

    @property
    def configured(self) -> bool:
        return self.input_sample_rate is not None

    def describe(self) -> SessionDescription:
        renderer = self.video.renderer if self.video is not None else None
        return SessionDescription(
            id=self.id,
            input_sample_rate=self.input_sample_rate,
            output_sample_rate=self.output_sample_rate,
            video=renderer is not None,
            avatar=self.avatar_id,
            video_size=list(renderer.output_shape[::-1]) if renderer is not None else None,
            persona=self.persona.model_dump(),
            turn_detection=self.settings.turns.model_dump(),
            mode=self.mode,
        )

    async def configure(self, options: SessionOptions) -> None:
        """Apply a ``session.update``; the first one with sample rates starts the session."""
        first = not self.configured
        if first:
            input_rate = check_sample_rate(options.input_sample_rate, "input_sample_rate")
            output_rate = check_sample_rate(
                options.output_sample_rate or DEFAULT_OUTPUT_SAMPLE_RATE, "output_sample_rate"
            )
            clock = MediaClock(output_rate)
            self.mode = options.mode or "conversation"
            if options.video or options.avatar is not None:
                self.video = await self._open_video(options.avatar, options.video_size, clock)
        else:
            current = {
                "mode": self.mode,
                "input_sample_rate": self.input_sample_rate,
                "output_sample_rate": self.output_sample_rate,
                "avatar": self.avatar_id,
                "video": self.video is not None,
                "video_size": self.video_size,
            }
            for name, value in current.items():
                requested = getattr(options, name)
                if requested is not None and requested != value:
                    raise ProtocolError("invalid_session_config", f"{name} cannot change once the session started")
        if options.persona is not None:
            self._apply_persona(options.persona)
        if first:
            self.input_sample_rate, self.output_sample_rate, self.clock = input_rate, output_rate, clock
            self._start_stages(input_rate, clock)
        await self.output.send_event(SessionUpdated(session=self.describe()))
        if first and self.mode == "conversation":
            await self.state.set("listening")
            if options.greeting if options.greeting is not None else True:
                self.greet()

    def greet(self) -> None:
        """Speak the persona's greeting (a no-op when it is empty)."""
        if self.responder is not None and self.persona.greeting.strip():
            self._reply(ReplyRequest(self._new_turn_id(), time.monotonic(), fixed_reply=self.persona.greeting))

    async def handle_event(self, event: ClientEvent) -> None:
        """Act on one decoded client event (any transport); raises ProtocolError."""
        if isinstance(event, SessionUpdate):
            await self.configure(event.session)
        elif isinstance(event, OutputAudioCommit | OutputAudioClear):
            if self.render_feed is None:
                raise ProtocolError("wrong_mode", f"{event.type} is for render sessions (session.update mode 'render')")
            if isinstance(event, OutputAudioClear):
                if self.video is not None:
                    self.video.reset()
                await self.render_feed.clear()
            else:
                await self.render_feed.commit()
        elif self.mode == "render":
            raise ProtocolError("wrong_mode", f"{event.type} is for conversation sessions, not render sessions")
        elif isinstance(event, TextInput):
            await self.send_text(event.text)
        elif isinstance(event, ResponseCancel):
            if not await self.interrupt("client_cancel"):
                raise ProtocolError("no_response", "there is no response to cancel")
        elif isinstance(event, AudioCommit):
            if self.listener is not None:
                await self.listener.commit()

    async def push_audio(self, data: bytes) -> None:
        """Queue one binary frame of client audio (waits when the session is behind).

        Microphone audio in a conversation; the reply audio to lip-sync in a render session.
        """
        if self.listener is None and self.render_feed is None:
            raise ProtocolError(
                "audio_before_configuration",
                "send session.update with input_sample_rate before any audio; this frame was dropped",
            )
        if len(data) % 2:
            raise ProtocolError("invalid_audio", "audio frames must be PCM16 (an even number of bytes)")
        if self.render_feed is not None:
            self._last_activity = time.monotonic()
            await self.render_feed.push(data)
        elif self.listener is not None:
            await self.listener.push(data)

    async def send_text(self, text: str) -> None:
        """The user typed instead of speaking."""
        if self.responder is None:
            raise ProtocolError("not_configured", "send session.update before conversation.item.create")
        text = text.strip()
        if not text:
            raise ProtocolError("invalid_event", "text must not be empty")
        limit = self.settings.limits.max_text_input_chars
        if len(text) > limit:
            raise ProtocolError("text_too_long", f"text is {len(text)} characters; the limit is {limit}")
        started = self._last_activity = time.monotonic()
        await self.interrupt("new_input")
        self._reply(ReplyRequest(self._new_turn_id(), started, text=text))

    async def interrupt(self, reason: InterruptReason = "barge_in") -> bool:
        """Barge-in: silence from the next tick on, the reply cancelled; True if there was one."""
        responder = self.responder
        if responder is None or not responder.active or responder.current is None:
            return False  # nothing the client knows of (a prepared reply is the listener's business)
        assert self.clock is not None
        self.clock.clear(responder.current.turn_id)
        if self.video is not None:
            self.video.reset()
        await responder.interrupt(reason)
        return True

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: tell the client, let the reply in progress finish (up to ``timeout_s``)."""
        await self.output.send_event(
            ErrorEvent(code="server_shutdown", message="the server is shutting down; please reconnect shortly", fatal=True)
        )
        deadline = time.monotonic() + timeout_s
        while self._busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Cancel every stage and hang up the viewers; nothing of this session runs afterwards."""
        await self.viewers.close()
        await self._tasks.close()
        for stage in (self.responder, self.listener, self.video):
            if stage is not None:
                await stage.close()

    # ---- wiring -----------------------------------------------------------------------------------

    def _start_stages(self, input_rate: int, clock: MediaClock) -> None:
        models, settings, executors = self.models, self.settings, self.models.executors
        queue_size = settings.limits.queue_chunks
        prepare = self.video.prepare if self.video else None
        self._tasks.spawn(self._watch_limits(), "limits")
        if self.mode == "render":
            self.render_feed = RenderFeed(
                clock=clock,
                input_sample_rate=input_rate,
                emit=self.output.send_event,
                executor=executors.tts,
                with_render_audio=self.video is not None,
                max_buffer_s=settings.limits.render_buffer_s,
                start_buffer_s=settings.limits.render_start_ms / 1000.0,
            )
            self._tasks.spawn(clock.run(self._on_tick, prepare), "clock")
            return
        end_of_turn = models.turn if settings.turns.semantic else None  # this session's settings may turn it off
        self.listener = Listener(
            input_sample_rate=input_rate,
            vad=models.vad.stream(),
            vad_executor=executors.vad,
            transcriber=TurnTranscriber(models.asr, executors.asr),
            turns=settings.turns,
            detector=TurnDetector(settings.turns, settings.vad, semantic=end_of_turn is not None),
            queue_size=queue_size,
            end_of_turn=end_of_turn,
            turn_executor=executors.turn,
            name=f"{self.id}:listener",
        )
        self.responder = Responder(
            llm=models.llm,
            tts=models.tts,
            memory=self.memory,
            clock=clock,
            emit=self.output.send_event,
            state=self.state,
            llm_settings=settings.llm,
            tts_settings=settings.tts,
            persona=self.persona,
            tts_executor=executors.tts,
            with_render_audio=self.video is not None,
            new_turn_id=self._new_turn_id,
            queue_size=queue_size,
            name=self.id,
        )
        self._tasks.spawn(self.listener.run(), "listener")
        self._tasks.spawn(self._follow_listener(self.listener), "turns")
        self._tasks.spawn(clock.run(self._on_tick, prepare), "clock")

    async def _open_video(self, avatar_id: str | None, size: int | None, clock: MediaClock) -> VideoStage:
        """Load the avatar and open a renderer session (blocking work off the event loop)."""
        if self.avatars is None or self.models.renderer is None:
            raise ProtocolError("video_unavailable", "this server has no avatars or renderer configured")
        avatar_id = avatar_id or self.settings.avatars.default_avatar
        size = size or self.settings.avatars.output_size
        if size % 2:
            raise ProtocolError("invalid_session_config", f"video_size must be even, not {size}")
        try:
            avatar = await asyncio.to_thread(self.avatars.load, avatar_id)
        except (InvalidAvatarId, AvatarNotFound) as error:  # an id that cannot exist names no avatar either
            raise ProtocolError(
                "unknown_avatar", f"there is no avatar {avatar_id[:80]!r}; GET /v1/avatars lists them"
            ) from error
        executor = self.models.executors.render
        renderer = await run_in(executor, self.models.renderer.open, avatar, size)
        self.avatar_id, self.video_size = avatar_id, size
        return VideoStage(renderer, clock, executor, self.output.send_event)

    def _apply_persona(self, persona: PersonaOptions) -> None:
        update = {key: value for key, value in persona.model_dump().items() if value is not None}
        self.persona = self.persona.model_copy(update=update)
        self.memory.system_prompt = self.persona.system_prompt
        if self.responder is not None:
            self.responder.persona = self.persona

    def _new_turn_id(self) -> int:
        turn_id, self._next_turn_id = self._next_turn_id, self._next_turn_id + 1
        return turn_id

    def _reply(self, request: ReplyRequest) -> None:
        assert self.responder is not None
        self.responder.start(request)

    def _busy(self) -> bool:
        """A reply is being prepared or played, or a finished turn is being transcribed."""
        return (
            (self.render_feed is not None and self.render_feed.busy)
            or (self.responder is not None and self.responder.active)
            or (self.listener is not None and self.listener.transcribing)
            or (self.clock is not None and self.clock.busy)
        )

    # ---- the session's own tasks ---------------------------------------------------------------

    async def _follow_listener(self, listener: Listener) -> None:
        """Act on what the user does, in order."""
        while True:
            message = await listener.messages.get()
            await self._on_listener_message(message)

    async def _on_listener_message(self, message: ListenerMessage) -> None:
        if isinstance(message, SpeechBegan):
            self._last_activity = time.monotonic()
            self._listening_turn = self._next_turn_id
            await self.output.send_event(SpeechStarted(turn_id=self._listening_turn))
        elif isinstance(message, PartialHeard):
            await self.output.send_event(TranscriptionPartial(turn_id=self._listening_turn, transcript=message.text))
            if self.responder is not None:
                self.responder.prefill(message.text)
        elif isinstance(message, PauseHeard):
            await self._prepare_reply(message.text)
        elif isinstance(message, SpeechResumed):
            await self._discard_prepared()
        elif isinstance(message, BargeInSpeech):
            await self.interrupt("barge_in")
        elif isinstance(message, SpeechIgnoredBlip):
            await self._discard_prepared()
            await self.output.send_event(SpeechIgnored(speech_ms=message.speech_ms))
        elif isinstance(message, SpeechEnded):
            await self.output.send_event(SpeechStopped(turn_id=self._listening_turn))
            self._transcribing_turns.append(self._new_turn_id())
            await self.interrupt("new_input")
            await self.state.set("thinking")
        elif isinstance(message, UserTurn):
            await self._on_user_turn(message)

    async def _prepare_reply(self, heard: str) -> None:
        """Preemptive reply: answer what the pause's transcript says while the end of the turn is awaited."""
        responder = self.responder
        assert responder is not None
        if not self.settings.turns.preemptive_reply or responder.current is not None:
            return  # one reply at a time: never while one is playing or another is prepared
        # The id this turn gets when it ends, if nothing else takes one first (checked on commit).
        responder.prepare(ReplyRequest(self._next_turn_id, time.monotonic(), text=heard))

    async def _discard_prepared(self) -> None:
        if self.responder is not None:
            await self.responder.discard()

    async def _on_user_turn(self, turn: UserTurn) -> None:
        turn_id = self._transcribing_turns.popleft()
        responder, listener = self.responder, self.listener
        assert responder is not None and listener is not None
        prepared = responder.prepared
        if prepared is not None and not (
            turn.error is None and prepared.turn_id == turn_id and same_words(prepared.heard or "", turn.transcript)
        ):
            await responder.discard()  # the user said something else: nothing of it was ever seen
            prepared = None
        if turn.error is not None:
            await self.output.send_event(ErrorEvent(code="internal_error", message=turn.error, turn_id=turn_id))
            await self.state.set("listening")
            await self.output.send_event(ResponseDone(turn_id=turn_id, status="failed", text=""))
            return
        await self.output.send_event(TranscriptionCompleted(turn_id=turn_id, transcript=turn.transcript))
        if not turn.transcript.strip():
            # Noise that looked like speech: nothing to answer.
            await self.state.set("listening")
            await self.output.send_event(ResponseDone(turn_id=turn_id, status="empty", text=""))
            return
        request = ReplyRequest(turn_id, turn.speech_end_at, text=turn.transcript, marks={"asr_final": turn.transcribed_at})
        if listener.user_holds_the_floor:
            # Speech that started while this turn was transcribed continues it (docs/protocol.md, barge-in).
            await responder.discard()
            await responder.set_aside(request)
        elif prepared is not None:
            await responder.commit(request.started_at, request.marks)  # what it prepared goes out now
        else:
            await self.interrupt("new_input")  # a typed message may have started a reply meanwhile
            responder.start(request)

    async def _on_tick(self, tick: Tick) -> None:
        """The clock's sink: the reply's first audio sets its latency marks; then the tick goes out."""
        reply = self.responder.current if self.responder is not None else None
        if tick.audio is not None and reply is not None and reply.turn_id == tick.turn_id:
            if "first_audio" not in reply.marks:
                reply.mark("first_audio")
                if tick.frame is not None:
                    reply.mark("first_frame")
                await self.state.set("speaking")
                marks = reply.marks_ms()
                logger.info("session %s turn %d latency %s", self.id, reply.turn_id, marks)
                await self.output.send_event(
                    Latency(turn_id=reply.turn_id, marks_ms=marks, preemptive=reply.preemptive or None)
                )
        await self.output.send_tick(tick.index, tick.audio, tick.frame)
        await self.viewers.send_tick(tick)
        if self.render_feed is not None:
            await self.render_feed.on_tick(tick)

    async def _watch_limits(self) -> None:
        """End the session when it is too long or idle too long (limits.*)."""
        limits = self.settings.limits
        while True:
            await asyncio.sleep(min(1.0, limits.idle_timeout_s / 4, limits.max_session_s / 4))
            now = time.monotonic()
            if now - self._started_at >= limits.max_session_s:
                await self._end("session_expired", f"the session reached its maximum length of {limits.max_session_s:.0f} s")
                return
            if not self._busy() and now - self._last_activity >= limits.idle_timeout_s:
                await self._end("idle_timeout", f"nobody spoke for {limits.idle_timeout_s:.0f} s; the session was closed")
                return

    async def _end(self, code: Literal["idle_timeout", "session_expired"], message: str) -> None:
        logger.info("session %s ending: %s", self.id, code)
        await self.output.send_event(ErrorEvent(code=code, message=message, fatal=True))
        if self.on_end is not None:
            await self.on_end()

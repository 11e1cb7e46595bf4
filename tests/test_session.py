"""A whole conversation session wired from fake models: turns, barge-in and fairness under load, no server."""

from __future__ import annotations

import asyncio
import time

import numpy as np
from stage_fakes import (
    Collector,
    FakeASR,
    FakeAvatarStore,
    FakeLLM,
    FakeModels,
    FakeRenderer,
    FakeTTS,
    pcm16,
    silence,
    tone,
)

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.streaming.events import (
    ErrorEvent,
    Latency,
    ResponseCreated,
    ResponseDone,
    ResponseInterrupted,
    ResponseTextDelta,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
)
from avatalk.streaming.protocol import SessionOptions
from avatalk.streaming.session import ConversationSession


def make_session(models: FakeModels, collector: Collector, settings: Settings | None = None) -> ConversationSession:
    return ConversationSession("test", models, settings or Settings(), collector, FakeAvatarStore())  # type: ignore[arg-type]


async def talk(session: ConversationSession, audio: np.ndarray) -> None:
    """Stream audio at real-time pace in 20 ms frames, as a microphone would."""
    step = 320
    started = time.monotonic()
    for index, start in enumerate(range(0, len(audio), step)):
        await session.push_audio(pcm16(audio[start : start + step]))
        await asyncio.sleep(max(0.0, started + (index + 1) * 0.02 - time.monotonic()))


async def test_a_spoken_question_is_answered_with_marks_from_the_end_of_speech() -> None:
    collector = Collector()
    settings = Settings(turns={"preemptive_reply": False})  # every stage after the end of speech, in order
    session = make_session(FakeModels(llm=FakeLLM("Four.")), collector, settings)
    try:
        await session.configure(SessionOptions(input_sample_rate=16000, greeting=False))
        assert isinstance(collector.events[0], SessionUpdated)
        await talk(session, np.concatenate([tone(1.0), silence(0.8)]))
        done = await collector.wait_for(ResponseDone)
    finally:
        await session.close()
    started = collector.of_type(SpeechStarted)[0]
    stopped = collector.of_type(SpeechStopped)[0]
    completed = collector.of_type(TranscriptionCompleted)[0]
    assert started.turn_id == stopped.turn_id == completed.turn_id == done.turn_id == 1
    assert done.status == "completed" and done.text == "Four."
    marks = collector.of_type(Latency)[0].marks_ms
    assert 0 <= marks["asr_final"] <= marks["llm_first_token"] <= marks["first_audio"]


async def test_barge_in_silences_the_reply_from_the_next_tick_and_keeps_what_was_heard() -> None:
    collector = Collector()
    reply = "One two three four five six seven eight nine ten eleven twelve."
    session = make_session(FakeModels(llm=FakeLLM(reply), tts=FakeTTS(seconds_per_word=0.3)), collector)
    try:
        await session.configure(SessionOptions(input_sample_rate=16000, greeting=False))
        await session.send_text("Count to twelve.")
        while not any(audio is not None for _, audio, _ in collector.ticks):
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)
        await talk(session, tone(0.4))  # the user speaks over the reply
        interrupted = await collector.wait_for(ResponseInterrupted)
        ticks_at_interrupt = len(collector.ticks)
        await asyncio.sleep(0.3)
    finally:
        await session.close()
    assert interrupted.reason == "barge_in"
    heard = interrupted.spoken_text.split()
    assert 2 <= len(heard) < 12 and heard == reply.split()[: len(heard)]
    after = collector.ticks[ticks_at_interrupt + 1 :]  # at most one tick was already on its way
    assert after and all(audio is None for _, audio, _ in after)


async def test_eight_sessions_waiting_for_a_busy_model_keep_their_clocks_at_25_ticks_per_second() -> None:
    """The shared LLM is held for seconds and the render pool is oversubscribed: only video may suffer."""
    settings = Settings()
    executors = Executors.create(settings.executors)
    models = FakeModels(
        llm=FakeLLM("Fine.", hold_s=1.5, executor=executors.llm),
        renderer=FakeRenderer(render_s=0.03),  # 8 sessions x 25 fps x 30 ms = 6 cores' worth on 2 threads
        executors=executors,
    )
    outputs = [Collector() for _ in range(8)]
    sessions = [make_session(models, output, settings) for output in outputs]
    try:
        for session in sessions:
            await session.configure(SessionOptions(input_sample_rate=16000, video=True, greeting=False))
        for session in sessions:
            await session.send_text("How are you?")
        await asyncio.sleep(0.5)
        window_start = time.monotonic()
        await asyncio.sleep(3.0)
        window_end = time.monotonic()
    finally:
        for session in sessions:
            await session.close()
    seconds = window_end - window_start
    for output in outputs:
        in_window = [t for t in output.tick_times if window_start <= t < window_end]
        # 25 ticks a second; a loose floor, since this machine is shared (not a timing benchmark).
        assert len(in_window) >= 0.8 * 25 * seconds, f"{len(in_window)} ticks in {seconds:.1f} s"
        assert all(frame is not None for _, _, frame in output.ticks)  # every tick has a frame, late or not


async def test_an_idle_session_ends_itself_and_can_close_from_its_own_task() -> None:
    collector = Collector()
    settings = Settings(limits={"idle_timeout_s": 0.4})
    session = make_session(FakeModels(), collector, settings)
    closed = asyncio.Event()

    async def hang_up() -> None:  # what a transport does: close the session from the session's own task
        await session.close()
        closed.set()

    session.on_end = hang_up
    await session.configure(SessionOptions(input_sample_rate=16000, greeting=False))
    await asyncio.wait_for(closed.wait(), 5.0)
    errors = collector.of_type(ErrorEvent)
    assert [(e.code, e.fatal) for e in errors] == [("idle_timeout", True)]
    await session.close()  # closing twice is harmless


async def test_speech_during_the_transcription_continues_the_turn_instead_of_getting_two_replies() -> None:
    collector = Collector()
    models = FakeModels(llm=FakeLLM("Sure."), asr=FakeASR("Hello there.", delay_s=0.8))
    session = make_session(models, collector)
    try:
        await session.configure(SessionOptions(input_sample_rate=16000, greeting=False))
        await talk(session, np.concatenate([tone(1.0), silence(0.7)]))  # turn 1 ends; its transcript is slow
        await talk(session, np.concatenate([tone(2.5), silence(0.8)]))  # the user goes on meanwhile
        completed = await collector.wait_for(ResponseDone, timeout=15)
        while not any(event.status == "completed" for event in collector.of_type(ResponseDone)):
            await asyncio.sleep(0.05)
    finally:
        await session.close()
    first, second = collector.of_type(ResponseDone)[:2]
    assert completed is first and (first.turn_id, first.status) == (1, "interrupted")
    assert (second.turn_id, second.status) == (2, "completed")
    users = [message.content for message in session.memory.history() if message.role == "user"]
    assert users == ["Hello there. Hello there."]  # one question, merged


async def test_a_prepared_reply_is_committed_when_the_turn_ends_as_heard() -> None:
    collector = Collector()
    llm = FakeLLM("Four.")
    settings = Settings(turns={"end_silence_ms": 700})
    session = make_session(FakeModels(llm=llm, asr=FakeASR("What is two plus two")), collector, settings)
    try:
        await session.configure(SessionOptions(input_sample_rate=16000, greeting=False))
        await talk(session, np.concatenate([tone(1.0), silence(1.0)]))
        done = await collector.wait_for(ResponseDone)
    finally:
        await session.close()
    assert len(llm.calls) == 1  # the reply prepared at the pause was used: no second LLM call
    assert done.status == "completed" and done.text == "Four." and done.preemptive is True
    kinds = [type(event).__name__ for event in collector.events]
    # Nothing of the prepared reply went out before the turn ended and its transcript was final.
    assert kinds.index("SpeechStopped") < kinds.index("TranscriptionCompleted") < kinds.index("ResponseCreated")
    latency = collector.of_type(Latency)[0]
    assert latency.preemptive is True and latency.marks_ms["first_audio"] >= latency.marks_ms["llm_first_token"] >= 0
    assert [m.content for m in session.memory.history() if m.role == "user"] == ["What is two plus two"]


async def test_a_prepared_reply_is_dropped_without_a_trace_when_the_user_speaks_on() -> None:
    collector = Collector()
    llm = FakeLLM("Sure.")
    settings = Settings(turns={"end_silence_ms": 900})
    session = make_session(FakeModels(llm=llm, asr=FakeASR("I would like")), collector, settings)
    try:
        await session.configure(SessionOptions(input_sample_rate=16000, greeting=False))
        await talk(session, np.concatenate([tone(1.0), silence(0.5), tone(0.8), silence(1.2)]))
        done = await collector.wait_for(ResponseDone)
    finally:
        await session.close()
    assert len(llm.calls) == 2  # one prepared at the first pause (dropped), one at the second (committed)
    assert len(collector.of_type(ResponseCreated)) == 1 and done.status == "completed"
    deltas = "".join(event.delta for event in collector.of_type(ResponseTextDelta))
    assert deltas.strip() == "Sure."  # the dropped reply's text never reached the client
    assert [m.content for m in session.memory.history() if m.role == "user"] == ["I would like"]
    assert [m.content for m in session.memory.history() if m.role == "assistant"] == ["Sure."]

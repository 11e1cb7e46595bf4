"""The responder alone: fake LLM and TTS, a real media clock stepped by hand, typed events collected."""

from __future__ import annotations

import asyncio
import time

from stage_fakes import Collector, FakeLLM, FakeTTS

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.llm.memory import DialogueMemory
from avatalk.llm.base import LLMError
from avatalk.streaming.clock import MediaClock
from avatalk.streaming.events import (
    ErrorEvent,
    ResponseCreated,
    ResponseDone,
    ResponseInterrupted,
    ResponseTextDone,
    StateChanged,
)
from avatalk.streaming.responder import Reply, ReplyRequest, Responder
from avatalk.streaming.stage import ConversationState

RATE = 16000


def make_responder(llm: FakeLLM, collector: Collector, clock: MediaClock) -> Responder:
    settings = Settings()
    turn_ids = iter(range(100, 200))
    return Responder(
        llm=llm,
        tts=FakeTTS(seconds_per_word=0.25),  # 4 words = one second per sentence
        memory=DialogueMemory(system_prompt="Be brief.", max_turns=8, max_tokens=1024, count_tokens=llm.count_tokens),
        clock=clock,
        emit=collector.send_event,
        state=ConversationState(collector.send_event),
        llm_settings=settings.llm,
        tts_settings=settings.tts.model_copy(update={"min_sentence_chars": 5}),
        persona=settings.persona,
        tts_executor=Executors.create(settings.executors).tts,
        with_render_audio=False,
        new_turn_id=lambda: next(turn_ids),
        queue_size=16,
    )


async def queued(clock: MediaClock, seconds: float, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while clock._queued_samples < seconds * RATE:  # noqa: SLF001 (the test steps the clock by hand)
        assert time.monotonic() < deadline, "the responder queued no audio"
        await asyncio.sleep(0.01)


async def test_interrupted_mid_sentence_keeps_only_what_was_played() -> None:
    collector, clock = Collector(), MediaClock(RATE)
    responder = make_responder(FakeLLM("One two three four. Five six seven eight."), collector, clock)
    reply = responder.start(ReplyRequest(1, time.monotonic(), text="Count to eight."))
    await queued(clock, 2.0)  # both sentences voiced and queued
    for _ in range(13):  # 13 ticks = 0.52 s: half of the first sentence has been played
        clock.next_tick()
    clock.clear(1)
    interrupted = await responder.interrupt("barge_in")
    assert interrupted is reply and not responder.active
    [event] = collector.of_type(ResponseInterrupted)
    assert event.spoken_text == "One two" and event.reason == "barge_in"
    [done] = collector.of_type(ResponseDone)
    assert done.status == "interrupted" and done.text == "One two"
    assert [m.content for m in responder.memory.messages()[-2:]] == ["Count to eight.", "One two"]
    assert not collector.of_type(ResponseTextDone) or collector.events.index(
        collector.of_type(ResponseTextDone)[0]
    ) < collector.events.index(event)


async def test_a_reply_played_to_the_end_completes_with_its_latency_marks() -> None:
    collector, clock = Collector(), MediaClock(RATE)
    responder = make_responder(FakeLLM("Four is the answer."), collector, clock)
    responder.start(ReplyRequest(1, time.monotonic(), text="What is two plus two?"))
    await queued(clock, 1.0)
    while clock.busy:
        clock.next_tick()
    done = await collector.wait_for(ResponseDone)
    assert done.status == "completed" and done.text == "Four is the answer."
    assert {"llm_first_token", "first_sentence", "tts_first_audio"} <= set(done.latency_ms or {})
    states = [event.state for event in collector.of_type(StateChanged)]
    assert states == ["thinking", "listening"]
    assert isinstance(collector.events[1], ResponseCreated)
    assert responder.memory.messages()[-1].content == "Four is the answer."


async def test_an_llm_failure_ends_the_turn_and_speaks_the_fallback() -> None:
    class DeadLLM(FakeLLM):
        async def stream(self, messages, session_key=None):  # type: ignore[override]
            raise LLMError("the LLM server is not running")
            yield ""

    collector, clock = Collector(), MediaClock(RATE)
    responder = make_responder(DeadLLM(), collector, clock)
    responder.start(ReplyRequest(1, time.monotonic(), text="Hello?"))
    error = await collector.wait_for(ErrorEvent)
    assert error.code == "llm_error" and error.turn_id == 1
    await queued(clock, 0.5)  # the fallback sentence is being spoken as a new turn
    assert responder.current is not None and responder.current.turn_id == 100
    assert collector.of_type(ResponseDone)[0].status == "failed"
    await responder.close()


def test_spoken_text_cuts_a_partly_played_sentence_by_words() -> None:
    clock = MediaClock(RATE)

    async def build() -> Reply:
        reply = Reply(1, 0.0)
        first = await clock.enqueue(1, __import__("numpy").zeros(RATE, "float32"))
        second = await clock.enqueue(1, __import__("numpy").zeros(RATE, "float32"))
        reply.sentences += [("Alpha beta gamma delta.", first), ("Epsilon zeta.", second)]
        return reply

    reply = asyncio.run(build())
    assert reply.spoken_text() == ""
    for _ in range(25 + 13):  # the first second, then half of the second
        clock.next_tick()
    assert reply.spoken_text() == "Alpha beta gamma delta. Epsilon"


async def test_prefill_while_the_user_speaks_caches_the_prompt_so_far_and_a_reply_cancels_it() -> None:
    llm, collector, clock = FakeLLM(), Collector(), MediaClock(RATE)
    responder = make_responder(llm, collector, clock)
    llm.prefill_s = 10.0
    responder.prefill("What is the capital")
    responder.prefill("What is the capital of")  # one at a time: this one is skipped
    await asyncio.sleep(0.05)
    assert [messages[-1].content for messages in llm.prefills] == ["What is the capital"]
    assert llm.prefills[0][:-1] == responder.memory.messages()  # the prompt the reply will have
    reply = responder.start(ReplyRequest(1, time.monotonic(), text="What is the capital of France?"))
    await asyncio.sleep(0.05)
    assert llm.prefills_done == 0  # cancelled: the reply does not queue behind it
    responder.prefill("More words")  # never while a reply exists
    assert all(messages[-1].content != "More words" for messages in llm.prefills)
    await responder.interrupt("barge_in")
    assert reply.turn_id == 1 and not collector.of_type(ErrorEvent)
    await responder.close()


async def test_while_a_reply_plays_the_next_turns_prompt_is_prefilled() -> None:
    llm, collector, clock = FakeLLM(reply="Paris is the capital."), Collector(), MediaClock(RATE)
    responder = make_responder(llm, collector, clock)
    responder.start(ReplyRequest(1, time.monotonic(), text="What is the capital of France?"))
    await queued(clock, 0.5)
    await asyncio.sleep(0.05)
    # Generated and queued, still playing: the next turn's prompt, with this reply as if spoken in full.
    assert not collector.of_type(ResponseDone)
    [prefilled] = llm.prefills
    while clock.busy:
        clock.next_tick()
    await collector.wait_for(ResponseDone)
    assert prefilled == responder.memory.messages()  # what the next turn's prompt starts with
    assert prefilled[-1].content == "Paris is the capital."
    await responder.close()


async def test_no_prefill_when_prefill_ahead_is_off() -> None:
    llm, collector, clock = FakeLLM(), Collector(), MediaClock(RATE)
    responder = make_responder(llm, collector, clock)
    responder._llm_settings = Settings(llm={"prefill_ahead": False}).llm  # noqa: SLF001
    responder.prefill("What is")
    await asyncio.sleep(0.01)
    assert llm.prefills == []

"""The listener alone: synthetic audio through a fake VAD and a fake recogniser, typed turn messages out."""

from __future__ import annotations

import asyncio

import numpy as np
from stage_fakes import FakeASR, FakeEndOfTurn, FakeVADStream, drain, pcm16, silence, tone

from avatalk.config import Settings, TurnSettings
from avatalk.executors import Executors
from avatalk.streaming.asr import TurnTranscriber
from avatalk.streaming.listener import (
    BargeInSpeech,
    Listener,
    PartialHeard,
    PauseHeard,
    SpeechBegan,
    SpeechEnded,
    SpeechIgnoredBlip,
    UserTurn,
)
from avatalk.streaming.turns import TurnDetector


def make_listener(
    asr: FakeASR, turns: TurnSettings | None = None, rate: int = 16000, end_of_turn: FakeEndOfTurn | None = None
) -> Listener:
    settings = Settings()
    turns = turns or settings.turns
    executors = Executors.create(settings.executors)
    return Listener(
        input_sample_rate=rate,
        vad=FakeVADStream(),
        vad_executor=executors.vad,
        transcriber=TurnTranscriber(asr, executors.asr),  # type: ignore[arg-type]
        turns=turns,
        detector=TurnDetector(turns, settings.vad, semantic=end_of_turn is not None),
        queue_size=64,
        end_of_turn=end_of_turn,
        turn_executor=executors.turn,
    )


async def speak(listener: Listener, audio: np.ndarray, rate: int = 16000, chunk_s: float = 0.02) -> None:
    step = int(rate * chunk_s)
    for start in range(0, len(audio), step):
        await listener.push(pcm16(audio[start : start + step]))


async def hear(listener: Listener, audio: np.ndarray, settle_s: float = 0.3) -> list:
    """Run the listener on ``audio`` (16 kHz) and return every message it emits."""
    runner = asyncio.create_task(listener.run())
    try:
        await speak(listener, audio)
        return await drain(listener.messages, settle_s=settle_s)
    finally:
        runner.cancel()
        await listener.close()


async def test_a_spoken_turn_gives_started_barge_in_partial_ended_and_the_transcript() -> None:
    asr = FakeASR("What is two plus two?")
    listener = make_listener(asr)
    messages = await hear(listener, np.concatenate([silence(0.3), tone(1.2), silence(1.0)]))
    kinds = [type(message) for message in messages]
    assert kinds[0] is SpeechBegan and kinds[-1] is UserTurn
    assert kinds.count(BargeInSpeech) == 1 and kinds.count(SpeechEnded) == 1
    assert kinds.index(BargeInSpeech) < kinds.index(SpeechEnded) < kinds.index(UserTurn)
    assert PartialHeard in kinds[: kinds.index(SpeechEnded)]
    turn = messages[-1]
    ended = messages[kinds.index(SpeechEnded)]
    assert turn.transcript == "What is two plus two?" and turn.error is None
    assert turn.speech_end_at == ended.speech_end_at <= turn.transcribed_at


async def test_the_end_silence_is_shorter_after_a_finished_sentence() -> None:
    """The recogniser's text reaches the turn detector: '...?' ends the turn after the short silence."""
    turns = TurnSettings(end_silence_ms=900, sentence_end_silence_ms=250)
    ended_after = {}
    for text in ("What is two plus two?", "I would like to know about"):
        listener = make_listener(FakeASR(text), turns)
        # 0.6 s of silence: more than the sentence-end silence, less than the normal one.
        messages = await hear(listener, np.concatenate([tone(1.0), silence(0.6)]), settle_s=0.5)
        ended_after[text] = any(isinstance(message, SpeechEnded) for message in messages)
    assert ended_after == {"What is two plus two?": True, "I would like to know about": False}


async def test_a_blip_is_ignored_and_never_transcribed_as_a_turn() -> None:
    asr = FakeASR()
    listener = make_listener(asr)
    messages = await hear(listener, np.concatenate([tone(0.1), silence(1.0)]))
    kinds = [type(message) for message in messages]
    assert kinds[0] is SpeechBegan and kinds[-1] is SpeechIgnoredBlip  # a PauseHeard may come between
    assert UserTurn not in kinds and SpeechEnded not in kinds


async def test_audio_at_another_rate_is_resampled_and_commit_ends_the_turn_at_once() -> None:
    listener = make_listener(FakeASR("Hello there."), rate=48000)
    runner = asyncio.create_task(listener.run())
    try:
        await speak(listener, tone(0.8, rate=48000), rate=48000)  # no trailing silence: push-to-talk
        await asyncio.sleep(0.3)
        await listener.commit()
        messages = await drain(listener.messages)
    finally:
        runner.cancel()
        await listener.close()
    turns = [message for message in messages if isinstance(message, UserTurn)]
    assert len(turns) == 1 and turns[0].transcript == "Hello there."


async def test_a_recogniser_failure_becomes_a_turn_with_an_error() -> None:
    class BrokenASR(FakeASR):
        def transcribe(self, audio: np.ndarray) -> str:
            raise RuntimeError("decoder exploded")

    listener = make_listener(BrokenASR())
    messages = await hear(listener, np.concatenate([tone(0.8), silence(1.0)]))
    turn = messages[-1]
    assert isinstance(turn, UserTurn) and turn.transcript == "" and "decoder exploded" in (turn.error or "")


async def test_the_end_of_turn_model_ends_a_complete_turn_early_and_lets_an_incomplete_one_wait() -> None:
    turns = TurnSettings(end_silence_ms=500, semantic_silence_ms=160, semantic_max_silence_ms=1500)
    ended = {}
    for complete_after_s in (0.0, 60.0):  # every utterance complete / none ever complete
        model = FakeEndOfTurn(complete_after_s)
        listener = make_listener(FakeASR("I would like to know about"), turns, end_of_turn=model)
        # 0.6 s of silence: past the model's short silence and the 500 ms rule, short of 1.5 s.
        messages = await hear(listener, np.concatenate([tone(1.0), silence(0.6)]), settle_s=0.5)
        assert model.calls == 1  # asked once for the one pause
        ended[complete_after_s] = any(isinstance(message, SpeechEnded) for message in messages)
        if complete_after_s:  # while the turn stays open, the pause's transcript is reported (for a reply)
            assert any(isinstance(message, PauseHeard) for message in messages)
    assert ended == {0.0: True, 60.0: False}

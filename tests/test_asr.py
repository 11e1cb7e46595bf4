import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from avatalk.config import ASRSettings, Settings
from avatalk.streaming.asr import TurnTranscriber, WhisperASR, ends_sentence

pytestmark = pytest.mark.slow

NUMBERS = {"2": "two", "4": "four"}


def normalise(text: str) -> str:
    text = re.sub(r"[^a-z0-9 ]", "", text.lower())
    return " ".join(NUMBERS.get(word, word) for word in text.split())


@pytest.fixture(scope="module")
def asr() -> WhisperASR:
    return WhisperASR(Settings().asr_model_path(), ASRSettings())


@pytest.fixture(scope="module")
def asr_pool():
    with ThreadPoolExecutor(1, thread_name_prefix="test-asr") as pool:
        yield pool


def test_transcribes_a_question(asr, speech):
    text = asr.transcribe(speech("What is two plus two?"))
    assert "what is two plus two" in normalise(text)
    assert ends_sentence(text)


def test_tiny_audio_gives_empty_text(asr):
    assert asr.transcribe(np.zeros(100, np.float32)) == ""


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.bin"):
        WhisperASR(tmp_path, ASRSettings())


async def test_final_reuses_the_early_pass(asr, asr_pool, speech):
    audio = speech("Good morning.")
    transcriber = TurnTranscriber(asr, asr_pool)
    early = transcriber.start_early(audio)
    taken = transcriber.take_early()
    assert taken is early
    transcriber.reset()  # a new utterance starting must not cancel the handed-over pass
    text = await transcriber.final(np.concatenate([audio, np.zeros(4000, np.float32)]), taken)
    assert early.done() and not early.cancelled() and text == early.result()
    assert "good morning" in normalise(text)


async def test_early_pass_is_not_reused_after_more_speech(asr, asr_pool, speech):
    first, second = speech("Good morning."), speech("How are you?")
    transcriber = TurnTranscriber(asr, asr_pool)
    await transcriber.start_early(first)
    transcriber.invalidate_early()
    assert transcriber.take_early() is None
    text = await transcriber.final(np.concatenate([first, second]))
    assert "how are you" in normalise(text)


async def test_partials_are_rate_limited(asr, asr_pool, speech):
    transcriber = TurnTranscriber(asr, asr_pool)
    audio = speech("What is two plus two?")
    assert transcriber.partial_due(len(audio))
    partial = asyncio.create_task(transcriber.partial(audio))
    await asyncio.sleep(0)
    assert not transcriber.partial_due(len(audio) * 2)  # one at a time
    await partial
    assert not transcriber.partial_due(len(audio) + 100)  # not enough new audio
    assert transcriber.partial_due(len(audio) + 8000)


def test_ends_sentence():
    assert ends_sentence("Hello there.") and ends_sentence("Really?") and ends_sentence('He said "stop!"')
    assert not ends_sentence("and then") and not ends_sentence("")


def test_cut_repetition():
    from avatalk.streaming.asr import cut_repetition

    assert cut_repetition([1, 2, 3, 4, 1, 2, 3, 4, 1, 2]) == [1, 2, 3, 4]
    assert cut_repetition([1, 2, 3, 4, 5]) == [1, 2, 3, 4, 5]
    assert cut_repetition([7, 7, 7]) == [7, 7, 7]  # "no, no, no" is not a loop of the whole text


@pytest.mark.parametrize(
    "sentence",
    ["What is the capital of France?", "Tell me a fun fact about cats.", "I would like to book a table for two people tonight."],
)
def test_short_context_matches_the_full_window(sentence, speech, asr, full_window_asr):
    assert asr.settings.short_context and not full_window_asr.settings.short_context
    audio = speech(sentence)
    assert normalise(asr.transcribe(audio)) == normalise(full_window_asr.transcribe(audio))


@pytest.fixture(scope="module")
def full_window_asr() -> WhisperASR:
    return WhisperASR(Settings().asr_model_path(), ASRSettings(short_context=False))

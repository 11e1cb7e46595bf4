"""TTS backends: piper (real voice), espeak-ng (real binary), OpenAI-compatible (fake server)."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from fakes import fake_server, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.tts import TTS, EspeakTTS, OpenAICompatibleTTS, PiperTTS, TTSError, WavStreamDecoder, create_tts


def wav_bytes(samples: np.ndarray, sample_rate: int, *, channels: int = 1, streaming: bool = False) -> bytes:
    """A 16-bit PCM WAV; ``streaming`` writes 0xFFFFFFFF sizes like live encoders do."""
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    riff_size = 0xFFFFFFFF if streaming else 36 + len(data)
    data_size = 0xFFFFFFFF if streaming else len(data)
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"LIST"
        + struct.pack("<I", 5)
        + b"INFOx\x00"  # odd-sized chunk with its pad byte
        + b"data"
        + struct.pack("<I", data_size)
        + data
    )


def tone(seconds: float, sample_rate: int) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def executors() -> Iterator[Executors]:
    pools = Executors.create()
    yield pools
    pools.shutdown()


async def collect(tts: TTS, text: str) -> np.ndarray:
    chunks = [chunk async for chunk in tts.synthesize(text)]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)




# --- WAV decoding ---------------------------------------------------------


def test_wav_decoder_byte_by_byte_with_streaming_header() -> None:
    samples = tone(0.1, 16000)
    decoder = WavStreamDecoder()
    pieces = [decoder.feed(bytes([byte])) for byte in wav_bytes(samples, 16000, streaming=True)]
    decoder.finish()
    decoded = np.concatenate(pieces)
    assert decoder.sample_rate == 16000
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, samples, atol=1e-4)


def test_wav_decoder_stereo_is_mixed_to_mono_and_trailing_chunks_ignored() -> None:
    left = tone(0.05, 8000)
    stereo = np.stack([left, left], axis=1).reshape(-1)
    data = wav_bytes(stereo, 8000, channels=2) + b"JUNK" + struct.pack("<I", 4) + b"\x7f\x7f\x7f\x7f"
    decoder = WavStreamDecoder()
    decoded = decoder.feed(data)
    assert decoder.channels == 2
    np.testing.assert_allclose(decoded, left, atol=1e-4)


def test_wav_decoder_float32() -> None:
    samples = tone(0.02, 24000)
    fmt = struct.pack("<HHIIHH", 3, 1, 24000, 24000 * 4, 4, 32)
    data = samples.astype("<f4").tobytes()
    wav = b"RIFF" + struct.pack("<I", 0) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
    wav += b"data" + struct.pack("<I", len(data)) + data
    np.testing.assert_array_equal(WavStreamDecoder().feed(wav), samples)


def test_wav_decoder_rejects_non_wav() -> None:
    with pytest.raises(TTSError, match="not a WAV"):
        WavStreamDecoder().feed(b"ID3\x03 this is an mp3 file")
    decoder = WavStreamDecoder()
    decoder.feed(b"RIFF")
    with pytest.raises(TTSError, match="not a complete WAV"):
        decoder.finish()


# --- piper ----------------------------------------------------------------


@pytest.fixture(scope="module")
def piper(executors: Executors) -> PiperTTS:
    tts = create_tts(Settings(), executors)
    assert isinstance(tts, PiperTTS)
    return tts


@pytest.mark.slow
async def test_piper_speaks_a_short_sentence(piper: PiperTTS) -> None:
    audio = await collect(piper, "Hello there.")
    assert piper.sample_rate == 22050
    assert audio.dtype == np.float32
    assert 0.4 < len(audio) / piper.sample_rate < 3.0
    assert np.abs(audio).max() <= 1.0
    assert float(np.sqrt(np.mean(audio**2))) > 0.02


@pytest.mark.slow
async def test_piper_yields_a_chunk_per_sentence(piper: PiperTTS) -> None:
    chunks = [chunk async for chunk in piper.synthesize("It is sunny. It will rain later.")]
    assert len(chunks) == 2


@pytest.mark.slow
async def test_piper_concurrent_use(piper: PiperTTS) -> None:
    first, second = await asyncio.gather(collect(piper, "One voice."), collect(piper, "Another voice at once."))
    assert len(first) > 0 and len(second) > len(first)


@dataclass
class SentencesForTest:
    """What piper's own per-sentence generator did for each call: sentences made, and whether it was closed."""

    made: list[int] = field(default_factory=list)
    closed: list[threading.Event] = field(default_factory=list)


def count_sentences(piper: PiperTTS, monkeypatch: pytest.MonkeyPatch) -> SentencesForTest:
    """Wrap the voice's ``synthesize`` (counting only) to see, without timing, when a synthesis stops."""
    voice = piper._voice
    original = voice.synthesize
    seen = SentencesForTest()

    def synthesize(text: str, *args: object, **kwargs: object) -> Iterator[object]:
        index = len(seen.made)
        seen.made.append(0)
        seen.closed.append(threading.Event())
        try:
            for chunk in original(text, *args, **kwargs):
                seen.made[index] += 1
                yield chunk
        finally:
            seen.closed[index].set()

    monkeypatch.setattr(voice, "synthesize", synthesize)
    return seen


#: Sentences a stopped synthesis may have made: the hand-off queue (4), the one handed over, the one in progress.
SENTENCES_IN_FLIGHT = 6


@pytest.mark.slow
async def test_piper_stops_when_consumer_leaves(piper: PiperTTS, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = count_sentences(piper, monkeypatch)
    text = " ".join(f"This is sentence number {index} of a long reply." for index in range(200))
    stream = piper.synthesize(text)
    assert isinstance(stream, AsyncIterator)
    first = await anext(stream)
    assert first.size > 0
    await stream.aclose()
    audio = await collect(piper, "Still working.")
    assert audio.size > 0 and seen.made[1] == 1
    # The long synthesis was closed with a handful of its two hundred sentences made.
    assert await asyncio.to_thread(seen.closed[0].wait, 30)
    assert 1 <= seen.made[0] <= SENTENCES_IN_FLIGHT, seen.made


@pytest.mark.slow
async def test_piper_cancelled_task(piper: PiperTTS, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = count_sentences(piper, monkeypatch)
    text = " ".join(f"Sentence {index} keeps the voice busy for a while." for index in range(200))
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in piper.synthesize(text):
            got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await collect(piper, "Fine.")).size > 0
    assert await asyncio.to_thread(seen.closed[0].wait, 30)
    assert 1 <= seen.made[0] <= SENTENCES_IN_FLIGHT, seen.made


@pytest.mark.slow
async def test_piper_empty_text_yields_nothing(piper: PiperTTS) -> None:
    assert [chunk async for chunk in piper.synthesize("  ")] == []


def test_piper_missing_voice(tmp_path: Path, executors: Executors) -> None:
    with pytest.raises(TTSError, match="does not exist"):
        PiperTTS(tmp_path / "nope.onnx", executors.tts)


# --- espeak-ng ------------------------------------------------------------

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")


@needs_espeak
async def test_espeak_speaks(executors: Executors) -> None:
    tts = create_tts(Settings(tts={"backend": "espeak"}), executors)
    assert isinstance(tts, EspeakTTS)
    audio = await collect(tts, "Hello there.")
    assert tts.sample_rate == 22050
    assert 0.3 < len(audio) / tts.sample_rate < 3.0
    assert float(np.sqrt(np.mean(audio**2))) > 0.01


@needs_espeak
async def test_espeak_text_is_not_taken_for_an_option() -> None:
    audio = await collect(EspeakTTS(), "--help me please")
    assert audio.size > 0


@needs_espeak
async def test_espeak_cancellation_kills_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing the stream mid-sentence ends the espeak-ng child: killed and reaped, not left reading."""
    import signal

    spawned: list[asyncio.subprocess.Process] = []
    spawn = asyncio.create_subprocess_exec

    async def spawn_and_keep(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
        process = await spawn(*args, **kwargs)  # type: ignore[arg-type]
        spawned.append(process)
        return process

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spawn_and_keep)
    tts = EspeakTTS()
    stream = tts.synthesize(" ".join(["A long text for espeak to read aloud."] * 50))
    await anext(stream)
    [process] = spawned
    assert process.returncode is None  # still speaking when the consumer gives up
    await stream.aclose()
    assert process.returncode == -signal.SIGKILL  # killed, not finished
    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)  # and reaped: no such process any more


def test_espeak_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TTSError, match="espeak-ng is not installed"):
        EspeakTTS()


# --- OpenAI-compatible ----------------------------------------------------


def fake_speech_app(requests: list[dict[str, object]]) -> Starlette:
    """A fake speech server: WAV at 16 kHz in small streamed pieces, or errors on request."""

    async def speech(request: Request) -> Response:
        body = await request.json()
        requests.append({"body": body, "authorization": request.headers.get("authorization")})
        if body["input"] == "fail":
            return PlainTextResponse("voice model crashed: out of memory", status_code=500)
        wav = wav_bytes(tone(0.5, 16000), 16000, streaming=True)

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(wav), 1001):
                yield wav[start : start + 1001]
                await asyncio.sleep(0)

        return StreamingResponse(pieces(), media_type="audio/wav")

    return Starlette(routes=[Route("/v1/audio/speech", speech, methods=["POST"])])


async def test_openai_tts_against_fake_server(executors: Executors) -> None:
    requests: list[dict[str, object]] = []
    with fake_server(fake_speech_app(requests)) as base_url:
        settings = Settings(
            tts={"backend": "openai", "openai": {"base_url": base_url, "api_key": "sk-test", "model": "kokoro"}},
            persona={"voice": "af_bella"},
        )
        tts = create_tts(settings, executors)
        assert isinstance(tts, OpenAICompatibleTTS)
        assert tts.sample_rate == 24000  # documented default before the first reply
        chunks = [chunk async for chunk in tts.synthesize("Hello there.")]
        await tts.aclose()
    assert tts.sample_rate == 16000
    assert len(chunks) > 1  # decoded as it streamed
    np.testing.assert_allclose(np.concatenate(chunks), tone(0.5, 16000), atol=1e-4)
    assert requests == [
        {
            "body": {"model": "kokoro", "input": "Hello there.", "voice": "af_bella", "response_format": "wav"},
            "authorization": "Bearer sk-test",
        }
    ]


async def test_openai_tts_http_error_carries_server_text() -> None:
    with fake_server(fake_speech_app([])) as base_url:
        tts = OpenAICompatibleTTS(base_url)
        with pytest.raises(TTSError, match=r"HTTP 500.*out of memory"):
            await collect(tts, "fail")
        await tts.aclose()


async def test_openai_tts_dead_server() -> None:
    tts = OpenAICompatibleTTS(f"http://127.0.0.1:{free_port()}/v1", timeout_s=5)
    with pytest.raises(TTSError, match="unreachable: connection refused"):  # refused at once, not "timed out"
        await collect(tts, "Hello.")
    await tts.aclose()

"""espeak-ng as a TTS backend: robotic, but tiny, instant and many languages.

The ``espeak-ng`` program writes a WAV to stdout as it synthesises. It runs
as an asyncio subprocess: the synthesis happens in that process, not in any
thread of avatalk, and the event loop only reads the pipe, so no executor is
involved. The WAV is decoded as it arrives (a chunk per read of the pipe, up
to 8 KiB, about 0.19 s of audio), and the process is killed when the consumer
goes away (barge-in).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator
from typing import Self

import numpy as np

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.tts.base import TTS, TTSError
from avatalk.tts.wav import WavStreamDecoder

logger = logging.getLogger(__name__)

# espeak-ng always synthesises at this rate.
_ESPEAK_SAMPLE_RATE = 22050
_READ_BYTES = 8192


class EspeakTTS(TTS):
    """Runs ``espeak-ng --stdout`` once per sentence."""

    name = "espeak"

    def __init__(self, voice: str = "en", program: str = "espeak-ng") -> None:
        """Find ``program`` (on PATH, or a path); raises ``TTSError`` when it is not there."""
        binary = shutil.which(program)
        if binary is None:
            raise TTSError(
                f"espeak-ng is not installed (no {program!r} found; e.g. `apt-get install espeak-ng`); "
                "install it, set tts.espeak.program, or choose another TTS backend"
            )
        self._binary = binary
        self.voice = voice
        self._sample_rate = _ESPEAK_SAMPLE_RATE

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> Self:
        """The program of ``tts.espeak`` speaking ``persona.voice`` (else the persona's language).

        ``executors`` is not used: synthesis runs in the espeak-ng process.
        """
        return cls(voice=settings.persona.voice or settings.persona.language, program=settings.tts.espeak.program)

    @property
    def sample_rate(self) -> int:
        """espeak-ng's output rate (updated from the WAV header if it ever differs)."""
        return self._sample_rate

    async def synthesize(self, text: str) -> AsyncIterator[np.ndarray]:
        """Speak ``text``; the text goes through stdin so it is never taken for an option."""
        text = text.strip()
        if not text:
            return
        process = await asyncio.create_subprocess_exec(
            self._binary,
            "--stdout",
            "-v",
            self.voice,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdin is not None and process.stdout is not None and process.stderr is not None
        try:
            process.stdin.write(text.encode("utf-8"))
            await process.stdin.drain()
            process.stdin.close()
            decoder = WavStreamDecoder()
            while data := await process.stdout.read(_READ_BYTES):
                samples = decoder.feed(data)
                if decoder.sample_rate is not None:
                    self._sample_rate = decoder.sample_rate
                if samples.size:
                    yield samples
            errors = (await process.stderr.read()).decode("utf-8", errors="replace").strip()
            if await process.wait() != 0:
                raise TTSError(f"espeak-ng failed with exit code {process.returncode}: {errors[:300]}")
            decoder.finish()
        except (BrokenPipeError, ConnectionResetError) as error:
            raise TTSError(f"espeak-ng stopped unexpectedly (voice {self.voice!r}?): {error}") from error
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

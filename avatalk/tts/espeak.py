"""espeak-ng as a TTS backend: robotic, but tiny, instant and many languages.

The ``espeak-ng`` program writes a WAV to stdout; it is run as an asyncio
subprocess so nothing blocks the event loop, its output is decoded as it
arrives, and it is killed when the consumer goes away (barge-in).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator

import numpy as np

from avatalk.tts.base import TTS, TTSError, WavStreamDecoder

logger = logging.getLogger(__name__)

# espeak-ng always synthesises at this rate.
_ESPEAK_SAMPLE_RATE = 22050
_READ_BYTES = 8192


class EspeakTTS(TTS):
    """Runs ``espeak-ng --stdout`` once per sentence."""

    name = "espeak"

    def __init__(self, voice: str = "en") -> None:
        """Find the binary; raises ``TTSError`` when espeak-ng is not installed."""
        binary = shutil.which("espeak-ng")
        if binary is None:
            raise TTSError(
                "espeak-ng is not installed (e.g. `apt-get install espeak-ng`); "
                "install it or choose another TTS backend"
            )
        self._binary = binary
        self.voice = voice
        self._sample_rate = _ESPEAK_SAMPLE_RATE

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

"""Any OpenAI-compatible speech server (``POST /audio/speech``).

Lets a deployment use a stronger voice served elsewhere (Kokoro-FastAPI,
openedai-speech, OpenAI itself). WAV is requested because it needs no codec
and its header carries the sample rate. The response is decoded as it
streams, a chunk per block of the HTTP body that completes some samples, so
a server that streams its audio is heard before it has finished the
sentence. The request is plain async I/O: no executor is involved, and a
consumer that goes away closes the connection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Self

import httpx
import numpy as np

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.http_errors import connect_failure_reason, shorten_error_text
from avatalk.tts.base import TTS, TTSError
from avatalk.tts.wav import WavStreamDecoder

logger = logging.getLogger(__name__)

DEFAULT_VOICE = "alloy"
# OpenAI's speech endpoint answers at 24 kHz; the real rate is read from the
# first WAV header and replaces this.
_DEFAULT_SAMPLE_RATE = 24000


class OpenAICompatibleTTS(TTS):
    """Synthesises through ``{base_url}/audio/speech`` with ``response_format: wav``."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "tts-1",
        voice: str = DEFAULT_VOICE,
        api_key: str | None = None,
        timeout_s: float = 20.0,
    ) -> None:
        """Prepare a connection pool; nothing is contacted until the first request."""
        self._url = base_url.rstrip("/") + "/audio/speech"
        self.model = model
        self.voice = voice
        self._timeout_s = timeout_s
        self._sample_rate = _DEFAULT_SAMPLE_RATE
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s))

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> Self:
        """The server of ``tts.openai`` speaking ``persona.voice``; ``tts.timeout_s`` bounds each request."""
        section = settings.tts.openai
        return cls(
            section.base_url,
            model=section.model,
            voice=settings.persona.voice or DEFAULT_VOICE,
            api_key=section.api_key,
            timeout_s=settings.tts.timeout_s,
        )

    @property
    def sample_rate(self) -> int:
        """Rate of the last WAV received; 24000 Hz until the first one arrives.

        It is updated before the first chunk of each reply is yielded, so a
        consumer reading it per chunk always gets the right rate.
        """
        return self._sample_rate

    async def synthesize(self, text: str) -> AsyncIterator[np.ndarray]:
        """Speak ``text`` with the configured model and voice."""
        text = text.strip()
        if not text:
            return
        payload = {"model": self.model, "input": text, "voice": self.voice, "response_format": "wav"}
        try:
            async with self._client.stream("POST", self._url, json=payload) as response:
                if not response.is_success:
                    body = (await response.aread()).decode("utf-8", errors="replace")
                    raise TTSError(
                        f"speech server at {self._url} answered HTTP {response.status_code}: {shorten_error_text(body)}"
                    )
                decoder = WavStreamDecoder()
                async for data in response.aiter_bytes():
                    samples = decoder.feed(data)
                    if decoder.sample_rate is not None:
                        self._sample_rate = decoder.sample_rate
                    if samples.size:
                        yield samples
                decoder.finish()
        except httpx.ConnectError as error:
            raise TTSError(f"speech server at {self._url} is unreachable: {connect_failure_reason(error)}") from error
        except httpx.TimeoutException as error:
            raise TTSError(f"speech server at {self._url} did not answer within {self._timeout_s:g} s") from error
        except httpx.HTTPError as error:
            raise TTSError(f"speech server at {self._url} failed: {type(error).__name__}: {error}") from error

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

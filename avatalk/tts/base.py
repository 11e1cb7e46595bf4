"""The speech-synthesis interface every backend implements.

The engine calls ``TTS.synthesize`` once per piece of the reply that the
sentence splitter has cut (a sentence, or a clause of a long one) and reads
the audio as an async stream of chunks. What "streaming" means, and so how
big a chunk is, depends on the backend:

- piper phonemizes the text, then yields one chunk per sentence it finds in
  it: for one sentence, one chunk, ready when the whole sentence is;
- espeak-ng yields what each read of its output pipe brings (at most 8 KiB,
  about 0.19 s of audio), from the first milliseconds on;
- the OpenAI-compatible backend yields the samples each block of the HTTP
  response completes, as early as the server sends them.

No backend yields an empty chunk. Audio is always mono float32 in [-1, 1]
at the backend's ``sample_rate``; the consumer resamples it to the rates it
needs. Backends are registered by name in ``avatalk.tts`` and chosen by
``settings.tts.backend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Self

import numpy as np

from avatalk.config import Settings
from avatalk.executors import Executors


class TTSError(Exception):
    """A speech-synthesis failure, worded for the person running the server."""


class TTS(ABC):
    """A text-to-speech voice, loaded once and shared by every session."""

    name: str

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> Self:
        """Build the backend from its section of ``settings.tts`` (and the persona's voice).

        Loading a local voice blocks for a moment: call this off the event
        loop at startup. Blocking synthesis later runs on ``executors.tts``.
        """

    @property
    @abstractmethod
    def sample_rate(self) -> int:
        """Sample rate of the audio ``synthesize`` yields, in Hz."""

    @abstractmethod
    def synthesize(self, text: str) -> AsyncIterator[np.ndarray]:
        """Yield ``text`` spoken, as one or more mono float32 chunks in [-1, 1].

        Implemented as an async generator; empty or whitespace-only text
        yields nothing. When the consumer goes away (``aclose()`` or
        cancellation) synthesis stops at the backend's next chunk at the
        latest (espeak-ng's process is killed at once), so barge-in frees the
        CPU for the next turn. Failures raise ``TTSError``.
        """

    async def aclose(self) -> None:
        """Free the voice or connections; the base version has nothing to free."""

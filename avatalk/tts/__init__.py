"""Speech synthesis: backends behind one streaming interface.

``TTS_BACKENDS`` maps each ``settings.tts.backend`` name to its class. A new
provider is one module with a ``TTS`` subclass (``<Provider>TTS``, built by
its ``from_settings``), one line here, and its settings section in
``avatalk/config/conversation.py``. Backends import their heavy library (piper,
onnxruntime) only when a voice is loaded, so importing this package is cheap.
"""

from __future__ import annotations

import logging

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.tts.base import TTS, TTSError
from avatalk.tts.espeak import EspeakTTS
from avatalk.tts.openai_compatible import OpenAICompatibleTTS
from avatalk.tts.piper import PiperTTS
from avatalk.tts.wav import WavStreamDecoder

logger = logging.getLogger(__name__)

TTS_BACKENDS: dict[str, type[TTS]] = {
    "espeak": EspeakTTS,
    "openai": OpenAICompatibleTTS,
    "piper": PiperTTS,
}


def create_tts(settings: Settings, executors: Executors) -> TTS:
    """Build the backend named by ``settings.tts.backend`` from its settings section.

    Loading a local voice blocks for a moment: call this off the event loop
    at startup. In-process backends synthesise on ``executors.tts``.
    """
    name = settings.tts.backend
    backend = TTS_BACKENDS.get(name)
    if backend is None:
        raise TTSError(f"unknown TTS backend {name!r}; choose one of {', '.join(sorted(TTS_BACKENDS))}")
    logger.info("loading TTS backend %s", name)
    return backend.from_settings(settings, executors)


__all__ = [
    "TTS",
    "TTS_BACKENDS",
    "EspeakTTS",
    "OpenAICompatibleTTS",
    "PiperTTS",
    "TTSError",
    "WavStreamDecoder",
    "create_tts",
]

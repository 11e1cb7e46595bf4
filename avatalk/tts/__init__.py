"""Speech synthesis: backends behind one streaming interface.

Each backend module imports its heavy library (piper/onnxruntime) only when a
voice is loaded, so importing this package is cheap.
"""

from avatalk.tts.base import TTS, TTSError, WavStreamDecoder, create_tts
from avatalk.tts.espeak import EspeakTTS
from avatalk.tts.openai_compatible import OpenAICompatibleTTS
from avatalk.tts.piper import PiperTTS

__all__ = [
    "TTS",
    "EspeakTTS",
    "OpenAICompatibleTTS",
    "PiperTTS",
    "TTSError",
    "WavStreamDecoder",
    "create_tts",
]

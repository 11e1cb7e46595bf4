"""The models a server loads once and shares across sessions."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from avatalk.avatars.renderers import Renderer, create_renderer
from avatalk.config import Settings
from avatalk.llm import LLM, create_llm
from avatalk.streaming.asr import WhisperASR
from avatalk.streaming.vad import SileroVAD
from avatalk.tts import TTS, create_tts

logger = logging.getLogger(__name__)


@dataclass
class EngineModels:
    """VAD, ASR, LLM, TTS and the lip-sync renderer: each thread-safe or internally serialised."""

    vad: SileroVAD
    asr: WhisperASR
    llm: LLM
    tts: TTS
    renderer: Renderer | None = None

    @classmethod
    def load(cls, settings: Settings) -> EngineModels:
        """Load every model (blocking, seconds): run it in a worker thread."""
        started = time.perf_counter()
        models = cls(
            vad=SileroVAD(settings.vad_model_path()),
            asr=WhisperASR(settings.asr_model_path(), settings.asr),
            llm=create_llm(settings),
            tts=create_tts(settings),
            renderer=create_renderer(settings.avatars.renderer),
        )
        logger.info("models loaded in %.1f s", time.perf_counter() - started)
        return models

    async def aclose(self) -> None:
        await self.llm.aclose()
        await self.tts.aclose()

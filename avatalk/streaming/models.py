"""The models a server loads once and shares across sessions."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from avatalk.avatars.renderers import Renderer, create_renderer
from avatalk.config import PersonaSettings, Settings
from avatalk.executors import Executors, run_in
from avatalk.llm import LLM, DialogueMemory, LLMError, create_llm
from avatalk.media.timebase import ENGINE_SAMPLE_RATE
from avatalk.streaming.asr import WhisperASR
from avatalk.streaming.smart_turn import SmartTurnModel
from avatalk.streaming.vad import SileroVAD
from avatalk.tts import TTS, TTSError, create_tts

logger = logging.getLogger(__name__)


@dataclass
class EngineModels:
    """VAD, ASR, LLM, TTS and the lip-sync renderer: each thread-safe or internally serialised."""

    vad: SileroVAD
    asr: WhisperASR
    llm: LLM
    tts: TTS
    renderer: Renderer | None = None
    #: The semantic end-of-turn model; None: silence rules only (not installed, or ``turns.semantic`` off).
    turn: SmartTurnModel | None = None
    #: The named pools the models run their blocking work on.
    executors: Executors = field(default_factory=Executors.create)

    @classmethod
    def load(cls, settings: Settings) -> EngineModels:
        """Load every model (blocking, seconds): run it in a worker thread."""
        started = time.perf_counter()
        pools = settings.executors
        if settings.avatars.renderer == "musetalk":
            # Each MuseTalk session's render call waits on its pool thread for the GPU batch that holds
            # its frame: one thread per session the GPU may serve, or sessions would queue for threads.
            pools = pools.model_copy(update={"render": max(pools.render, settings.musetalk.max_sessions)})
        executors = Executors.create(pools)
        models = cls(
            vad=SileroVAD(settings.vad_model_path()),
            asr=WhisperASR(settings.asr_model_path(), settings.asr),
            llm=create_llm(settings, executors),
            tts=create_tts(settings, executors),
            renderer=create_renderer(settings.avatars.renderer, settings.musetalk),
            turn=load_smart_turn(settings),
            executors=executors,
        )
        logger.info("models loaded in %.1f s", time.perf_counter() - started)
        return models

    async def warm_up(self, persona: PersonaSettings) -> None:
        """Run each model once so the first user does not pay for cold caches.

        The LLM evaluates the persona's prompt and examples, the prefix every
        session's prompt starts with (llama.cpp keeps it as a reusable prefix;
        llama-server fills each of its slots with it), piper and Whisper
        allocate their buffers. A failing backend (e.g. a remote server that
        is down) only logs: sessions report it.
        """
        started = time.perf_counter()
        try:
            prefix = DialogueMemory(
                persona.system_prompt, 0, 0, self.llm.count_tokens, examples=persona.examples
            ).preview_user("Hello!")
            await self.llm.warm_up(prefix)
            async for _audio in self.tts.synthesize("Hello."):
                pass
            await run_in(self.executors.asr, self.asr.transcribe, np.zeros(ENGINE_SAMPLE_RATE, dtype=np.float32))
            if self.turn is not None:
                await run_in(self.executors.turn, self.turn.complete_probability, np.zeros(ENGINE_SAMPLE_RATE, np.float32))
        except (LLMError, TTSError) as error:
            logger.warning("warm-up skipped: %s", error)
        logger.info("models warmed up in %.1f s", time.perf_counter() - started)

    async def aclose(self) -> None:
        await self.llm.aclose()
        await self.tts.aclose()
        self.executors.shutdown()


def load_smart_turn(settings: Settings) -> SmartTurnModel | None:
    """The smart-turn model, or None (with the reason logged) when it is off or not installed."""
    if not settings.turns.semantic:
        return None
    try:
        return SmartTurnModel(settings.smart_turn_model_path())
    except FileNotFoundError as error:
        logger.warning("semantic end of turn off, silence rules only: %s", error)
        return None

"""Language models: backends behind one streaming interface, dialogue memory, sentence splitting.

``LLM_BACKENDS`` maps each ``settings.llm.backend`` name to its class. A new
provider is one module with an ``LLM`` subclass (``<Provider>LLM``, built by
its ``from_settings``), one line here, and its settings section in
``avatalk/config/conversation.py``. Backend classes import their heavy libraries
(llama.cpp, torch) only when a model is loaded, so importing this package is
cheap.
"""

from __future__ import annotations

import logging

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.llm.base import LLM, ChatMessage, LLMError
from avatalk.llm.llama_cpp import LlamaCppLLM
from avatalk.llm.llama_server import LlamaServerLLM
from avatalk.llm.memory import DialogueMemory
from avatalk.llm.openai_compatible import OpenAICompatibleLLM
from avatalk.llm.sentences import SentenceSplitter, clean_for_speech
from avatalk.llm.transformers_llm import TransformersLLM

logger = logging.getLogger(__name__)

LLM_BACKENDS: dict[str, type[LLM]] = {
    "llama-server": LlamaServerLLM,
    "llama-cpp": LlamaCppLLM,
    "openai": OpenAICompatibleLLM,
    "transformers": TransformersLLM,
}


def create_llm(settings: Settings, executors: Executors) -> LLM:
    """Build the backend named by ``settings.llm.backend`` from its settings section.

    Loading a local model (or starting llama-server and waiting for its
    health) blocks for a moment: call this off the event loop at startup.
    Local backends run their generation on ``executors.llm``.
    """
    name = settings.llm.backend
    backend = LLM_BACKENDS.get(name)
    if backend is None:
        raise LLMError(f"unknown LLM backend {name!r}; choose one of {', '.join(sorted(LLM_BACKENDS))}")
    logger.info("loading LLM backend %s", name)
    return backend.from_settings(settings, executors)


__all__ = [
    "LLM",
    "LLM_BACKENDS",
    "ChatMessage",
    "DialogueMemory",
    "LLMError",
    "LlamaCppLLM",
    "LlamaServerLLM",
    "OpenAICompatibleLLM",
    "SentenceSplitter",
    "TransformersLLM",
    "clean_for_speech",
    "create_llm",
]

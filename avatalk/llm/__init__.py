"""Language models: backends behind one streaming interface, dialogue memory, sentence splitting.

Backend classes are exported too; their heavy libraries (llama.cpp, torch)
are imported only when a model is loaded, so importing this package is cheap.
"""

from avatalk.llm.base import LLM, ChatMessage, LLMError, create_llm
from avatalk.llm.llama_cpp import LlamaCppLLM
from avatalk.llm.memory import DialogueMemory
from avatalk.llm.openai_compatible import OpenAICompatibleLLM
from avatalk.llm.sentences import SentenceSplitter, clean_for_speech
from avatalk.llm.transformers_llm import TransformersLLM

__all__ = [
    "LLM",
    "ChatMessage",
    "DialogueMemory",
    "LLMError",
    "LlamaCppLLM",
    "OpenAICompatibleLLM",
    "SentenceSplitter",
    "TransformersLLM",
    "clean_for_speech",
    "create_llm",
]

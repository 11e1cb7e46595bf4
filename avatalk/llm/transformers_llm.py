"""Any local Hugging Face causal LM, run with transformers (CPU or CUDA).

For models that have no GGUF, or to use a GPU without a separate serving
engine. ``model.generate`` runs on the ``llm`` executor during the caller's
turn on the model (``ModelTurns``: sessions wait in asyncio, in arrival
order); a streamer hands each piece of decoded text to the event loop as it
is produced, and a stopping criterion ends generation at the next token once
the consumer has gone (barge-in). torch and transformers are optional
dependencies, imported only when this backend is chosen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any, Self

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.llm.base import LLM, ChatMessage, LLMError
from avatalk.threads import Emit, ModelTurns

logger = logging.getLogger(__name__)


class TransformersLLM(LLM):
    """A Hugging Face model folder loaded once (``local_files_only``) and shared."""

    name = "transformers"

    def __init__(
        self,
        model_path: Path,
        executors: Executors,
        *,
        device: str = "cpu",
        max_tokens: int = 96,
        temperature: float = 0.3,
    ) -> None:
        """Load tokenizer and model; raises ``LLMError`` on any failure, worded for the operator."""
        try:
            import torch
            import transformers
        except ImportError as error:
            raise LLMError(
                "the transformers LLM backend needs torch and transformers; "
                "install them with `pip install 'avatalk[transformers]'`"
            ) from error
        path = Path(model_path)
        if not path.is_dir():
            raise LLMError(f"transformers model folder {path} does not exist (set llm.transformers.model_path)")
        started = time.perf_counter()
        try:
            tokenizer: Any = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
            model: Any = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
            model.to(device)
            model.eval()
        except Exception as error:  # transformers raises many types for bad folders
            raise LLMError(f"could not load transformers model from {path}: {error}") from error
        self._tokenizer = tokenizer
        self._model = model
        self._transformers = transformers
        self._torch = torch
        self._device = device
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._turns = ModelTurns(executors.llm)
        self._closed = False
        logger.info("loaded %s on %s in %.2f s", path.name, device, time.perf_counter() - started)

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> Self:
        """The model folder of ``llm.transformers`` (required: the bundled default is a GGUF file)."""
        section = settings.llm.transformers
        if section.model_path is None:
            raise LLMError(
                "the transformers LLM backend needs llm.transformers.model_path set to a local "
                "Hugging Face model folder (AVATALK_LLM__TRANSFORMERS__MODEL_PATH)"
            )
        return cls(
            section.model_path,
            executors,
            device=section.device,
            max_tokens=settings.llm.max_tokens,
            temperature=settings.llm.temperature,
        )

    def _prompt(self, messages: list[ChatMessage]) -> str:
        """The model's chat template applied to ``messages``, or a plain transcript without one."""
        if getattr(self._tokenizer, "chat_template", None):
            return str(
                self._tokenizer.apply_chat_template(
                    [{"role": message.role, "content": message.content} for message in messages],
                    tokenize=False,
                    add_generation_prompt=True,
                )
            )
        lines = [f"{message.role}: {message.content}" for message in messages]
        return "\n".join([*lines, "assistant:"])

    async def stream(self, messages: list[ChatMessage], session_key: str | None = None) -> AsyncIterator[str]:
        """Stream the reply; see ``LLM.stream`` (one model context: ``session_key`` changes nothing)."""
        if self._closed:
            raise LLMError("the transformers model has been closed")
        try:
            prompt = self._prompt(messages)  # templates may reject a conversation, e.g. a system role
            deltas = self._turns.stream(lambda emit, stop: self._generate(prompt, emit, stop))
            async with aclosing(deltas):
                async for delta in deltas:
                    yield delta
        except Exception as error:
            raise LLMError(f"transformers generation failed: {type(error).__name__}: {error}") from error

    def _generate(self, prompt: str, emit: Emit[str], stop: threading.Event) -> None:
        """Blocking ``generate`` run on the ``llm`` executor; its streamer emits the text as it is decoded."""
        transformers = self._transformers
        inputs = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self._device)
        streamer = _emitting_streamer(transformers, self._tokenizer, emit)
        criteria = transformers.StoppingCriteriaList([_event_stopping_criteria(transformers, self._torch, stop)])
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": self._temperature} if self._temperature > 0 else {"do_sample": False}
        )
        pad_token_id = self._tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = self._tokenizer.eos_token_id
        with self._torch.inference_mode():
            self._model.generate(
                **inputs,
                streamer=streamer,
                max_new_tokens=self._max_tokens,
                stopping_criteria=criteria,
                pad_token_id=pad_token_id,
                **sampling,
            )

    def count_tokens(self, text: str) -> int:
        """Exact token count with the model's own tokenizer."""
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    async def aclose(self) -> None:
        """Drop the model once a running generation has finished (waiting in asyncio, like a session)."""
        if self._closed:
            return
        self._closed = True
        await self._turns.run(self._drop_model)

    def _drop_model(self) -> None:
        """Release the weights; on CUDA also the allocator's cached memory."""
        self._model = None
        if self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def _emitting_streamer(transformers: Any, tokenizer: Any, emit: Emit[str]) -> Any:
    """A ``TextStreamer`` that emits each piece of decoded text instead of printing it.

    ``TextStreamer`` decodes whole words (it holds back text until a space or
    the end), skipping the prompt and special tokens. A piece refused because
    the consumer has gone is dropped; the stopping criterion ends generation.
    Built at run time because transformers is imported lazily.
    """

    class EmittingStreamer(transformers.TextStreamer):  # type: ignore[misc]
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                emit(text)

    return EmittingStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _event_stopping_criteria(transformers: Any, torch: Any, stop: threading.Event) -> Any:
    """A ``StoppingCriteria`` that ends generation once ``stop`` is set.

    Built at run time because transformers and torch are imported lazily.
    """

    class EventStoppingCriteria(transformers.StoppingCriteria):  # type: ignore[misc]
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    return EventStoppingCriteria()

"""Any local Hugging Face causal LM, run with transformers (CPU or CUDA).

For models that have no GGUF, or to use a GPU without a separate serving
engine. ``model.generate`` runs in its own thread and streams through a
``TextIteratorStreamer``; a stopping criterion watches the consumer's stop
event, so a barge-in ends generation at the next token. torch and
transformers are optional dependencies, imported only when this backend is
chosen.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from avatalk.llm.base import LLM, ChatMessage, LLMError
from avatalk.threads import iterate_in_thread

logger = logging.getLogger(__name__)

# How long the streaming loop waits for a token before re-checking whether
# the consumer left or generation failed.
_POLL_S = 0.1


class TransformersLLM(LLM):
    """A Hugging Face model folder loaded once (``local_files_only``) and shared."""

    name = "transformers"

    def __init__(
        self,
        model_path: Path,
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
            raise LLMError(f"transformers model folder {path} does not exist (set llm.model_path)")
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
        self._lock = threading.Lock()
        self._closed = False
        logger.info("loaded %s on %s in %.2f s", path.name, device, time.perf_counter() - started)

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

    async def stream(self, messages: list[ChatMessage]) -> AsyncIterator[str]:
        """Stream the reply; see ``LLM.stream``."""
        if self._closed:
            raise LLMError("the transformers model has been closed")
        try:
            prompt = self._prompt(messages)  # templates may reject a conversation, e.g. a system role
            async for delta in iterate_in_thread(lambda stop: self._generate(prompt, stop)):
                yield delta
        except Exception as error:
            raise LLMError(f"transformers generation failed: {type(error).__name__}: {error}") from error

    def _generate(self, prompt: str, stop: threading.Event) -> Iterator[str]:
        """Blocking loop run in a worker thread: one generation at a time per model."""
        while not self._lock.acquire(timeout=_POLL_S):
            if stop.is_set():
                return
        try:
            if stop.is_set():
                return
            yield from self._generate_locked(prompt, stop)
        finally:
            self._lock.release()

    def _generate_locked(self, prompt: str, stop: threading.Event) -> Iterator[str]:
        """Run ``generate`` in a thread and relay its streamed text; ends it when ``stop`` is set."""
        transformers = self._transformers
        model = self._model  # aclose() may drop the attribute meanwhile
        inputs = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self._device)
        streamer = transformers.TextIteratorStreamer(
            self._tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=_POLL_S
        )
        # A generation that is abandoned partway (consumer gone) must end too.
        finished = threading.Event()
        criteria = transformers.StoppingCriteriaList(
            [_event_stopping_criteria(transformers, self._torch, stop, finished)]
        )
        sampling: dict[str, Any] = (
            {"do_sample": True, "temperature": self._temperature} if self._temperature > 0 else {"do_sample": False}
        )
        pad_token_id = self._tokenizer.pad_token_id
        if pad_token_id is None:
            pad_token_id = self._tokenizer.eos_token_id
        failures: list[BaseException] = []

        def run() -> None:
            try:
                with self._torch.inference_mode():
                    model.generate(
                        **inputs,
                        streamer=streamer,
                        max_new_tokens=self._max_tokens,
                        stopping_criteria=criteria,
                        pad_token_id=pad_token_id,
                        **sampling,
                    )
            except BaseException as error:  # re-raised in the streaming loop
                failures.append(error)
                streamer.end()

        worker = threading.Thread(target=run, name="transformers-generate", daemon=True)
        worker.start()
        try:
            while not stop.is_set():
                try:
                    text = next(streamer)
                except queue.Empty:
                    continue
                except StopIteration:
                    break
                if text:
                    yield text
        finally:
            finished.set()
            worker.join()
        if failures:
            raise failures[0]

    def count_tokens(self, text: str) -> int:
        """Exact token count with the model's own tokenizer."""
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    async def aclose(self) -> None:
        """Drop the model (a running generation keeps its reference until it ends); on CUDA free cached memory."""
        self._closed = True
        self._model = None
        if self._device.startswith("cuda"):
            self._torch.cuda.empty_cache()


def _event_stopping_criteria(transformers: Any, torch: Any, *events: threading.Event) -> Any:
    """A ``StoppingCriteria`` that ends generation once any of ``events`` is set.

    Built at run time because transformers and torch are imported lazily.
    """

    class EventStoppingCriteria(transformers.StoppingCriteria):  # type: ignore[misc]
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stopped = any(event.is_set() for event in events)
            return torch.full((input_ids.shape[0],), stopped, dtype=torch.bool, device=input_ids.device)

    return EventStoppingCriteria()

"""Any OpenAI-compatible chat server (vLLM, SGLang, Ollama, llama.cpp server).

This is how avatalk scales the language part past one machine: the model runs
in a serving engine and avatalk streams ``/chat/completions`` over HTTP. The
request is plain async I/O, so cancelling the consumer closes the connection,
which serving engines take as the signal to stop generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Self

import httpx

from avatalk.config import Settings
from avatalk.executors import Executors
from avatalk.http_errors import connect_failure_reason, shorten_error_text
from avatalk.llm.base import LLM, ChatMessage, LLMError

logger = logging.getLogger(__name__)

class OpenAICompatibleLLM(LLM):
    """Streams chat completions from ``{base_url}/chat/completions``."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str = "default",
        api_key: str | None = None,
        max_tokens: int = 96,
        temperature: float = 0.0,
        timeout_s: float = 20.0,
    ) -> None:
        """Prepare the connection settings; nothing is contacted until the first request."""
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._max_tokens = max_tokens
        self._temperature = temperature
        self._timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # One connection pool per event loop: pooled connections belong to the loop that opened
        # them, and one loaded backend may serve several loops (apps run in threads by tests).
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def from_settings(cls, settings: Settings, executors: Executors) -> Self:
        """The server of ``llm.openai``; requests are plain async I/O, so no executor is used."""
        section = settings.llm.openai
        return cls(
            section.base_url,
            model=section.model,
            api_key=section.api_key,
            max_tokens=settings.llm.max_tokens,
            temperature=settings.llm.temperature,
            timeout_s=section.timeout_s,
        )

    def _client(self) -> httpx.AsyncClient:
        """This event loop's connection pool."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.is_closed:
            client = httpx.AsyncClient(headers=self._headers, timeout=httpx.Timeout(self._timeout_s))
            self._clients[loop] = client
        return client

    def _completions_url(self) -> str:
        """Where requests go (a supervised local server may move to another port when restarted)."""
        return self._url

    async def stream(self, messages: list[ChatMessage], session_key: str | None = None) -> AsyncIterator[str]:
        """Stream the reply; see ``LLM.stream`` (the server caches prefixes itself: ``session_key`` is unused)."""
        deltas = self._stream_from(messages, {})
        async with aclosing(deltas):
            async for delta in deltas:
                yield delta

    async def _stream_from(
        self,
        messages: list[ChatMessage],
        fields: dict[str, Any],
        max_tokens: int | None = None,
        on_timings: Callable[[dict[str, Any]], None] | None = None,
    ) -> AsyncIterator[str]:
        """POST one streamed chat completion (with extra request ``fields``) and yield its text deltas.

        ``on_timings`` receives the ``timings`` object llama-server adds to its
        last chunk (prompt tokens evaluated and reused from the cache).
        """
        url = self._completions_url()
        payload = {
            "model": self._model,
            "messages": [{"role": message.role, "content": message.content} for message in messages],
            "stream": True,
            "max_tokens": max_tokens or self._max_tokens,
            "temperature": self._temperature,
            **fields,
        }
        try:
            async with self._client().stream("POST", url, json=payload) as response:
                if not response.is_success:
                    body = (await response.aread()).decode("utf-8", errors="replace")
                    raise LLMError(
                        f"LLM server at {url} answered HTTP {response.status_code}: {shorten_error_text(body)}"
                    )
                async for line in response.aiter_lines():
                    delta = self._parse_event_line(line, url, on_timings)
                    if delta is None:
                        return
                    if delta:
                        yield delta
        except httpx.ConnectError as error:
            raise LLMError(f"LLM server at {url} is unreachable: {connect_failure_reason(error)}") from error
        except httpx.TimeoutException as error:
            raise LLMError(f"LLM server at {url} did not answer within {self._timeout_s:g} s") from error
        except httpx.RemoteProtocolError as error:
            raise LLMError(f"LLM server at {url} closed the connection in the middle of the reply") from error
        except httpx.HTTPError as error:
            raise LLMError(f"LLM server at {url} failed: {type(error).__name__}: {error}") from error

    def _parse_event_line(
        self, line: str, url: str, on_timings: Callable[[dict[str, Any]], None] | None = None
    ) -> str | None:
        """The text delta of one SSE line: "" for lines without text, None at ``[DONE]``."""
        line = line.strip()
        if not line.startswith("data:"):
            return ""  # blank separators, comments, "event:" lines
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return None
        try:
            chunk: Any = json.loads(data)
        except json.JSONDecodeError as error:
            raise LLMError(f"LLM server at {url} sent a malformed event: {shorten_error_text(data)}") from error
        if not isinstance(chunk, dict):
            raise LLMError(f"LLM server at {url} sent a malformed event: {shorten_error_text(data)}")
        if "error" in chunk:
            raise LLMError(
                f"LLM server at {url} reported an error: {shorten_error_text(json.dumps(chunk['error']))}"
            )
        timings = chunk.get("timings")
        if on_timings is not None and isinstance(timings, dict):
            on_timings(timings)
        choices = chunk.get("choices") or []
        if not choices:
            return ""  # e.g. a final usage-only chunk
        content = (choices[0].get("delta") or {}).get("content")
        return content if isinstance(content, str) else ""

    async def aclose(self) -> None:
        """Close the connection pools (this event loop's politely; others' are dropped with their loops)."""
        clients = list(self._clients.items())
        self._clients.clear()
        running = asyncio.get_running_loop()
        for loop, client in clients:
            if loop is running:
                await client.aclose()

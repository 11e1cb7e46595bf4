"""Readable one-line errors from HTTP backends (the OpenAI-compatible LLM and TTS clients, the doctor)."""

from __future__ import annotations

import os

import httpx

_MAX_ERROR_TEXT = 300


def shorten_error_text(text: str) -> str:
    """``text`` on one line, cut to a length that fits in an error message."""
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 1] + "…"


def connect_failure_reason(error: httpx.ConnectError) -> str:
    """The operating system's reason for a failed connection ("connection refused").

    httpx reports only "All connection attempts failed"; the socket error
    that says why sits at the bottom of the exception chain.
    """
    reason = str(error) or "connection failed"
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:
            reason = os.strerror(cause.errno) if cause.errno > 0 else str(cause.strerror)
            return reason[:1].lower() + reason[1:]
        cause = cause.__cause__ or cause.__context__
    return reason

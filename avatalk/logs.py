"""Structured logs: one handler, text or JSON lines, with session and turn ids on every record.

Session and turn ids come from context variables that a ``logging.Filter``
copies onto every record. asyncio tasks inherit the context they were created
in, so setting ``session_id_var`` where a session starts labels the logs of the
tasks started from there; ``task_context`` labels a task explicitly wherever
it is created. This module sits below every other part (the engine labels its
tasks with it), so it imports nothing of avatalk.
"""

from __future__ import annotations

import contextvars
import json as jsonlib
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("avatalk_session_id", default=None)
turn_id_var: contextvars.ContextVar[int | None] = contextvars.ContextVar("avatalk_turn_id", default=None)


def task_context(session_id: str, turn_id: int | None = None) -> contextvars.Context:
    """A copy of the current context with the session's (and turn's) ids set, for a task of that session.

    ``asyncio.create_task(coro, context=task_context(self.id, turn_id))`` labels
    the task's logs, and those of the tasks it starts, wherever it was created
    (a WebRTC callback runs in aiortc's context, not the request's) and without
    changing the context of the task that created it.
    """
    context = contextvars.copy_context()
    context.run(session_id_var.set, session_id)
    context.run(turn_id_var.set, turn_id)
    return context


class ContextFilter(logging.Filter):
    """Adds ``session_id`` and ``turn_id`` to every record, unless ``extra=`` already set them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "session_id", None) is None:
            record.session_id = session_id_var.get()
        if getattr(record, "turn_id", None) is None:
            record.turn_id = turn_id_var.get()
        return True


# Attributes every LogRecord has; anything else on a record came from ``extra=``. (uvicorn adds
# ``color_message``, the message with terminal colour codes, which has no place in JSON.)
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_ID_FIELDS = ("session_id", "turn_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, ``extra=`` fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_") and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with ``[session turn]`` when the record has them."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        ids = [f"{key}={getattr(record, key)}" for key in _ID_FIELDS if getattr(record, key, None) is not None]
        return f"{line} [{' '.join(ids)}]" if ids else line


class _AvatalkHandler(logging.StreamHandler[TextIO]):
    """Marks the handler ``configure_logging`` installed, so calling it again replaces it."""


def configure_logging(level: str | int, json: bool) -> None:
    """Send all logs (uvicorn's too) to stderr as text or JSON lines, with session and turn ids.

    Run ``uvicorn`` with ``log_config=None`` afterwards, or it installs its
    own handlers over these.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _AvatalkHandler)]:
        root.removeHandler(handler)
    handler = _AvatalkHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True

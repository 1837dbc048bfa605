"""Structured logs that carry a request id from the API into the worker.

:func:`configure_logging` sets one handler on the root logger for every process (API, uvicorn,
Celery worker), ``json`` (one object a line) or ``text``. Every record gets ``ts``, ``level``,
``logger``, ``message`` and, when known, ``request_id``, ``job_id`` and ``attempt`` from a context
variable: the API's middleware binds the request id of each HTTP request (app/observability.py),
``core.queue.enqueue_job`` sends it in the task message's headers and the worker binds it, with the
job id, around the task (``worker/tasks.py``).
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, TextIO

from core.config import Settings, get_settings

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

# --- log context ---------------------------------------------------------------------------------

# request_id, job_id, attempt: whatever is known where the record is made. One immutable dict, so
# binding in a task or request never leaks into another (each asyncio task and thread has its own).
_log_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "modelpress_log_context", default=MappingProxyType({})
)
CONTEXT_FIELDS = ("request_id", "job_id", "attempt")


def sane_request_id(value: object) -> str | None:
    """``value`` if it may be used as a request id (1–128 of ``[A-Za-z0-9._-]``), else None."""
    return value if isinstance(value, str) and _SANE_REQUEST_ID.fullmatch(value) else None


def new_request_id() -> str:
    """32 random hex digits (the format of ``uuid4().hex``, without building a UUID)."""
    return os.urandom(16).hex()


def current_request_id() -> str | None:
    return _log_context.get().get("request_id")


def bind(**values: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Add fields to the log context of this thread or task; None values are left out. Returns
    the token that :func:`unbind` takes to restore what was there before."""
    merged = {**_log_context.get(), **{k: v for k, v in values.items() if v is not None}}
    return _log_context.set(merged)


def unbind(token: contextvars.Token[Mapping[str, Any]]) -> None:
    _log_context.reset(token)


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    token = bind(**values)
    try:
        yield
    finally:
        unbind(token)


# --- log format ----------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is kept.
# (uvicorn adds ``color_message``: the message with ANSI colours.)
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class ContextFilter(logging.Filter):
    """Copies the log context onto each record (``extra=`` given at the call wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _log_context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


# json.dumps with options builds a new encoder on every call; the access log writes a line per request.
_json_encode = json.JSONEncoder(ensure_ascii=False, default=str).encode


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601), level, logger, message, the context fields
    that are known, any ``extra=`` fields, and ``exc_info`` (the formatted traceback) if any."""

    _second: tuple[int, str] = (-1, "")  # (a whole second, its "YYYY-MM-DDTHH:MM:SS")

    def _ts(self, created: float) -> str:
        """``created`` as ``2026-11-29T13:53:49.596Z``: what ``datetime.fromtimestamp(created,
        timezone.utc).isoformat(timespec="milliseconds")`` gives (microseconds rounded half-even,
        then cut to milliseconds)."""
        whole = math.floor(created)
        micros = round((created - whole) * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        if self._second[0] != whole:
            self._second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        return f"{self._second[1]}.{micros // 1000:03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._ts(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and not key.startswith("_") and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return _json_encode(out)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message>`` then the known context fields as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None) is not None)
        if not ctx:
            return line
        head, sep, rest = line.partition("\n")  # keep a traceback below the first line
        return f"{head} [{ctx}]{sep}{rest}"


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler configure_logging installed, so calling it again replaces it."""


def configure_logging(settings: Settings | None = None) -> None:
    """Log every record of this process to stderr in ``MODELPRESS_LOG_FORMAT`` at
    ``MODELPRESS_LOG_LEVEL``. uvicorn's and Celery's loggers propagate here (``serve`` runs uvicorn
    with ``log_config=None``; the worker connects Celery's ``setup_logging`` signal)."""
    s = settings or get_settings()
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if s.log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(s.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True

"""Logging for the commands: one handler on stderr, text or JSON, with request ids.

The library only adds a ``NullHandler`` to ``batchkit``; the commands configure the root
logger here, so batchkit's lines, uvicorn's and the model's own all go to stderr in one format.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from .._core import ContextFilter

__all__ = ("FORMATS", "LEVELS", "JsonFormatter", "TextFormatter", "announce", "configure")

LEVELS = ("debug", "info", "warning", "error", "critical")
ACCESS_LOGGER = logging.getLogger("batchkit").getChild("access").name
FORMATS = ("text", "json")

# The attributes every LogRecord has: the rest were given by ``extra=`` and go into JSON lines.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's message with terminal colours
}
_IDS = ("request_id", "trace_id", "span_id")


_configured = {"format": "text"}
_SERVE_LOGGER = logging.getLogger("batchkit").getChild("serve").name


def announce(message: str, **fields: Any) -> None:
    """Write ``message`` to stderr whatever the log level (a line scripts wait for), as
    uvicorn writes its own (text), or as one JSON object (json)."""
    if _configured["format"] == "json":
        record = logging.makeLogRecord(
            {"name": _SERVE_LOGGER, "levelname": "INFO", "msg": message, **fields}
        )
        line = JsonFormatter().format(record)
    else:
        line = f"INFO:     {message}"
    print(line, file=sys.stderr, flush=True)


def _handler(stream: TextIO, fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    return handler


class TextFormatter(logging.Formatter):
    """``time level logger [request id] message``, then the traceback if any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the request's ids, every field given by ``extra=``, and ``exception`` (the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(
                record.created, datetime.timezone.utc
            ).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                if key in _IDS and value == "-":
                    continue  # not about a request
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(
    level: str = "info",
    fmt: str = "text",
    stream: TextIO | None = None,
    access_stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record at ``level`` or above to ``stream`` (stderr) in format ``fmt``
    (``text`` or ``json``); replace the handlers the root logger had. Return the handler.

    ``access_stream``: where the access lines (``batchkit.access``) go instead, in the same
    format (``batchkit serve``: stdout, as uvicorn's access lines did).
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {LEVELS}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, got {fmt!r}")
    _configured["format"] = fmt
    handler = _handler(stream if stream is not None else sys.stderr, fmt)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers.clear()
    access.propagate = access_stream is None
    if access_stream is not None:
        access.addHandler(_handler(access_stream, fmt))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # uvicorn's, in our format
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
        uvicorn_logger.setLevel(logging.NOTSET)
    return handler

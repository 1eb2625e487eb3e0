"""Logging: every event from every source to stdout, one line each, rendered by structlog."""

from __future__ import annotations

import functools
import json
import logging
import logging.config
import re
import sys
import threading
import time
import uuid
from types import TracebackType
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from . import trace
from .config import Config

_LEVELS = {
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "exception": "ERROR",
    "critical": "CRITICAL",
    "fatal": "CRITICAL",
}
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Unprintable characters become JSON's escapes (\n, \u001b, a surrogate pair above U+FFFF),
# which logfmt parsers (go-logfmt, Loki's) decode in quoted values. A message or a key is not
# quoted: no `=` or `"` in it (a field to a parser), nor U+FFFD (go-logfmt's bad key mark).
_IN_VALUE = (("\\", "\\\\"), ('"', '\\"'))
_IN_MESSAGE = (("\\", "\\\\"), ('"', "\\u0022"), ("=", "\\u003d"), ("\ufffd", "\\ufffd"))
_IN_KEY = (*_IN_MESSAGE, (" ", "\\u0020"))
_BARE = re.compile(r'[^\s="\\]+')  # a printable value that needs no quotes

log = structlog.get_logger()


def configure(config: Config, stream: TextIO | None = None) -> None:
    """Send structlog events and stdlib records through one chain to one stream.

    structlog's own events are written directly (the cheap path every request takes);
    records from Flask, the servers, asyncpg and warnings reach the same renderer through
    one handler on the root logger. Call before the Flask app and the servers log anything.
    """
    stream = stream or sys.stdout
    renderer, exceptions = _renderer(config)
    shared = [structlog.contextvars.merge_contextvars, add_level, *_trace(config)]
    shared.append(_timestamper(config))
    structlog.configure(
        processors=[*shared, exceptions, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(config.log_level),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    logging.config.dictConfig(dict_config(config, stream))
    logging.captureWarnings(True)
    # Nothing renders a record's thread or process names: skip looking them up per record.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def dict_config(config: Config, stream: TextIO | None = None) -> dict[str, Any]:
    """The stdlib side as a dictConfig, which gunicorn applies again in its master and workers."""
    renderer, exceptions = _renderer(config)
    foreign_chain = [
        structlog.contextvars.merge_contextvars,
        add_level,
        structlog.stdlib.add_logger_name,
        *_trace(config),
        _timestamper(config),
    ]
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=foreign_chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exceptions,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    # hypercorn and gunicorn set their loggers' levels from their own `loglevel` after this
    # runs: the one handler every record reaches holds LOG_LEVEL, whatever a logger says.
    handler.setLevel(config.log_level)
    quiet = {"handlers": [], "propagate": False, "level": "CRITICAL"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {"stdout": {"()": lambda: handler}},
        "root": {"handlers": ["stdout"], "level": config.log_level},
        "loggers": {
            # The servers' own handlers go; their records propagate to ours. The app writes
            # the one access line per request, so the servers' access loggers stay silent.
            "gunicorn.error": {"handlers": [], "propagate": True},
            "hypercorn.error": {"handlers": [], "propagate": True},
            "gunicorn.access": quiet,
            "hypercorn.access": quiet,
        },
    }


def _trace(config: Config) -> list[Processor]:
    add_trace = trace.processor(config)
    return [] if add_trace is None else [add_trace]


def add_level(_: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    event_dict["level"] = _LEVELS.get(method_name) or method_name.upper()
    return event_dict


@functools.lru_cache(maxsize=8)
def _utc_second(second: int, fmt: str) -> str:
    return time.strftime(fmt, time.gmtime(second))


def _timestamper(config: Config) -> Processor:
    """A timestamp formatted once a second, not once an event."""
    fmt = "%Y-%m-%dT%H:%M:%SZ" if config.log_format == "json" else "%Y-%m-%d %H:%M:%S"

    def add_timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        event_dict["timestamp"] = _utc_second(int(time.time()), fmt)
        return event_dict

    return add_timestamp


def _renderer(config: Config) -> tuple[Processor, Processor]:
    if config.debug:
        return structlog.dev.ConsoleRenderer(), structlog.processors.format_exc_info
    if config.log_format == "json":
        tracebacks = structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        return (
            structlog.processors.JSONRenderer(serializer=_to_json),
            structlog.processors.ExceptionRenderer(tracebacks),
        )
    return render_line, structlog.processors.format_exc_info


_json = json.JSONEncoder(default=repr)
_json_escape = json.encoder.encode_basestring_ascii


def _to_json(event_dict: EventDict, **_: Any) -> str:
    """One encoder for every event: json.dumps builds a new one whenever `default` is given."""
    return _json.encode(event_dict)


def render_line(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
    """`YYYY-MM-DD HH:MM:SS [LEVEL] message key=value ...`, one line a logfmt parser reads back.

    After the level, a parser sees the message's words as bare keys, then exactly the logged
    fields with their values: no text in a message or a value passes for a field or a line.
    """
    timestamp = event_dict.pop("timestamp", "")
    level = event_dict.pop("level", "")
    line = f"{timestamp} [{level}] {escape(str(event_dict.pop('event', '')))}"
    if not event_dict:
        return line
    pairs = [f"{_key(key)}={_value(value)}" for key, value in event_dict.items()]
    return f"{line} {' '.join(pairs)}"


def escape(text: str, table: tuple[tuple[str, str], ...] = _IN_MESSAGE) -> str:
    """`table`'s characters and every unprintable one as JSON escapes, the rest as it is.

    No unicode_escape codec: its lookup fails while the interpreter finalizes, and a record
    logged then (from a late `__del__`) was lost behind a `--- Logging error ---`.
    """
    for char, escaped in table:  # the backslash first
        text = text.replace(char, escaped)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _json_escape(c)[1:-1] for c in text)


@functools.lru_cache(maxsize=1024, typed=True)
def _key(key: object) -> str:
    """A key as rendered, made once: the same few are logged on every line."""
    return _escaped_key(key)


def _escaped_key(key: object) -> str:
    return escape(str(key), _IN_KEY)


def _value(value: object) -> str:
    if type(value) is int:  # a status, a count: the commonest after text, and never quoted
        return str(value)
    if isinstance(value, str):
        text = value
    elif value is None:
        return "null"
    elif isinstance(value, bool):
        return "true" if value else "false"
    elif isinstance(value, int | float):
        return str(value)
    else:
        text = str(value)
    if text.isprintable() and _BARE.fullmatch(text):
        return text
    return f'"{escape(text, _IN_VALUE)}"'


def bind_request_id(incoming: str | None, traceparent: str | None = None) -> str:
    """Keep a sane incoming X-Request-ID, else make one; bind it to every line of this request,
    with the trace and span of a valid W3C `traceparent` (an invalid one is ignored).

    Every serving path calls this first, so every line of a request, the probe lines of the
    round it starts included (the round's task copies the caller's context), carries them.
    """
    request_id = incoming if incoming and _SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    structlog.contextvars.clear_contextvars()
    context = trace.parse_traceparent(traceparent)
    if context is None:
        structlog.contextvars.bind_contextvars(request_id=request_id)
    else:
        structlog.contextvars.bind_contextvars(
            request_id=request_id, trace_id=context.trace_id, span_id=context.span_id
        )
    trace.set_sampled(context is not None and context.sampled)
    return request_id


def log_request(
    *,
    method: str,
    path: str,
    status: int,
    started: float,
    remote: str | None,
    quiet_health: bool,
    complete: bool = True,
) -> None:
    """The one access line per request; `started` is a `time.perf_counter()` reading.

    `complete=False`: the body was cut short after the status went out (the client left,
    or the app failed while streaming), which the line says with `incomplete=true`.
    """
    if quiet_health and status < 400 and (path == "/health" or path.startswith("/health/")):
        return
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    logger = log if complete else log.bind(incomplete=True)
    logger.info(
        "request finished",
        method=method,
        path=path,
        status=status,
        duration_ms=duration_ms,
        remote=remote,
    )


def _log_uncaught(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    log.critical("uncaught exception", exc_info=(kind, error, traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        log.critical(
            "uncaught exception in thread",
            thread=args.thread.name if args.thread else None,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

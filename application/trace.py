"""Trace context for the logs: a request's W3C `traceparent`, or OpenTelemetry's current span.

No tracing SDK is needed: the ids the caller sent are bound to every line of the request next
to its request id (`logs.bind_request_id`), so a log search joins the trace a proxy or a client
started. Where OpenTelemetry is installed and has a current span (an instrumented app), its
ids win: they name this service's own span. `LOG_FORMAT=json` also carries the fields Google
Cloud Logging reads from stdout (Cloud Run, GKE): `severity`, and with GOOGLE_CLOUD_PROJECT
the trace, span and sampling decision, which link each line to Cloud Trace.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from structlog.typing import EventDict, Processor, WrappedLogger

from .config import Config

# version-trace_id-parent_id-flags, lower-case hex only (the spec's HEXDIGLC); version ff is
# forbidden. What a version after 00 adds comes after these 55 characters.
_TRACEPARENT = re.compile(r"(?!ff)[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_LENGTH = 55

# The caller's sampling decision, for Cloud Logging's `trace_sampled`: kept beside the bound
# ids rather than among them, so that text lines carry only trace_id and span_id.
_sampled: ContextVar[bool] = ContextVar("trace_sampled", default=False)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """Where a request sits in a distributed trace: the trace, and the caller's span in it."""

    trace_id: str
    span_id: str
    sampled: bool


def parse_traceparent(value: str | None) -> TraceContext | None:
    """A W3C `traceparent` (Trace Context level 1), or None for anything that is not one.

    Invalid means ignored, never an error: upper-case hex, all-zero ids, version ff, the wrong
    length. A version after 00 is read as the spec's forward-compatibility rule says: its first
    55 characters as 00's, then only the end of the value or a dash.
    """
    if value is None or len(value) < _LENGTH:
        return None
    if len(value) > _LENGTH and (value.startswith("00") or value[_LENGTH] != "-"):
        return None
    match = _TRACEPARENT.fullmatch(value, 0, _LENGTH)
    if match is None:
        return None
    trace_id, span_id, flags = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return TraceContext(trace_id, span_id, sampled=bool(int(flags, 16) & 1))


def set_sampled(sampled: bool) -> None:
    """The bound trace's sampling decision (`logs.bind_request_id` binds the ids)."""
    _sampled.set(sampled)


def processor(config: Config) -> Processor | None:
    """The processor that adds trace fields to every event, or None when there is nothing to add
    (text lines, no OpenTelemetry): the bound ids are then all there is, at no cost."""
    current_span = _opentelemetry_current_span()
    cloud = config.log_format == "json" and not config.debug
    if current_span is None and not cloud:
        return None
    project = config.google_cloud_project if cloud else None
    trace_prefix = f"projects/{project}/traces/"

    def add_trace(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        sampled = _sampled.get()
        if current_span is not None:
            context = current_span().get_span_context()
            if context.is_valid:
                event_dict["trace_id"] = format(context.trace_id, "032x")
                event_dict["span_id"] = format(context.span_id, "016x")
                sampled = context.trace_flags.sampled
        if cloud:
            event_dict["severity"] = event_dict.get("level", "DEFAULT")
            if project and "trace_id" in event_dict:
                event_dict["logging.googleapis.com/trace"] = trace_prefix + event_dict["trace_id"]
                event_dict["logging.googleapis.com/spanId"] = event_dict.get("span_id")
                event_dict["logging.googleapis.com/trace_sampled"] = sampled
        return event_dict

    return add_trace


def _opentelemetry_current_span() -> Callable[[], Any] | None:
    """OpenTelemetry's `get_current_span`, where its API is installed."""
    try:
        from opentelemetry.trace import get_current_span
    except ImportError:
        return None
    return get_current_span

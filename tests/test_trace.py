"""Tests for application.trace: W3C traceparent parsing, the ids on every line of a request,
OpenTelemetry's span winning, and the fields Google Cloud Logging reads."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys

import pytest
import structlog
from opentelemetry import trace as otel

from application import logs, trace
from application.asgi import AsgiApp
from application.config import Config, Datastore
from application.trace import TraceContext, parse_traceparent
from application.web import create_app
from tests import servers
from tests.test_asgi import Exchange, scope

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"
REFUSED = "tcp://127.0.0.1:1"  # nothing listens on port 1: the probe fails at once

CASES = [
    # (traceparent header, what it gives); the spec's own examples first
    (VALID, TraceContext(TRACE, SPAN, sampled=True)),
    (f"00-{TRACE}-{SPAN}-00", TraceContext(TRACE, SPAN, sampled=False)),
    (f"00-{TRACE}-{SPAN}-09", TraceContext(TRACE, SPAN, sampled=True)),  # a bit field: masked
    (f"00-{TRACE}-{SPAN}-02", TraceContext(TRACE, SPAN, sampled=False)),
    (f"00-{TRACE}-{SPAN}-ff", TraceContext(TRACE, SPAN, sampled=True)),  # flags are hex
    (None, None),  # missing
    ("", None),
    ("garbage", None),
    (f"00-{TRACE}-{SPAN}-1", None),  # short flags
    (f"00-{TRACE}-{SPAN}01", None),  # no dash before the flags
    (f"00_{TRACE}_{SPAN}_01", None),
    (f"00-{TRACE[:-1]}-{SPAN}-01", None),  # short trace id
    (f"00-{TRACE}x-{SPAN}-01", None),
    (f" {VALID}", None),  # the servers strip surrounding whitespace; a bare value has none
    (f"00-{TRACE.upper()}-{SPAN}-01", None),  # upper case: not HEXDIGLC
    (f"00-{TRACE}-{SPAN.upper()}-01", None),
    (f"00-{TRACE}-{SPAN}-0A", None),
    (f"0A-{TRACE}-{SPAN}-01", None),
    (f"00-{'0' * 32}-{SPAN}-01", None),  # all-zero trace id
    (f"00-{TRACE}-{'0' * 16}-01", None),  # all-zero parent id
    (f"ff-{TRACE}-{SPAN}-01", None),  # version ff is forbidden
    (f"0g-{TRACE}-{SPAN}-01", None),
    (f"01-{TRACE}-{SPAN}-01", TraceContext(TRACE, SPAN, sampled=True)),  # a later version
    (f"cc-{TRACE}-{SPAN}-01-what-the-future-holds", TraceContext(TRACE, SPAN, sampled=True)),
    (f"cc-{TRACE}-{SPAN}-01what", None),  # the flags must end the value or meet a dash
    (f"cc-{TRACE}-{SPAN}-0", None),  # a later version is still at least 55 characters
    (f"00-{TRACE}-{SPAN}-01-extra", None),  # version 00 is exactly 55 characters
    (f"{VALID},{VALID}", None),  # two headers, joined as the servers join them
]


@pytest.mark.parametrize(("header", "expected"), CASES)
def test_traceparent(header: str | None, expected: TraceContext | None) -> None:
    """Valid headers give their ids and sampled bit; anything else is ignored, never raised."""
    assert parse_traceparent(header) == expected


@pytest.fixture(autouse=True)
def _clear_contextvars():
    """What a test binds is not seen by the next one."""
    yield
    structlog.contextvars.clear_contextvars()


def test_a_valid_traceparent_is_bound_next_to_the_request_id():
    """trace_id and span_id come right after request_id on a line of the request."""
    logs.bind_request_id("r1", VALID)
    assert structlog.contextvars.get_contextvars() == {
        "request_id": "r1",
        "trace_id": TRACE,
        "span_id": SPAN,
    }


@pytest.mark.parametrize("header", [None, f"00-{TRACE.upper()}-{SPAN}-01"])
def test_no_valid_traceparent_binds_no_trace(header: str | None):
    """Missing or invalid: the request id alone, and nothing left from a request before."""
    logs.bind_request_id("r1", VALID)
    logs.bind_request_id("r2", header)
    assert structlog.contextvars.get_contextvars() == {"request_id": "r2"}


def test_text_lines_carry_the_trace(capture_logs):
    """An app event and another library's record: both with trace_id and span_id."""
    stream = capture_logs(Config())
    logs.bind_request_id("r1", VALID)
    structlog.get_logger().info("app event")
    logging.getLogger("somelib").warning("library record")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        fields = dict(servers.log_pairs(line))
        assert (fields["request_id"], fields["trace_id"], fields["span_id"]) == ("r1", TRACE, SPAN)


def test_json_lines_carry_severity_always(capture_logs):
    """LOG_FORMAT=json: `severity` is Cloud Logging's name for the level, on every line."""
    stream = capture_logs(Config(log_format="json"))
    structlog.get_logger().warning("no request")
    logging.getLogger("somelib").error("a record")
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [event["severity"] for event in events] == ["WARNING", "ERROR"]
    assert not any("logging.googleapis.com/trace" in event for event in events)


@pytest.mark.parametrize(("flags", "sampled"), [("01", True), ("00", False)])
def test_json_lines_join_cloud_trace_with_a_project(capture_logs, flags: str, sampled: bool):
    """With GOOGLE_CLOUD_PROJECT, each traced line names its Cloud Trace trace and span."""
    stream = capture_logs(Config(log_format="json", google_cloud_project="my-project"))
    logs.bind_request_id("r1", f"00-{TRACE}-{SPAN}-{flags}")
    structlog.get_logger().info("app event")
    logging.getLogger("somelib").info("a record")
    for line in stream.getvalue().splitlines():
        event = json.loads(line)
        assert event["trace_id"] == TRACE
        assert event["logging.googleapis.com/trace"] == f"projects/my-project/traces/{TRACE}"
        assert event["logging.googleapis.com/spanId"] == SPAN
        assert event["logging.googleapis.com/trace_sampled"] is sampled
        servers.check_log_line(line)


def test_json_lines_without_a_trace_name_none(capture_logs):
    """A project but no trace: no Cloud Trace fields (an empty trace would link nothing)."""
    stream = capture_logs(Config(log_format="json", google_cloud_project="my-project"))
    logs.bind_request_id("r1", None)
    structlog.get_logger().info("app event")
    event = json.loads(stream.getvalue())
    assert event["severity"] == "INFO"
    assert "logging.googleapis.com/trace" not in event


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_an_opentelemetry_span_wins(capture_logs, log_format: str):
    """Where OpenTelemetry has a current span, its ids name the line, not the header's."""
    stream = capture_logs(Config(log_format=log_format, google_cloud_project="my-project"))
    logs.bind_request_id("r1", VALID)
    own = otel.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED),
    )
    with otel.use_span(otel.NonRecordingSpan(own)):
        structlog.get_logger().info("in the span")
    structlog.get_logger().info("after it")
    inside, after = stream.getvalue().splitlines()
    assert "0af7651916cd43dd8448eb211c80319c" in inside
    assert "b7ad6b7169203331" in inside
    assert TRACE not in inside
    assert TRACE in after


def test_text_lines_carry_no_cloud_fields(capture_logs):
    """Text lines, with a project set and a trace bound: no severity, no Cloud Trace fields."""
    stream = capture_logs(Config(google_cloud_project="my-project"))
    logs.bind_request_id("r1", VALID)
    structlog.get_logger().info("app event")
    fields = dict(servers.log_pairs(stream.getvalue()))
    assert fields.keys() == {"app", "event", "request_id", "trace_id", "span_id"}


def test_debug_lines_carry_no_cloud_fields(capture_logs):
    """DEBUG=1 renders for a person at a terminal, LOG_FORMAT=json or not: no severity."""
    stream = capture_logs(Config(log_format="json", debug=True, google_cloud_project="p"))
    logs.bind_request_id("r1", VALID)
    structlog.get_logger().info("app event")
    assert TRACE in stream.getvalue()
    assert "severity" not in stream.getvalue()
    assert "googleapis" not in stream.getvalue()


def test_json_lines_without_a_project_name_no_cloud_trace(capture_logs):
    """A trace but no GOOGLE_CLOUD_PROJECT: the ids and severity, no Cloud Trace fields."""
    stream = capture_logs(Config(log_format="json"))
    logs.bind_request_id("r1", VALID)
    structlog.get_logger().info("app event")
    event = json.loads(stream.getvalue())
    assert (event["trace_id"], event["span_id"], event["severity"]) == (TRACE, SPAN, "INFO")
    assert not any(key.startswith("logging.googleapis.com/") for key in event)


@pytest.mark.parametrize(("flags", "sampled"), [("00", True), ("01", False)])
def test_an_opentelemetry_spans_sampling_decision_wins(capture_logs, flags: str, sampled: bool):
    """Inside this service's own span, Cloud Logging's trace_sampled is that span's decision,
    not the one in the caller's header."""
    stream = capture_logs(Config(log_format="json", google_cloud_project="my-project"))
    logs.bind_request_id("r1", f"00-{TRACE}-{SPAN}-{flags}")
    own = otel.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=otel.TraceFlags(otel.TraceFlags.SAMPLED if sampled else 0),
    )
    with otel.use_span(otel.NonRecordingSpan(own)):
        structlog.get_logger().info("in the span")
    event = json.loads(stream.getvalue())
    assert event["logging.googleapis.com/trace"] == (
        "projects/my-project/traces/0af7651916cd43dd8448eb211c80319c"
    )
    assert event["logging.googleapis.com/spanId"] == "b7ad6b7169203331"
    assert event["logging.googleapis.com/trace_sampled"] is sampled


def test_no_processor_for_text_without_opentelemetry(monkeypatch):
    """Text lines with no OpenTelemetry installed take no trace processor: nothing to add."""
    monkeypatch.setitem(sys.modules, "opentelemetry.trace", None)  # import fails
    assert trace.processor(Config()) is None
    assert trace.processor(Config(log_format="json")) is not None


def _health_lines(stream: io.StringIO) -> list[str]:
    lines = stream.getvalue().splitlines()
    assert any("datastore unhealthy" in line for line in lines), lines
    assert any("request finished" in line for line in lines), lines
    return lines


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_line_of_a_flask_request_carries_its_trace(capture_logs, log_format: str):
    """Through the Envelope (gunicorn's path): the probe line of the round the request started,
    on the probe loop's thread, and the access line."""
    stream = capture_logs(Config(log_format=log_format))
    config = Config(datastores=(Datastore("db", REFUSED),), health_cache_ttl=0)
    app = create_app(config)
    try:
        answer = app.test_client().get("/health", headers={"traceparent": VALID})
        answer.close()  # the access line is written when the server closes the body
    finally:
        app.extensions["health"].close()
    assert answer.status_code == 500
    for line in _health_lines(stream):
        assert TRACE in line and SPAN in line, line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_line_of_a_native_health_request_carries_its_trace(capture_logs, log_format: str):
    """asgi_app's own /health: the same lines, bound by the same function."""
    stream = capture_logs(Config(log_format=log_format))
    config = Config(datastores=(Datastore("db", REFUSED),), health_cache_ttl=0)
    asgi = AsgiApp(create_app(config))
    exchange = Exchange()
    headers = [(b"host", b"x"), (b"traceparent", VALID.encode())]
    try:
        asyncio.run(asgi(scope("/health", headers=headers), exchange.receive, exchange.send))
    finally:
        asgi.threads.shutdown()
        asgi.checker.close()
    assert exchange.status == 500
    for line in _health_lines(stream):
        assert TRACE in line and SPAN in line, line


def test_two_traceparent_headers_bind_no_trace_natively(capture_logs):
    """asgi_app joins repeated headers as the environ does: two traceparents are no trace."""
    stream = capture_logs(Config())
    asgi = AsgiApp(create_app(Config()))
    exchange = Exchange()
    headers = [(b"traceparent", VALID.encode()), (b"traceparent", VALID.encode())]
    try:
        asyncio.run(asgi(scope("/health/live", headers=headers), exchange.receive, exchange.send))
    finally:
        asgi.threads.shutdown()
        asgi.checker.close()
    assert "request finished" in stream.getvalue()
    assert TRACE not in stream.getvalue()

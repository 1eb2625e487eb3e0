"""Tests for application.logs: one line per event, whatever the event carries."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest
import structlog
from logfmtkv import LogfmtSyntaxError

import application
from application import logs
from application.config import Config
from tests import servers

TEXT_LINE = re.compile(
    r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} \[(DEBUG|INFO|WARNING|ERROR|CRITICAL)\] "
)
FRESH_ID = re.compile(r"[0-9a-f]{32}")
PREFIX = len("2025-01-02 03:04:05 [INFO] ")
EAST_OF_UTC = "IST-05:30"  # POSIX TZ for UTC+05:30: needs no time zone database
HOSTILE = [
    'say "hi"',
    "C:\\dir\\",
    "a=b",
    "two words",
    "",
    " ",
    "/\r\n2015-01-01 00:00:00 [INFO] forged",
    "\x1b[31mred\x1b[0m",
    "\u2028",
    "\x00",
    "\t",
    "héllo wörld ✓ 日本語",
    "x request_id=forged level=INFO",
    '" request_id="forged',
    "\\",
    '\\"',
    "\\u0022",
    "\U0001f600",
    "\ufffd",
    "\x7f\x85\u202e\U000e0001",
    "null",
]


def render(event: str = "hello", **pairs: object) -> str:
    """A line as render_line makes it, at a fixed time and level."""
    event_dict = {"timestamp": "2025-01-02 03:04:05", "level": "INFO", "event": event, **pairs}
    return logs.render_line(None, "info", event_dict)


@pytest.fixture
def configure(monkeypatch):
    """Configure logging to a StringIO; the service's own configuration comes back after."""
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    stream = io.StringIO()

    def configure_(config: Config | None = None) -> io.StringIO:
        logs.configure(config or Config(), stream)
        return stream

    yield configure_
    logs.configure(application.config)


def test_render_line_layout():
    """A line is `date time [LEVEL] message key=value ...`, in the order the pairs came."""
    assert render(path="/", status=200) == "2025-01-02 03:04:05 [INFO] hello path=/ status=200"


def test_render_line_without_pairs_has_no_trailing_space():
    """An event with nothing but a message ends with the message."""
    assert render("started") == "2025-01-02 03:04:05 [INFO] started"


def test_a_line_missing_its_time_level_or_message_keeps_its_shape():
    """An event dict without them (a processor chain of a team's own) renders empty places,
    never `None` or a placeholder, and its pairs stay where a parser looks for them."""
    assert logs.render_line(None, "info", {"status": 200}) == " []  status=200"


@pytest.mark.parametrize(
    ("method", "level"),
    [
        ("debug", "DEBUG"),
        ("info", "INFO"),
        ("warn", "WARNING"),
        ("warning", "WARNING"),
        ("error", "ERROR"),
        ("exception", "ERROR"),
        ("critical", "CRITICAL"),
        ("fatal", "CRITICAL"),
        ("msg", "MSG"),  # a method structlog's wrapper has and the stdlib names no level for
    ],
)
def test_each_logging_method_gets_the_stdlib_level_name(method, level):
    """`log.exception` is an ERROR line and `log.warn` a WARNING, as the stdlib names them."""
    assert logs.add_level(None, method, {}) == {"level": level}


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("plain", "plain"),
        (42, "42"),
        (1.5, "1.5"),
        ("two words", '"two words"'),
        ('say "hi"', r'"say \"hi\""'),
        ("a=b", '"a=b"'),
        ("C:\\dir", r'"C:\\dir"'),
        ("", '""'),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        ("line\nbreak", r'"line\nbreak"'),
        ("back\\n", r'"back\\n"'),
    ],
)
def test_logfmt_values(value, rendered):
    """Values are bare when they can be, and quoted with `\\` and `"` escaped when not."""
    assert render(key=value) == f"2025-01-02 03:04:05 [INFO] hello key={rendered}"


@pytest.mark.parametrize(
    ("char", "visible"),
    [
        ("\r", r"\r"),
        ("\n", r"\n"),
        ("\t", r"\t"),
        ("\x1b", r"\u001b"),
        ("\x00", r"\u0000"),
        ("\x7f", r"\u007f"),
        ("\x85", r"\u0085"),
        ("\u2028", r"\u2028"),
        ("\u2029", r"\u2029"),
        ("\u202e", r"\u202e"),
        ("\U000e0001", r"\udb40\udc01"),
    ],
    ids=repr,
)
def test_escape_makes_control_characters_visible(char, visible):
    """Line breaks, terminal escapes and bidi overrides become JSON's escape sequences."""
    assert logs.escape(f"a{char}b") == f"a{visible}b"


def test_escape_keeps_printable_text():
    """Printable text, accents and other scripts included, is left as it is."""
    assert logs.escape("héllo wörld ✓ 日本語") == "héllo wörld ✓ 日本語"


def test_escape_output_is_always_printable():
    """For every code point below U+3000 the escaped text is printable, but for spaces."""
    for code_point in range(0x3000):
        escaped = logs.escape(chr(code_point))
        assert all(c == " " or c.isprintable() for c in escaped), hex(code_point)


def test_rendered_line_never_breaks():
    """A message and a value holding every code point below U+3000 still make one line."""
    everything = "".join(map(chr, range(0x3000)))
    assert len(render(everything, value=everything, **{everything: 1}).splitlines()) == 1


@pytest.mark.parametrize("where", ["message", "value"])
def test_forged_line_stays_on_its_line(where):
    """A path carrying CRLF and a fake log line cannot start a line of its own."""
    forged = "/\r\n2015-01-01 00:00:00 [INFO] forged"
    line = render(forged) if where == "message" else render(path=forged)
    assert len(line.splitlines()) == 1
    assert r"/\r\n2015-01-01 00:00:00 [INFO] forged" in line


def test_plain_message_is_left_as_it_is():
    """A message without `=`, `"`, `\\` or unprintable characters reads exactly as logged."""
    message = "Listening at: http://0.0.0.0:5079 (8065) → it's [ok] {ünï} ✓"
    assert render(message)[PREFIX:] == message


def test_equals_signs_and_quotes_in_a_message_become_escapes():
    """`=` and `"` in a message would make a logfmt field: they are written as \\u escapes."""
    line = render('GET /x request_id=forged "hi"', status=400)
    assert line[PREFIX:] == r"GET /x request_id\u003dforged \u0022hi\u0022 status=400"


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_logfmt_parser_reads_back_exactly_the_logged_fields(value):
    """A hostile value comes back from the parser exact, beside the other fields, and alone."""
    line = render("hello", path=value, status=200, remote=None)
    assert servers.log_pairs(line) == [
        ("hello", None),
        ("path", value),
        ("status", "200"),
        ("remote", "null"),
    ]


@pytest.mark.parametrize("value", HOSTILE, ids=repr)
def test_a_value_decodes_as_a_json_string(value):
    """A quoted value is a JSON string literal, a bare one the body of one: either decodes back."""
    rendered = render(path=value)[PREFIX + len("hello path=") :]
    literal = rendered if rendered.startswith('"') else f'"{rendered}"'
    assert json.loads(literal) == value


@pytest.mark.parametrize("message", HOSTILE, ids=repr)
def test_a_hostile_message_makes_no_field(message):
    """Whatever a message holds, the parser reads words from it, then only the logged field."""
    pairs = servers.log_pairs(render(message, status=200))
    assert [pair for pair in pairs if pair.value is not None] == [("status", "200")]
    assert pairs[-1] == ("status", "200")


@pytest.mark.parametrize("message", HOSTILE, ids=repr)
def test_message_escaping_is_lossless(message):
    """A rendered message is the body of a JSON string: decoding it gives the message back."""
    assert json.loads(f'"{render(message)[PREFIX:]}"') == message


@pytest.mark.parametrize("key", ['a b="c"\nd', *[text for text in HOSTILE if text]], ids=repr)
def test_a_hostile_key_is_one_field(key):
    """A key with a space, `=`, `"`, a newline or U+FFFD (a logfmt parser's mark of a bad key)
    stays one key, which decodes back."""
    [word, (rendered_key, value)] = servers.log_pairs(render(**{key: 1}))
    assert (word, value) == (("hello", None), "1")
    assert json.loads(f'"{rendered_key}"') == key
    assert "\ufffd" not in rendered_key


def test_every_code_point_reads_back():
    """Every code point below U+3000 and a few above U+FFFF, in a message and a value, exact."""
    everything = "".join(map(chr, range(0x3000))) + "\U0001f600\U000e0001\U0010ffff"
    line = render(everything, value=everything)
    pairs = servers.log_pairs(line)
    assert [pair for pair in pairs if pair.value is not None] == [("value", everything)]
    message = line[PREFIX : line.rindex(" value=")]
    assert json.loads(f'"{message}"') == everything


@pytest.mark.parametrize(
    "line",
    [
        "2026-01-01 00:00:00 [WARNING] from ip=1.2.3.4: 'GET /x' logger=gunicorn.error",
        "2026-01-01 00:00:00 [INFO] hello status=200 level=INFO",
        "2026-01-01 00:00:00 [INFO] hello status=200 status=500",
        '2026-01-01 00:00:00 [INFO] say "hi" status=200',
        "Traceback (most recent call last):",
    ],
)
def test_the_servers_line_check_refuses_a_forged_line(line):
    """The check every server's stdout goes through fails on each way a field can be forged."""
    with pytest.raises((AssertionError, LogfmtSyntaxError)):
        servers.check_log_line(line)


def test_the_servers_line_check_passes_a_rendered_line():
    """A line the renderer made, hostile message and values included, passes the check."""
    servers.check_log_line(render('x request_id=forged "q"\n', path="a=b c", status=200))


@pytest.mark.parametrize("incoming", ["abc", "a" * 128, "req-1.2_3", "0123456789abcdef" * 2])
def test_sane_request_id_is_kept_and_bound(incoming):
    """A sane incoming id is used as it is, and bound for every line of the request."""
    assert logs.bind_request_id(incoming) == incoming
    assert structlog.contextvars.get_contextvars() == {"request_id": incoming}


@pytest.mark.parametrize(
    "incoming",
    ["a" * 129, "has space", "x\r\nforged: 1", "", None, "ünïcode", "a/b", "id;drop"],
    ids=repr,
)
def test_insane_request_id_is_replaced_by_a_fresh_one(incoming):
    """An unusable incoming id is replaced by 32 hex digits, and the fresh one is bound."""
    request_id = logs.bind_request_id(incoming)
    assert FRESH_ID.fullmatch(request_id)
    assert structlog.contextvars.get_contextvars() == {"request_id": request_id}


def test_fresh_request_ids_differ():
    """Two requests without an id get two different ids."""
    assert logs.bind_request_id(None) != logs.bind_request_id(None)


def test_bind_request_id_clears_the_previous_request():
    """What an earlier request bound does not leak into the next one."""
    structlog.contextvars.bind_contextvars(user="alice", request_id="old")
    logs.bind_request_id("new")
    assert structlog.contextvars.get_contextvars() == {"request_id": "new"}


def log_request(stream: io.StringIO, **request: object) -> list[str]:
    """The access lines logs.log_request writes for `request` (GET /x, 200, by default)."""
    logs.log_request(
        **{
            "method": "GET",
            "path": "/x",
            "status": 200,
            "started": time.perf_counter(),
            "remote": "10.0.0.7",
            "quiet_health": False,
            **request,
        }
    )
    return stream.getvalue().splitlines()


def test_access_line_reads_back_as_the_requests_fields(capture_logs, monkeypatch):
    """`request finished`, then method, path, status, duration_ms to 0.1 ms, remote, in order."""
    stream = capture_logs(Config())
    monkeypatch.setattr(time, "perf_counter", lambda: 100.0)  # a fixed clock
    [line] = log_request(stream, method="POST", path="/a b", status=201, started=99.87654)
    assert TEXT_LINE.match(line)
    assert "[INFO] " in line
    assert servers.log_pairs(line) == [
        ("request", None),
        ("finished", None),
        ("method", "POST"),
        ("path", "/a b"),
        ("status", "201"),
        ("duration_ms", "123.5"),
        ("remote", "10.0.0.7"),
    ]


def test_access_line_duration_is_the_time_since_started(capture_logs):
    """duration_ms counts from `started`, a perf_counter reading, to when the line is written."""
    stream = capture_logs(Config(log_format="json"))
    started = time.perf_counter() - 10_000  # a request that took ten thousand seconds
    before = (time.perf_counter() - started) * 1000
    log_request(stream, started=started)
    after = (time.perf_counter() - started) * 1000
    assert round(before, 1) <= json.loads(stream.getvalue())["duration_ms"] <= round(after, 1)


def test_access_line_without_a_client_address_says_null(capture_logs):
    """A server that gives no REMOTE_ADDR (a Unix socket): `remote=null`."""
    [line] = log_request(capture_logs(Config()), remote=None)
    assert line.endswith(" remote=null")


def test_a_complete_response_is_not_marked(capture_logs):
    """By default the body went out whole: no `incomplete` field."""
    [line] = log_request(capture_logs(Config()))
    assert "incomplete" not in line


def test_a_response_cut_short_is_marked_incomplete(capture_logs):
    """`complete=False`: the line says `incomplete=true`, with the status the client got."""
    [line] = log_request(capture_logs(Config()), complete=False)
    fields = dict(servers.log_pairs(line))
    assert (fields["status"], fields["incomplete"]) == ("200", "true")


@pytest.mark.parametrize(
    ("path", "status", "quiet_health", "logged"),
    [
        ("/health", 200, True, False),
        ("/health/ready", 200, True, False),
        ("/health/live", 399, True, False),
        ("/health", 400, True, True),  # failures are always logged
        ("/health/ready", 503, True, True),
        ("/healthy", 200, True, True),  # not a health route
        ("/", 200, True, True),
        ("/", 500, True, True),
        ("/health", 200, False, True),
        ("/health/live", 200, False, True),
    ],
)
def test_log_quiet_health_drops_only_successful_health_requests(
    capture_logs, path, status, quiet_health, logged
):
    """LOG_QUIET_HEALTH: no line for /health and /health/... under 400; every other one stays."""
    lines = log_request(capture_logs(Config()), path=path, status=status, quiet_health=quiet_health)
    assert len(lines) == (1 if logged else 0)


def test_an_uncaught_exception_is_one_critical_line(capture_logs):
    """The interpreter's last word on an exception nothing caught: one line, traceback inside."""
    stream = capture_logs(Config())
    try:
        1 / 0  # noqa: B018 - the point is the exception
    except ZeroDivisionError:
        sys.excepthook(*sys.exc_info())
    [line] = stream.getvalue().splitlines()
    assert "[CRITICAL] uncaught exception exception=" in line
    assert r'"Traceback (most recent call last):\n' in line
    assert line.endswith(r'ZeroDivisionError: division by zero"')


def test_an_exception_ending_a_thread_is_one_critical_line_naming_it(capture_logs):
    """A thread that dies of an exception: one line with the thread's name and the traceback."""
    stream = capture_logs(Config())

    def fail() -> None:
        raise RuntimeError("thread broke")

    thread = threading.Thread(target=fail, name="worker-7")
    thread.start()
    thread.join()
    [line] = stream.getvalue().splitlines()
    fields = dict(servers.log_pairs(line))
    assert "[CRITICAL] uncaught exception in thread thread=worker-7 exception=" in line
    assert fields["thread"] == "worker-7"
    assert fields["exception"].startswith("Traceback (most recent call last):\n")
    assert fields["exception"].endswith("RuntimeError: thread broke")


def test_an_uncaught_exception_without_a_thread_says_null(capture_logs):
    """The hook's `thread` may be None (Python's docs): the line says `thread=null`."""
    stream = capture_logs(Config())
    error = RuntimeError("no thread")
    threading.excepthook(threading.ExceptHookArgs([RuntimeError, error, None, None]))
    [line] = stream.getvalue().splitlines()
    assert dict(servers.log_pairs(line))["thread"] == "null"
    assert line.endswith('RuntimeError: no thread"')


def test_a_thread_hook_call_without_an_exception_logs_nothing(capture_logs):
    """The hook's `exc_value` may be None (Python's docs): there is nothing to log."""
    stream = capture_logs(Config())
    threading.excepthook(threading.ExceptHookArgs([SystemExit, None, None, None]))
    assert stream.getvalue() == ""


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
def test_stdlib_record_is_one_text_line(configure, level):
    """A stdlib record, newline and all, comes out as one line in the service's layout."""
    stream = configure(Config(log_level="DEBUG"))
    logging.getLogger("somelib").log(getattr(logging, level), "disk %s\nnearly full", "/var")
    [line] = stream.getvalue().splitlines()
    assert TEXT_LINE.match(line)
    assert line.endswith(rf"[{level}] disk /var\nnearly full logger=somelib")


def test_stdlib_record_below_the_level_is_dropped(configure):
    """LOG_LEVEL applies to stdlib records too."""
    stream = configure(Config(log_level="WARNING"))
    logging.getLogger("somelib").info("chatter")
    assert stream.getvalue() == ""


def test_a_logger_set_below_the_level_prints_nothing_below_it(configure):
    """A server setting its own logger to INFO after configuration cannot bypass LOG_LEVEL."""
    stream = configure(Config(log_level="WARNING"))
    server_logger = logging.getLogger("someserver.error")
    server_logger.setLevel(logging.INFO)
    server_logger.info("Booting worker")
    server_logger.warning("Worker timeout")
    assert stream.getvalue().count("\n") == 1
    assert "Worker timeout" in stream.getvalue()


def test_stdlib_exception_is_one_text_line(configure):
    """A traceback logged with exc_info is escaped into the record's one line."""
    stream = configure()
    try:
        1 / 0  # noqa: B018 - the point is the exception
    except ZeroDivisionError:
        logging.getLogger("somelib").error("it broke", exc_info=True)
    [line] = stream.getvalue().splitlines()
    assert TEXT_LINE.match(line)
    assert r'exception="Traceback (most recent call last):\n' in line
    assert line.endswith(r'ZeroDivisionError: division by zero"')


@pytest.fixture
def east_of_utc():
    """The process's local time is UTC+05:30 during the test."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = EAST_OF_UTC
    time.tzset()
    yield
    if saved is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.mark.parametrize(
    ("log_format", "epoch"), [("text", "1970-01-01 00:00:00"), ("json", "1970-01-01T00:00:00Z")]
)
def test_timestamp_is_utc_whatever_the_local_zone(
    configure, monkeypatch, east_of_utc, log_format, epoch
):
    """At the epoch, in a zone five and a half hours east, a line still says the epoch in UTC."""
    stream = configure(Config(log_format=log_format))
    monkeypatch.setattr(time, "time", lambda: 0.0)
    structlog.get_logger().info("tick")
    line = stream.getvalue()
    stamp = json.loads(line)["timestamp"] if log_format == "json" else line[: len(epoch)]
    assert stamp == epoch


def _fail(password: str) -> None:
    raise RuntimeError("boom")


def test_json_lines_are_objects_with_a_structured_exception(configure):
    """In JSON mode each record is one object; an exception is data, without local variables."""
    stream = configure(Config(log_format="json"))
    logging.getLogger("somelib").warning("hello\nworld")
    try:
        _fail("hun" + "ter2")
    except RuntimeError:
        logging.getLogger("somelib").error("it broke", exc_info=True)
    plain, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert {"timestamp", "level", "event"} <= plain.keys() & failed.keys()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", plain["timestamp"])
    assert (plain["level"], plain["event"]) == ("WARNING", "hello\nworld")
    [exception] = failed["exception"]
    assert (exception["exc_type"], exception["exc_value"]) == ("RuntimeError", "boom")
    assert exception["frames"][-1]["name"] == "_fail"
    assert all("locals" not in frame for frame in exception["frames"])
    assert "hunter2" not in stream.getvalue()


# Nothing unprintable is logged before: an earlier escape would have cached a codec lookup.
LATE_RECORD = """
import logging
import application

class LateRecord:
    def __del__(self):  # runs as the interpreter tears __main__ down, after atexit hooks
        logging.getLogger("late").warning("finalizing\\x1b")

late_record = LateRecord()
"""


def test_a_record_logged_while_the_interpreter_finalizes_is_written():
    """An unprintable character logged during finalization is escaped: a line, no logging error."""
    done = subprocess.run(
        [sys.executable, "-c", LATE_RECORD],
        cwd=servers.ROOT,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(servers.ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stderr == ""
    [line] = done.stdout.splitlines()
    assert line.endswith(r"[WARNING] finalizing\u001b logger=late")


@pytest.mark.parametrize("mode", ["hypercorn-asgi", "gunicorn-gthread"])
def test_log_level_warning_silences_every_source_below_it(mode):
    """LOG_LEVEL=WARNING under a real server: its start, requests and stop print nothing below."""
    refused = f"postgresql://127.0.0.1:{servers.free_port()}/app"
    server = servers.start(mode, {"LOG_LEVEL": "WARNING", "DATABASE_URL": refused})
    try:
        assert server.get("/health").status_code == 500
        server.wait_for_line("datastore unhealthy")
    finally:
        assert server.stop() == 0
    levels = [re.match(servers.LOG_LINE, line).group(1) for line in server.lines]
    assert set(levels) == {"WARNING"}, "\n".join(server.lines)


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /x request_id=forged-by-client level=INFO HTTP/1.1",
        b'GET /x" request_id="forged-by-client" level=INFO HTTP/1.1',
    ],
)
def test_a_request_line_forges_no_field_in_gunicorns_warning(request_line):
    """gunicorn quotes a bad request line in its warning: a logfmt parser finds no field in it."""
    server = servers.start("gunicorn-gthread")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(request_line + b"\r\nHost: x\r\n\r\n")
            assert client.recv(64).startswith(b"HTTP/1.1 400 ")
        warning = server.wait_for_line("Invalid request")
    finally:
        server.stop()
    fields = {key: value for key, value in servers.log_pairs(warning) if value is not None}
    assert fields.get("logger") == "gunicorn.error"
    assert "level" not in fields
    assert "forged-by-client" not in fields.values()
    assert r"request_id\u003d" in warning  # still there for a human to read


@pytest.mark.parametrize("mode", ["hypercorn-asgi", "gunicorn-gthread"])
def test_a_server_east_of_utc_stamps_its_lines_in_utc(mode):
    """TZ five and a half hours east of UTC: every line's timestamp falls while the server ran."""
    started = datetime.now(UTC).replace(microsecond=0)
    server = servers.start(mode, {"TZ": EAST_OF_UTC})
    try:
        assert server.get("/").status_code == 200
    finally:
        server.stop()
    stopped = datetime.now(UTC)
    stamps = [datetime.fromisoformat(line[:19]).replace(tzinfo=UTC) for line in server.lines]
    assert stamps
    assert all(started <= stamp <= stopped for stamp in stamps), (started, stopped, stamps)


def test_lines_to_a_pipe_from_many_threads_arrive_whole(configure):
    """Stdout a pipe to a log shipper: every line of 8 threads arrives whole, the short ones
    and those longer than a pipe takes in one write (which another write could split)."""
    read_end, write_end = os.pipe()
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(_read_all(read_end)))
    reader.start()
    with os.fdopen(write_end, "w") as stream:
        logs.configure(Config(), stream=stream)
        long = "x" * 70_000

        def shout(thread: int) -> None:
            log = structlog.get_logger()  # not logs.log: it would stay bound to this pipe
            for n in range(200):
                log.info("line", thread=thread, n=n)
            log.info("long", thread=thread, text=long)

        threads = [threading.Thread(target=shout, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    reader.join(10)
    lines = received[0].decode().splitlines()
    assert len(lines) == 8 * 201
    assert sum(line.endswith(f"text={long}") for line in lines) == 8
    assert all(TEXT_LINE.match(line) for line in lines)


def _read_all(fd: int) -> bytes:
    with os.fdopen(fd, "rb") as pipe:
        return pipe.read()


def test_below_log_level_nothing_is_written_in_process(configure):
    stream = configure(Config(log_level="WARNING"))
    log = structlog.get_logger()
    log.info("quiet")
    logging.getLogger("asyncpg").info("quiet too")
    log.warning("loud")
    lines = stream.getvalue().splitlines()
    assert [line[len("2025-01-02 03:04:05 ") :] for line in lines] == ["[WARNING] loud"]


@pytest.mark.parametrize("name", ["gunicorn.access", "hypercorn.access"])
def test_the_servers_access_loggers_write_nothing(configure, name):
    """The app writes the one access line; the servers' own never reach stdout."""
    stream = configure()
    logging.getLogger(name).critical("GET / 200")
    assert stream.getvalue() == ""


@pytest.mark.parametrize("name", ["gunicorn.error", "hypercorn.error"])
def test_the_servers_error_lines_come_out_once_in_the_format(configure, name):
    """The handler a server gave its logger goes: its lines come out once, as ours."""
    server_handler = logging.StreamHandler(io.StringIO())
    logging.getLogger(name).addHandler(server_handler)
    stream = configure()
    logging.getLogger(name).warning("worker timeout")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert TEXT_LINE.match(lines[0])
    assert lines[0].endswith(f"[WARNING] worker timeout logger={name}")
    assert server_handler not in logging.getLogger(name).handlers

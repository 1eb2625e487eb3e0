"""Metrics: the numbers Prometheus scrapes, recorded as requests end and probes answer.

One set of instruments per process, made on first use, in prometheus_client's default
registry: a process with metrics off (METRICS_PORT=0) makes none and counts nothing. With
several serving processes prometheus_client's multiprocess mode keeps each process's values in
files of PROMETHEUS_MULTIPROC_DIR, which the supervisor sets before anything imports the client
and whose /metrics adds them up (application/exporter.py).
"""

from __future__ import annotations

import functools

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

# The route of a request no rule matched (a 404, a 405, a redirect to a slash): every path a
# scanner tries shares this one value, so it adds no series. A Flask rule starts with "/".
UNMATCHED = "unmatched"
# Methods outside HTTP's own share one value, as OpenTelemetry's conventions name it: a client
# inventing methods adds no series either.
METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
OTHER_METHOD = "_OTHER"

# Seconds. OpenTelemetry's advice for http.server.request.duration (and prometheus_client's
# default): 5 ms to 10 s, with 0.75 and 1 either side of HEALTH_TIMEOUT's 0.8 s.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# A probe is a round trip on a network that should be local: 1 ms up to past the deadline.
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The service's instruments, and the few calls that record into them.

    The request histogram has no status label: the counter has it (error ratios), and leaving
    it off the histogram keeps its series, 15 per method and route, from multiplying by every
    status a route returns.
    """

    def __init__(self) -> None:
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ("method", "route", "status"),
        )
        self.request_duration = Histogram(
            "http_request_duration_seconds",
            "Time from the server taking the request to the end of its response.",
            ("method", "route"),
            buckets=REQUEST_BUCKETS,
        )
        self.in_flight = Gauge(
            "http_requests_in_flight",
            "HTTP requests taken and not yet answered.",
            multiprocess_mode="livesum",  # the processes' sum; a dead one counts no more
        )
        self.datastore_up = Gauge(
            "health_datastore_up",
            "1 when the datastore answered in the last probe round, else 0.",
            ("datastore",),
            # The last round any live process ran: one that has run none adds nothing, and an
            # old answer of one process gives way to a newer round of another.
            multiprocess_mode="livemostrecent",
        )
        self.probe_duration = Histogram(
            "health_probe_duration_seconds",
            "Time a datastore took to answer a probe, or to fail it.",
            ("datastore",),
            buckets=PROBE_BUCKETS,
        )
        self.probe_failures = Counter(
            "health_probe_failures",
            "Failed probes, by datastore and reason (the words of /health, without numbers).",
            ("datastore", "reason"),
        )
        self.rounds = Counter("health_rounds", "Probe rounds run to their end.")
        self.rounds_shared = Counter(
            "health_rounds_shared",
            "Health checks answered by a round already in flight instead of one of their own.",
        )
        # (method, route, status) -> its counter and histogram children: labels() validates
        # and locks on every call, a dict look-up does not. Bounded: every key part is.
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def request_done(self, method: str, route: str, status: int, seconds: float) -> None:
        """An answered request: counted, and its duration observed."""
        if method not in METHODS:
            method = OTHER_METHOD
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(method, route, str(status)),
                self.request_duration.labels(method, route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def probe_done(self, datastore: str, seconds: float, failure: str | None) -> None:
        """One datastore's answer in a round; `failure` is None when it answered."""
        self.datastore_up.labels(datastore).set(0 if failure else 1)
        self.probe_duration.labels(datastore).observe(seconds)
        if failure:
            self.probe_failures.labels(datastore, failure).inc()


@functools.cache
def instruments() -> Metrics:
    """This process's instruments: prometheus_client registers a name once per registry.

    Without the `_created` series a single process adds to every counter and histogram (one
    more series each; the multiprocess files have none): the same exposition in every mode.
    """
    disable_created_metrics()
    return Metrics()

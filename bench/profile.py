"""Where a request's CPU time goes, per serving mode: py-spy samples a server under wrk load
and each sample is put in one part of the request by the frames on its stack.

    .venv/bin/python -m bench.profile      # about a minute per mode; prints a markdown table

The server runs on core 0, wrk and py-spy on core 1, as in scripts/bench. The server's CPU
time over the sampled window, divided by the requests wrk completed, is the cost of a request;
each part gets its share of the samples.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# scripts/bench.py, for its servers and wrk: by path, as `bench` is this package's name
_spec = importlib.util.spec_from_file_location(
    "scripts_bench", Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
)
assert _spec is not None and _spec.loader is not None  # noqa: S101 (the file is ours)
run = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = run  # its dataclasses look their module up
_spec.loader.exec_module(run)

MODES = (
    ("hypercorn", "asgi_app, hypercorn"),
    ("gunicorn-conf", "app, gunicorn"),
    ("flask-peer", "Flask peer, gunicorn gthread 1x8"),
)
PATHS = ("/health", "/health/live", "/")
SECONDS = int(os.environ.get("PROFILE_SECONDS", "10"))

# A sample's part: the first of these a frame's file matches, from the innermost frame out.
# Frames of the standard library (json, uuid, threading...) decide nothing: whoever called
# them does. asyncio does, where the app's own code is not above it: the server's loop.
PARTS = (
    ("access line", ("application/logs.py", "structlog/")),
    ("metrics", ("application/metrics.py", "prometheus_client/")),
    ("health report", ("application/health.py",)),
    ("Flask dispatch", ("flask/", "werkzeug/", "blinker/", "bench/flask_peer.py")),
    ("the app's envelope", ("application/",)),
    ("server", ("hypercorn/", "gunicorn/", "h11/", "uvloop/", "asyncio/", "selectors.py")),
)


def part(stack: list[str]) -> str:
    for frame in reversed(stack):  # py-spy's raw format lists the outermost frame first
        for name, files in PARTS:
            if any(f"{file}" in frame for file in files):
                return name
    return "the rest (interpreter, threads)"


def profile(kind: str, path: str) -> tuple[float, Counter[str]]:
    """CPU microseconds per request, and samples by part, for `path` on a `kind` server."""
    server = run.start(kind, f"profile-{kind}")
    try:
        url = server.url + path
        subprocess.run(run.wrk_command(url, 2), capture_output=True, check=True)  # warm up
        with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
            command = run.wrk_command(url, SECONDS + 2)
            load = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            time.sleep(1)
            before = run.tree_cpu_seconds(server.process.pid)
            subprocess.run(
                ["taskset", "-c", run.LOAD_CORE, str(run.BIN / "py-spy"), "record",
                 "--subprocesses", "--nonblocking", "--gil", "--rate", "200", "--duration",
                 str(SECONDS - 2), "--format", "raw", "--output", raw.name,
                 "--pid", str(server.process.pid)],
                capture_output=True,
                check=True,
            )  # fmt: skip
            spent = run.tree_cpu_seconds(server.process.pid) - before
            requests = run._parse_wrk(load.communicate()[0]).requests
            samples: Counter[str] = Counter()
            for line in Path(raw.name).read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                samples[part(stack.split(";"))] += int(count)
    finally:
        server.stop()
    # wrk ran SECONDS + 2 s, the CPU was read over about SECONDS - 2 s of it
    per_request = spent / (requests * (SECONDS - 2) / (SECONDS + 2)) * 1e6
    return per_request, samples


def main() -> None:
    os.sched_setaffinity(0, {int(run.LOAD_CORE)})
    names = [name for name, _ in PARTS] + ["the rest (interpreter, threads)"]
    print("| mode | path | µs/request | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for kind, label in MODES:
        for path in PATHS:
            per_request, samples = profile(kind, path)
            total = sum(samples.values()) or 1
            shares = [per_request * samples[name] / total for name in names]
            cells = " | ".join(f"{share:.0f}" for share in shares)
            print(f"| {label} | `{path}` | {per_request:.0f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

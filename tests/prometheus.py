"""A real Prometheus for the tests: its own port, storage and 1 s scrapes of one target, and
PromQL through its HTTP API, polled until a condition holds."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests import servers

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: app
    static_configs:
      - targets: ["127.0.0.1:{target}"]
"""

Result = list[dict[str, Any]]  # an instant vector: [{"metric": {labels}, "value": [t, "v"]}]


def binary() -> str | None:
    """Debian's prometheus, or None when it is not installed."""
    return shutil.which("prometheus") or next(
        (str(p) for p in (Path("/usr/bin/prometheus"),) if p.exists()), None
    )


@dataclass
class Prometheus:
    process: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def query(self, promql: str) -> Result:
        answer = httpx.get(
            f"http://127.0.0.1:{self.port}/api/v1/query", params={"query": promql}, timeout=10
        )
        answer.raise_for_status()
        return answer.json()["data"]["result"]  # type: ignore[no-any-return]

    def wait_for(self, promql: str, holds: Callable[[Result], bool], timeout: float = 30) -> Result:
        """The query's result once `holds(result)`, polled every 0.2 s; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        result = self.query(promql)
        while not holds(result):
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql} after {timeout} s: {result}\n" + self.log())
            time.sleep(0.2)
            result = self.query(promql)
        return result

    def log(self) -> str:
        return "\n".join(self.lines[-20:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(5)


def start(executable: str, directory: Path, target: int, timeout: float = 30) -> Prometheus:
    """Prometheus scraping 127.0.0.1:`target` every second, ready to query."""
    config = directory / "prometheus.yml"
    config.write_text(CONFIG.format(target=target))
    port = servers.free_port()
    process = subprocess.Popen(
        [
            executable,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    prometheus = Prometheus(process, port)
    prometheus.reader = threading.Thread(target=_read, args=(prometheus,), daemon=True)
    prometheus.reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            exited = process.returncode
            raise AssertionError(f"prometheus exited with {exited}:\n{prometheus.log()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1).status_code == 200:
                return prometheus
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    prometheus.stop()
    raise AssertionError(f"prometheus not ready in {timeout} s:\n{prometheus.log()}")


def _read(prometheus: Prometheus) -> None:
    assert prometheus.process.stdout is not None
    with prometheus.process.stdout as stream:
        for line in stream:
            prometheus.lines.append(line.rstrip("\n"))

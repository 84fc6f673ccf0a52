"""A real Prometheus (Debian's ``prometheus`` binary) for the tests: scrapes given 127.0.0.1 targets every
second and answers PromQL over its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from embedjob.dev.services import free_port, stop_process


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, list[int]]) -> None:
        """``targets``: scrape job name -> 127.0.0.1 ports."""
        self.workdir, self.targets = workdir, targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Prometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (scripts/setup.sh installs Debian's package)")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}]}
                for job, ports in self.targets.items()
            ],
        }
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(config))
        log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"prometheus not ready on {self.url} in {timeout}s")

    def stop(self) -> None:
        stop_process(self.proc, grace=10)

    def _get(self, path: str, **params: Any) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self._get("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The single value of ``expr`` (None when it has no data)."""
        result = self.query(expr)
        if not result:
            return None
        assert len(result) == 1, f"{expr}: more than one series: {result}"
        return float(result[0]["value"][1])

    def by(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets_up(self) -> dict[str, str]:
        data = self._get("/api/v1/targets")
        return {t["scrapeUrl"]: t["health"] for t in data["activeTargets"]}

    def wait_for(self, check: Any, timeout: float = 60, what: str = "") -> Any:
        """Polls ``check()`` until it returns a truthy value (scrapes land every second)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
                if last:
                    return last
            except AssertionError as e:
                last = e
            time.sleep(0.5)
        raise AssertionError(f"{what or 'prometheus condition'} not met in {timeout}s; last: {last}")

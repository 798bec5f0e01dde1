"""A real Prometheus (the `prometheus` binary, Debian's 2.42 in CI) scraping Baton on loopback.

Each target carries the labels the chart's ServiceMonitor gives a scraped Service in a
cluster (`namespace`, `service`, `pod`, `endpoint`, `job`), so the queries the operator and
the chart write select the series exactly as they would under prometheus-operator.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

SCRAPE_INTERVAL = "1s"


@dataclass(frozen=True)
class Target:
    """One scraped endpoint: `address` is host:port, `path` the metrics path."""

    address: str
    path: str
    labels: dict[str, str]


class Prometheus:
    """A Prometheus process with its own config and TSDB under `workdir`."""

    def __init__(self, workdir: Path, port: int, targets: list[Target]):
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (apt-get install prometheus)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / "prometheus.yml"
        self._write_config(targets)
        self.url = f"http://127.0.0.1:{port}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_file}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(timeout=60)

    def _write_config(self, targets: list[Target]) -> None:
        # Targets come through file-based service discovery, as pods come through Kubernetes
        # discovery: a target that goes away gets its series marked stale at once.
        self.targets_file = self.config_file.with_name("targets.json")
        self._write_targets(targets)
        self.config_file.write_text(yaml.safe_dump({
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL,
                       "evaluation_interval": SCRAPE_INTERVAL},
            "scrape_configs": [{"job_name": "baton",
                                "file_sd_configs": [{"files": [str(self.targets_file)]}]}],
        }))

    def _write_targets(self, targets: list[Target]) -> None:
        self.targets = list(targets)
        groups = [{"targets": [t.address], "labels": {**t.labels, "__metrics_path__": t.path}}
                  for t in targets]
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(self.targets_file)  # atomic: discovery never reads half a file

    def set_targets(self, targets: list[Target]) -> None:
        """Scrape these targets from now on. Series of a dropped target go stale at once,
        as when a fleet scales to zero and its pods leave the Service's endpoints."""
        self._write_targets(targets)
        wanted = sorted(t.address for t in targets)

        def applied() -> bool:
            active = self.api("targets", state="active")["activeTargets"]
            return sorted(t["discoveredLabels"]["__address__"] for t in active) == wanted

        deadline = time.monotonic() + 30
        while not applied():
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not apply the new targets")
            time.sleep(0.2)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def api(self, path: str, **params: str) -> object:
        """GET /api/v1/<path>; returns `data`, raises ValueError with Prometheus's error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = json.loads(error.read())
        if body.get("status") != "success":
            raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's vector: [{"metric": {...}, "value": float}, ...]."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise ValueError(f"{expr!r} gives a {data['resultType']}, not a vector")
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def targets_up(self) -> bool:
        active = self.api("targets", state="active")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

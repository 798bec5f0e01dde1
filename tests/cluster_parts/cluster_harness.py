"""What the cluster-parts tests share: the example service, a monitored `baton up`, a load.

`Monitored`: one disaggregated `baton up` scraped every second by a real Prometheus with the
labels a cluster's ServiceMonitor would give the Services the operator makes for
`examples/autoscaling-keda.yaml`. `Load` keeps requests in flight until stopped.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import openai
import yaml

ROOT = Path(__file__).resolve().parents[2]
# The `baton up` launcher is shared with the serving tests.
sys.path.insert(0, str(ROOT / "tests" / "serving"))

from prometheus_server import Prometheus  # noqa: E402
from serving_harness import Deployment  # noqa: E402

from baton.operator import spec  # noqa: E402

NAMESPACE = "serving"
KEDA_EXAMPLE = ROOT / "examples" / "autoscaling-keda.yaml"


def example_service(path: Path = KEDA_EXAMPLE) -> spec.InferenceService:
    """The example InferenceService, parsed as the operator parses it, in NAMESPACE."""
    body = yaml.safe_load(path.read_text())
    body["metadata"]["namespace"] = NAMESPACE
    return spec.parse(body)


@dataclass
class Monitored:
    deployment: Deployment
    prometheus: Prometheus
    service: spec.InferenceService
    pods: dict[str, str]  # baton up process name -> the pod name its target carries


class Load:
    """`concurrency` clients sending completions back to back until `stop()`.

    Prompts repeat (so the prefix cache hits) and are long enough to span several KV
    blocks; every answer is `max_tokens` long (ignore_eos) so requests stay in flight. A
    429 (the router's queue is full) is retried after a moment, as a client would.
    """

    PROMPTS = [("Baton serves large language models on Kubernetes. " * 12) + f"Question {i}:"
               for i in range(3)]

    def __init__(self, deployment: Deployment, concurrency: int = 8, max_tokens: int = 48):
        self.client = deployment.client(timeout=120)
        self.model = deployment.model
        self.max_tokens = max_tokens
        self.done = threading.Event()
        self.completed = self.rejected = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(concurrency)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=180)

    def _run(self, i: int) -> None:
        n = 0
        while not self.done.is_set():
            try:
                self.client.completions.create(
                    model=self.model, prompt=self.PROMPTS[(i + n) % len(self.PROMPTS)],
                    max_tokens=self.max_tokens, temperature=0,
                    extra_body={"ignore_eos": True})
                self.completed += 1
            except openai.RateLimitError:  # 429: the router's queue is full; back off, retry
                self.rejected += 1
                self.done.wait(0.2)
                continue
            except Exception as error:  # reported by the test
                self.errors.append(error)
                return
            n += 1

"""The built images, run as pods run them (uid 1000, read-only root, writable /tmp).

Marker `image`, off by default: build the images first (a few minutes each), then run

    scripts/build-images.sh --vfs --local-base --pip-config --torch-wheels DIR --torch-version V
    python -m pytest -m image tests/cluster_parts/test_images.py

(docs/operator.md, "Building and pushing the images"). Needs root and buildah.
"""

from __future__ import annotations

import asyncio
import shutil
import stat
from pathlib import Path

import httpx
import kmock
import pytest
import yaml
from cluster_harness import ROOT
from containers import REGISTRY, Container, image_exists
from kube_emulator import emulator, write_kubeconfig
from serving_harness import free_port, wait_until

from baton import __version__

# Removing a container deletes its copied root (vfs storage): minutes for the worker's.
pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]
WORKER = f"{REGISTRY}/baton:{__version__}"
CONTROL = f"{REGISTRY}/baton-control:{__version__}"
# A worker imports torch and loads the model from a cold, copied-on-create root.
START_TIMEOUT = 300


@pytest.fixture(scope="module", autouse=True)
def _images_built():
    missing = [image for image in (WORKER, CONTROL) if not image_exists(image)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not built: run scripts/build-images.sh (see this "
                    "file's docstring)")


def readable_copy(source: Path, target: Path) -> Path:
    """`source` copied where uid 1000 may read it (pytest's folders are the owner's only)."""
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0))
    return target


def ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_worker_and_router_images_serve_a_completion(tiny_model_cache, tmp_path):
    model = readable_copy(tiny_model_cache, tmp_path / "model")
    grpc_port, metrics_port, http_port = free_port(), free_port(), free_port()
    worker = Container(WORKER, [
        "serve-colocated", "--model", "/models/tiny", "--device", "cpu", "--host", "127.0.0.1",
        "--port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--num-gpu-blocks-override", "64"], tmp_path / "worker-tmp", {model: "/models/tiny"})
    router = None
    try:
        router = Container(CONTROL, [
            "serve-router", "--model", "/models/tiny", "--host", "127.0.0.1",
            "--port", str(http_port), "--colocated", f"127.0.0.1:{grpc_port}"],
            tmp_path / "router-tmp", {model: "/models/tiny"})
        base = f"http://127.0.0.1:{http_port}"
        try:
            wait_until(lambda: worker.running() and router.running() and ready(f"{base}/ready"),
                       timeout=START_TIMEOUT, interval=1,
                       what="the router and its worker, from the images")
        except AssertionError:
            raise AssertionError(f"worker:\n{worker.output()[-3000:]}\nrouter:\n"
                                 f"{router.output()[-3000:]}") from None
        # The served name defaults to the model folder's name.
        answer = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": "The capital of France is", "max_tokens": 8})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] >= 1
        assert "baton:num_requests_running" in httpx.get(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text

        # What the pod's security context asks for, read from the worker process itself:
        # uid and gid 1000, its root filesystem mounted read-only.
        pid = worker.process("serve-colocated", str(grpc_port))
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                      .splitlines())
        assert status["Uid"].split() == ["1000"] * 4 and status["Gid"].split() == ["1000"] * 4
        root = next(line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text()
                    .splitlines() if line.split()[4] == "/")
        assert "ro" in root[5].split(","), root
    finally:
        if router is not None:
            router.remove()
        worker.remove()


async def test_control_image_runs_the_operator_against_an_api_server(tmp_path):
    async with emulator.ApiServer() as server, kmock.Server(server):
        server.serve(emulator.RESOURCES)
        kube = tmp_path / "kube"
        kube.mkdir(mode=0o755)
        write_kubeconfig(kube / "config", str(server.servers[0].url))
        health = free_port()
        operator = await asyncio.to_thread(Container, CONTROL, [
            "operator", "--kubeconfig", "/kube/config", "--health-port", str(health),
            "--worker-image", WORKER, "--control-image", CONTROL],
            tmp_path / "operator-tmp", {kube: "/kube"})
        try:
            await asyncio.to_thread(wait_until, lambda: operator.running() and ready(
                                        f"http://127.0.0.1:{health}/healthz"),
                                    START_TIMEOUT, 1, "the operator, from the image")
            body = yaml.safe_load((ROOT / "examples" / "colocated.yaml").read_text())
            body["metadata"]["namespace"] = "default"
            await server.create("baton.dev/v1alpha1/inferenceservices", body)
            name = body["metadata"]["name"]

            def children() -> dict[str, str]:
                """Deployment name -> its image, once the router and a worker fleet exist."""
                found = {n: server.get_object("apps/v1/deployments", "default", n)
                         for n in server.names("apps/v1/deployments", "default")}
                images = {n: d["spec"]["template"]["spec"]["containers"][0]["image"]
                          for n, d in found.items() if d}
                return images if len(images) >= 2 else {}

            images = await emulator.wait_for(children, timeout=120)
        finally:
            await asyncio.to_thread(operator.remove)
    assert images.pop(f"{name}-router") == CONTROL, operator.output()[-3000:]
    assert set(images.values()) == {WORKER}, images

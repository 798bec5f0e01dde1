"""The real kubectl (Debian's, 1.32 here) against the API-server emulator and the operator.

A user's session: apply every example, list them with the CRD's printer columns, describe
one, scale what has a scale subresource, delete. kubectl validates and prints through the
API server (fieldValidation=Strict, server-side Tables), so those are the emulator's work
(kube_emulator.py), done as the API server does them.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import kmock
import pytest
import yaml
from cluster_harness import ROOT
from kube_emulator import PRINTER_COLUMNS, KubectlApiServer, emulator, write_kubeconfig

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
NS = "default"


class Kubectl:
    def __init__(self, kubeconfig):
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    async def __call__(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        """Run kubectl (without blocking the emulator, which lives in this event loop)."""
        proc = await asyncio.create_subprocess_exec(
            "kubectl", *args, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
        result = proc.returncode, out.decode(), err.decode()
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result}")
        return result


@pytest.fixture
async def cluster(tmp_path):
    """(server, kubectl, operator): the emulator, a kubectl for it, the operator running."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not installed (.ci/run installs it)")
    async with KubectlApiServer() as server, kmock.Server(server):
        server.serve(emulator.RESOURCES)
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(server.servers[0].url), NS)
        operator = emulator.OperatorRunner(str(kubeconfig))
        await operator.start(resync_seconds=2.0)
        try:
            yield server, Kubectl(kubeconfig), operator
        finally:
            await operator.stop()


def table(text: str) -> list[dict[str, str]]:
    """kubectl's table output as rows of {column: cell} (cells split on 2+ spaces)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    names = header.split()

    def cells(line: str) -> list[str]:
        bounds = [*starts[1:], None]
        return [line[a:b].strip() for a, b in zip(starts, bounds)]

    return [dict(zip(names, cells(line))) for line in lines[1:]]


async def test_apply_get_describe_scale_and_delete_the_examples(cluster):
    wait = emulator.wait_for
    server, kubectl, _ = cluster
    names = {yaml.safe_load(p.read_text())["metadata"]["name"] for p in EXAMPLES}

    _, out, _ = await kubectl("apply", "-f", str(ROOT / "examples"))
    assert out.count(" created") == len(EXAMPLES), out
    _, out, _ = await kubectl("apply", "-f", str(ROOT / "examples"))
    assert out.count(" unchanged") == len(EXAMPLES), out  # applying again changes nothing

    # The operator reconciles each: a Ready condition, which the READY column shows.
    def all_reported() -> bool:
        return all((server.get_object("baton.dev/v1alpha1/inferenceservices", NS, n) or {})
                   .get("status", {}).get("conditions") for n in names)
    await wait(all_reported, timeout=60)

    _, out, _ = await kubectl("get", "bisvc")
    rows = table(out)
    default_columns = ["NAME"] + [c["name"].upper() for c in PRINTER_COLUMNS
                                  if not c.get("priority")]
    assert list(rows[0]) == default_columns
    assert {row["NAME"] for row in rows} == names
    for row in rows:
        stored = server.get_object("baton.dev/v1alpha1/inferenceservices", NS, row["NAME"])
        ready = next(c for c in stored["status"]["conditions"] if c["type"] == "Ready")
        assert row["READY"] == ready["status"] and row["MODE"] == stored["spec"]["mode"]
        assert row["AGE"].endswith(("s", "m"))
    _, wide, _ = await kubectl("get", "bisvc", "-o", "wide")
    assert list(table(wide)[0]) == ["NAME"] + [c["name"].upper() for c in PRINTER_COLUMNS]
    _, by_category, _ = await kubectl("get", "baton")  # the CRD's category
    assert {row["NAME"] for row in table(by_category)} == names

    _, out, _ = await kubectl("describe", "bisvc", "qwen-small")
    assert "Name:         qwen-small" in out and "Kind:         InferenceService" in out
    assert "Ready" in out and "Events:" in out

    # Deployments have a scale subresource; the operator owns the router's replicas and
    # puts them back.
    router = "qwen-small-router"
    await wait(lambda: server.get_object("apps/v1/deployments", NS, router), timeout=60)
    _, out, _ = await kubectl("scale", f"deployment/{router}", "--replicas=3")
    assert "scaled" in out
    _, out, _ = await kubectl("get", f"deployment/{router}", "-o", "jsonpath={.spec.replicas}")
    assert out == "3" or out == "1"  # the operator may already have undone it
    await wait(lambda: server.get_object("apps/v1/deployments", NS, router)["spec"][
        "replicas"] == 1, timeout=30)
    # The InferenceService has no scale subresource: kubectl says so.
    code, _, err = await kubectl("scale", "bisvc", "qwen-small", "--replicas=2", check=False)
    assert code != 0 and "could not find the requested resource" in err, err

    _, out, _ = await kubectl("delete", "bisvc", "qwen-small")
    assert 'inferenceservice.baton.dev "qwen-small" deleted' in out
    code, _, err = await kubectl("get", "bisvc", "qwen-small", check=False)
    assert code == 1 and "not found" in err.lower()
    # The garbage collector takes the children along.
    await wait(lambda: not {router, "qwen-small-colocated"} & server.names("apps/v1/deployments", NS),
               timeout=30)


async def test_apply_refuses_an_unknown_field_and_a_bad_value(cluster):
    _, kubectl, _ = cluster
    body = yaml.safe_load((ROOT / "examples" / "colocated.yaml").read_text())
    body["spec"]["colocated"]["replica"] = 2  # a typo
    path = ROOT / "examples" / "colocated.yaml"
    code, _, err = await kubectl_stdin(kubectl, body)
    assert code != 0 and "replica" in err, err
    body = yaml.safe_load(path.read_text())
    body["spec"]["mode"] = "sideways"
    code, _, err = await kubectl_stdin(kubectl, body)
    assert code != 0 and "mode" in err, err


async def kubectl_stdin(kubectl: Kubectl, body: dict) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "kubectl", "apply", "-f", "-", env=kubectl.env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(yaml.safe_dump(body).encode()), 120)
    return proc.returncode, out.decode(), err.decode()

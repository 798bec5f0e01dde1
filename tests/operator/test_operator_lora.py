"""spec.lora: every worker role fetches the same adapters and serves them (--lora-modules),
built without a cluster and applied by the real operator against the emulated API server."""

from __future__ import annotations

import copy

import pytest
from test_operator_builders import CONFIG, body, container, find
from test_operator_crd import schema_errors, violations
from test_operator_crd import service as crd_service
from test_operator_kopf import DEPLOY, IS, NS, models_claim, service

from baton.operator import builders, spec
from baton.operator.builders import common

LORA = {"maxLoras": 3, "maxLoraRank": 32, "maxCpuLoras": 6, "adapters": [
    {"name": "sql", "source": {"pvc": {"claimName": "adapters", "path": "team/sql"}}},
    {"name": "chat", "source": {"uri": "hf://org/chat-lora@v2", "credentialsSecretRef": {"name": "hf"}}},
    {"name": "legal", "source": {"hostPath": "/data/legal"}},
]}


def _worker(objects: list[dict], role: str) -> tuple[dict, dict]:
    deployment = find(objects, "Deployment", f"llama-{role}")
    return deployment["spec"]["template"]["spec"], container(deployment)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_every_worker_role_mounts_fetches_and_serves_the_adapters(mode):
    from baton.worker.flags import parse as parse_worker

    objects = builders.build_all(spec.parse(body(mode=mode, lora=copy.deepcopy(LORA))), CONFIG)
    roles = ["colocated"] if mode == "colocated" else ["prefill", "decode"]
    for role in roles:
        pod, main = _worker(objects, role)
        engine, options = parse_worker(main["args"], f"baton {main['command'][1]}", role)
        assert (engine.enable_lora, engine.max_loras, engine.max_lora_rank, engine.max_cpu_loras) == (True, 3, 32, 6)
        served = dict(options.lora_modules)
        assert list(served) == ["sql", "chat", "legal"]
        mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        # Each adapter's directory is inside the volume made from its own source.
        assert served["sql"] == "/adapters/0/team/sql"
        assert volumes[mounts["/adapters/0"]]["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
        assert volumes[mounts["/adapters/1"]]["emptyDir"] == {}
        assert volumes[mounts["/adapters/2"]]["hostPath"]["path"] == "/data/legal"
        assert served["chat"] == "/adapters/1" and served["legal"] == "/adapters/2"
        # The uri adapter is fetched before the worker starts, with its token, by the model's script.
        (fetch,) = pod["initContainers"]
        assert fetch["name"] == "fetch-lora-1"
        assert fetch["args"][:5] == [f"{common.CONFIG_DIR}/fetch_model.py", "--uri", "hf://org/chat-lora@v2",
                                     "--dest", "/adapters/1"]
        assert {"name": "lora-1", "mountPath": "/adapters/1"} in fetch["volumeMounts"]
        token = next(e for e in fetch["env"] if e["name"] == "BATON_MODEL_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
        assert volumes["config"]["configMap"]["name"] == "llama-config"
    find(objects, "ConfigMap", "llama-config")  # the fetch script exists for the init container
    router_pod, _ = _worker(objects, "router")
    assert "initContainers" not in router_pod  # the router needs no adapter


def test_without_lora_nothing_changes_and_without_uri_sources_no_configmap():
    plain = builders.build_all(spec.parse(body()), CONFIG)
    _, main = _worker(plain, "decode")
    assert "--enable-lora" not in main["args"]
    local = {"adapters": [LORA["adapters"][0]]}
    objects = builders.build_all(spec.parse(body(lora=local)), CONFIG)
    assert not [o for o in objects if o["kind"] == "ConfigMap"]
    pod, main = _worker(objects, "prefill")
    assert "initContainers" not in pod and "config" not in {v["name"] for v in pod["volumes"]}
    # The CRD's defaults: 4 slots of rank 16.
    assert main["args"][main["args"].index("--max-loras") + 1] == "4"
    assert main["args"][main["args"].index("--max-lora-rank") + 1] == "16"


@pytest.mark.parametrize(("lora", "message"), [
    ({"adapters": [{"name": "a", "source": {"hostPath": "/x"}}, {"name": "a", "source": {"hostPath": "/y"}}]},
     "names must be distinct"),
    ({"adapters": [{"name": "llama", "source": {"hostPath": "/x"}}]}, "served name 'llama'"),
    ({"maxLoras": 4, "maxCpuLoras": 2}, "maxCpuLoras"),
    ({"adapters": [{"name": "a", "source": {"hostPath": "/x", "uri": "hf://o/n"}}]},
     r"exactly one of lora.adapters\[0\].source.pvc"),
    ({"adapters": [{"name": "a", "source": {"pvc": {"claimName": "c", "path": "../up"}}}]}, "no '..'"),
])
def test_unservable_lora_specs_say_which_field(lora, message):
    with pytest.raises(spec.SpecError, match=message):
        spec.parse(body(lora=lora))


def test_the_crd_takes_the_adapters_and_refuses_fewer_cpu_than_gpu_slots():
    assert schema_errors(crd_service(lora=copy.deepcopy(LORA))) == []
    assert violations(crd_service(lora=copy.deepcopy(LORA))) == []
    assert "lora.maxCpuLoras must be at least lora.maxLoras" in violations(
        crd_service(lora={"maxLoras": 4, "maxCpuLoras": 2}))
    assert schema_errors(crd_service(lora={"adapters": [{"name": "bad name", "source": {"hostPath": "/x"}}]}))


@pytest.fixture
async def claim(apiserver):
    """The PersistentVolumeClaim the service reads its model from."""
    await models_claim(apiserver)


async def test_adding_adapters_rolls_every_worker_to_serve_them(apiserver, operator, claim, wait):
    await operator.start()
    await apiserver.create(IS, service())
    await wait(lambda: "llama-decode" in apiserver.names(DEPLOY, NS))

    def args(name: str) -> list[str]:
        return apiserver.get_object(DEPLOY, NS, name)["spec"]["template"]["spec"]["containers"][0]["args"]

    assert "--enable-lora" not in args("llama-prefill")
    uid = apiserver.get_object(DEPLOY, NS, "llama-decode")["metadata"]["uid"]
    await apiserver.merge(IS, NS, "llama", {"spec": {"lora": {"adapters": [
        {"name": "sql", "source": {"uri": "hf://org/sql-lora"}}]}}})
    await wait(lambda: all("--enable-lora" in args(n) for n in ("llama-prefill", "llama-decode")))
    for name in ("llama-prefill", "llama-decode"):
        assert args(name)[args(name).index("--lora-modules") + 1] == "sql=/adapters/0"
        pod = apiserver.get_object(DEPLOY, NS, name)["spec"]["template"]["spec"]
        assert [c["name"] for c in pod["initContainers"]] == ["fetch-lora-0"]
    assert "--enable-lora" not in args("llama-router")
    await wait(lambda: "llama-config" in apiserver.names("v1/configmaps", NS))
    assert apiserver.get_object(DEPLOY, NS, "llama-decode")["metadata"]["uid"] == uid  # patched, not recreated


def _cell_engines(main: dict) -> dict[str, tuple]:
    """Each side's (engine args, worker options) as `baton serve-cell` passes its flags on:
    its own parser keeps the cell's, every engine's parser reads the rest and its side's."""
    import shlex

    from baton import cell
    from baton.worker.flags import parse as parse_worker

    args, engine_argv = cell.build_parser().parse_known_args(main["args"])
    return {side: parse_worker(engine_argv + shlex.split(extra), f"baton serve-{side}", side)
            for side, extra in (("prefill", args.prefill_args), ("decode", args.decode_args))}


def test_cell_pods_mount_and_fetch_the_adapters_and_every_engine_serves_them():
    import kubernetes_validate
    from test_operator_builders import KUBERNETES_VERSIONS

    document = body(lora=copy.deepcopy(LORA), cells={"replicas": 2, "decode": {"engines": 2}})
    deployment = find(builders.build_all(spec.parse(document), CONFIG), "Deployment", "llama-cell")
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(deployment, version, strict=True)
    pod, main = deployment["spec"]["template"]["spec"], container(deployment)
    assert main["command"] == ["baton", "serve-cell"]
    for side, (engine, options) in _cell_engines(main).items():
        assert (engine.enable_lora, engine.max_loras, engine.max_lora_rank, engine.max_cpu_loras) == (True, 3, 32, 6)
        assert dict(options.lora_modules) == {"sql": "/adapters/0/team/sql", "chat": "/adapters/1",
                                              "legal": "/adapters/2"}, side
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/adapters/0"]]["persistentVolumeClaim"] == {"claimName": "adapters", "readOnly": True}
    assert volumes[mounts["/adapters/1"]]["emptyDir"] == {}
    assert volumes[mounts["/adapters/2"]]["hostPath"]["path"] == "/data/legal"
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-lora-1"]
    # Without spec.lora, no engine of a cell runs with LoRA.
    plain = find(builders.build_all(spec.parse(body(cells={})), CONFIG), "Deployment", "llama-cell")
    assert not any(engine.enable_lora for engine, _ in _cell_engines(container(plain)).values())
    assert not [m for m in container(plain)["volumeMounts"] if m["mountPath"].startswith("/adapters")]


async def test_adding_adapters_rolls_the_cells_to_serve_them(apiserver, operator, claim, wait):
    await operator.start()
    await apiserver.create(IS, service(cells={"replicas": 1}))
    await wait(lambda: "llama-cell" in apiserver.names(DEPLOY, NS))
    uid = apiserver.get_object(DEPLOY, NS, "llama-cell")["metadata"]["uid"]

    def cell_pod() -> dict:
        return apiserver.get_object(DEPLOY, NS, "llama-cell")["spec"]["template"]["spec"]

    assert not any(engine.enable_lora for engine, _ in _cell_engines(cell_pod()["containers"][0]).values())
    await apiserver.merge(IS, NS, "llama", {"spec": {"lora": {"adapters": [
        {"name": "sql", "source": {"uri": "hf://org/sql-lora"}}]}}})
    await wait(lambda: "--enable-lora" in cell_pod()["containers"][0]["args"])
    for engine, options in _cell_engines(cell_pod()["containers"][0]).values():
        assert engine.enable_lora and dict(options.lora_modules) == {"sql": "/adapters/0"}
    assert [c["name"] for c in cell_pod()["initContainers"]] == ["fetch-lora-0"]
    assert {"name": "lora-0", "mountPath": "/adapters/0", "readOnly": True} in cell_pod()["containers"][0][
        "volumeMounts"]
    assert apiserver.get_object(DEPLOY, NS, "llama-cell")["metadata"]["uid"] == uid  # patched, not recreated

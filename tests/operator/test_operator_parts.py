"""The operator's pure parts: patches, quantities, conditions, settings, the model fetcher,
and the `baton operator` command line."""

from __future__ import annotations

import functools
import http.server
import io
import subprocess
import sys
import tarfile
import threading

import pytest

from baton.operator import diff, quantity, spec, status
from baton.operator.config import ConfigError, OperatorConfig
from baton.operator.fetch_model import FetchError, fetch, parse_hf

# --- three-way merge patches ---------------------------------------------------------


def test_no_patch_when_live_only_adds_server_defaults():
    desired = {"spec": {"replicas": 2, "template": {"containers": [{"name": "c", "image": "i"}]}}}
    live = {"metadata": {"uid": "u"}, "spec": {"replicas": 2, "progressDeadlineSeconds": 600,
            "template": {"containers": [{"name": "c", "image": "i", "imagePullPolicy": "Always"}]}}}
    assert diff.merge_patch(desired, live, desired) == {}


def test_patch_carries_only_changed_fields_and_replaces_lists():
    desired = {"spec": {"replicas": 3, "template": {"containers": [{"name": "c", "image": "j"}]},
                        "paused": False}}
    live = {"spec": {"replicas": 2, "template": {"containers": [{"name": "c", "image": "i"}]},
                     "paused": False}}
    assert diff.merge_patch(desired, live, {}) == {"spec": {
        "replicas": 3, "template": {"containers": [{"name": "c", "image": "j"}]}}}


def test_fields_the_operator_dropped_are_removed_but_replicas_are_released():
    last = {"spec": {"replicas": 2, "nodeSelector": {"gpu": "a100", "zone": "a"}}}
    desired = {"spec": {"nodeSelector": {"gpu": "a100"}}}
    live = {"spec": {"replicas": 7, "nodeSelector": {"gpu": "a100", "zone": "a"}}}
    assert diff.merge_patch(desired, live, last) == {"spec": {"nodeSelector": {"zone": None}}}


def test_fields_someone_else_set_are_left_alone():
    live = {"metadata": {"annotations": {"deployment.kubernetes.io/revision": "4"}}}
    assert diff.merge_patch({"metadata": {}}, live, {"metadata": {}}) == {}


def test_record_round_trips_and_ignores_itself():
    desired = {"metadata": {"name": "x", "labels": {"a": "b"}}, "spec": {"n": 1}}
    stamped = diff.with_record(desired)
    assert diff.recorded(stamped) == desired
    assert diff.merge_patch(diff.with_record(desired), stamped, diff.recorded(stamped)) == {}
    assert "annotations" not in desired["metadata"]  # the input is not changed


@pytest.mark.parametrize("live, desired, same", [
    (True, 1, False), (1, 1.0, True), ("1", 1, False), ([1, 2], [1], False),
    ({"a": 1, "b": 2}, {"a": 1}, True), (None, {}, False)])
def test_agrees(live, desired, same):
    assert diff.agrees(live, desired) is same


# --- quantities ------------------------------------------------------------------------


@pytest.mark.parametrize("text, canonical", [
    ("1024Mi", "1Gi"), ("1.5Gi", "1536Mi"), ("0.5Ki", "512"), (2000, "2k"), (0.5, "500m"),
    ("1", "1"), ("100m", "100m"), ("1e3", "1e3"), (1, "1"), ("32Gi", "32Gi"), (0.75, "750m")])
def test_quantities_are_written_as_the_api_server_stores_them(text, canonical):
    assert quantity.canonical(text) == canonical


def test_bad_quantities_are_spec_errors():
    with pytest.raises(ValueError):
        quantity.parse("lots")
    body = {"metadata": {"name": "x", "namespace": "n"}, "spec": {
        "model": {"source": {"hostPath": "/m"}},
        "prefill": {"resources": {"limits": {"memory": "lots"}}}}}
    with pytest.raises(spec.SpecError, match=r"spec.prefill.resources.limits.memory"):
        spec.parse(body)


# --- the typed spec ---------------------------------------------------------------------


def test_spec_errors_name_the_field_and_the_fix():
    def parse(**fields):
        return spec.parse({"metadata": {"name": "x", "namespace": "n"}, "spec": {
            "model": {"source": {"hostPath": "/m"}}, **fields}})

    with pytest.raises(spec.SpecError, match="minReplicas 0 needs spec.autoscaling.engine keda"):
        parse(decode={"autoscaling": {"minReplicas": 0, "maxReplicas": 2}})
    with pytest.raises(spec.SpecError, match="spec.worker does not apply to mode disaggregated"):
        parse(worker={})
    with pytest.raises(spec.SpecError, match="spec.colocated does not apply to mode disaggregated"):
        parse(colocated={})
    with pytest.raises(spec.SpecError, match="set spec.colocated or its old spelling spec.worker"):
        parse(mode="colocated", colocated={}, worker={})
    with pytest.raises(spec.SpecError, match="spec.worker.replicas has the wrong type"):
        parse(mode="colocated", worker={"replicas": "two"})
    with pytest.raises(spec.SpecError, match="spec is required"):
        spec.parse({"metadata": {"name": "x"}})
    with pytest.raises(spec.SpecError, match="wrong type"):
        parse(prefill={"replicas": "two"})
    ngram = {"speculative": {"numSpeculativeTokens": 2}}
    with pytest.raises(spec.SpecError, match=r"spec.prefill.engine.speculative is refused: prefill engines end "
                       r"each request at its first token.*set it on spec.decode.engine.speculative"):
        parse(prefill={"engine": ngram})
    with pytest.raises(spec.SpecError, match=r"spec.cells.prefill.engine.speculative is refused.*set it on "
                       r"spec.cells.decode.engine.speculative"):
        parse(cells={"prefill": {"engine": ngram}})
    assert parse(decode={"engine": ngram}, cells={"decode": {"engine": ngram}}).cells.decode.speculative_config
    svc = parse(decode={"autoscaling": {"maxReplicas": 2, "metric": "kv_cache_usage_perc"}})
    assert svc.role("decode").autoscaling.target == 0.8
    assert svc.model.served_name == "x"


# --- conditions ---------------------------------------------------------------------------


def deployment(replicas=2, ready=2, updated=2, conditions=()) -> dict:
    return {"metadata": {"labels": {"app.kubernetes.io/instance": "x"}},
            "spec": {"replicas": replicas},
            "status": {"readyReplicas": ready, "updatedReplicas": updated,
                       "conditions": list(conditions)}}


@pytest.mark.parametrize("dep, state, reason", [
    (None, False, "NotCreated"),
    (deployment(0, 0, 0), False, "ScaledToZero"),
    (deployment(2, 0, 2), False, "NoReplicasReady"),
    (deployment(2, 1, 2), True, "PartiallyReady"),
    (deployment(2, 2, 1), True, "RollingOut"),
    (deployment(2, 2, 2), True, "AllReplicasReady"),
    (deployment(2, 0, 2, [{"type": "Progressing", "status": "False"}]), False,
     "ProgressDeadlineExceeded"),
    (deployment(2, 0, 0, [{"type": "ReplicaFailure", "status": "True", "message": "quota"}]),
     False, "ReplicaFailure"),
])
def test_fleet_conditions(dep, state, reason):
    condition = status.fleet_condition("decode", "x-decode", dep)
    assert (condition.type, condition.status, condition.reason) == ("DecodeReady", state, reason)


def test_status_keeps_transition_times_and_problems():
    common = dict(components=["colocated", "router"],
                  names={"colocated": "x-colocated", "router": "x-router"},
                  url="http://x", generation=4)
    ready = {"colocated": deployment(), "router": deployment(1, 1, 1)}
    first = status.compute(deployments=ready, problems=[], previous=None, now="T1", **common)
    assert first["conditions"][0] == {"type": "Ready", "status": "True", "reason": "Serving",
                                      "message": first["conditions"][0]["message"],
                                      "lastTransitionTime": "T1", "observedGeneration": 4}
    assert first["colocated"] == {"replicas": 2, "readyReplicas": 2, "ready": "2/2"}
    again = status.compute(deployments=ready, problems=[], previous=first, now="T2", **common)
    assert again == first  # nothing changed: nothing to write
    blocked = status.compute(deployments=ready, previous=first, now="T3",
                             problems=[status.Problem("KedaNotInstalled", "install KEDA")], **common)
    assert blocked["conditions"][0]["lastTransitionTime"] == "T3"
    assert status.recorded_problems(blocked) == [status.Problem("KedaNotInstalled", "install KEDA")]
    assert status.recorded_problems(first) == []


# --- settings -----------------------------------------------------------------------------


def test_flags_win_over_environment_over_defaults():
    env = {"BATON_NAMESPACES": "a,b", "BATON_WORKER_IMAGE": "env/worker:1",
           "BATON_LOG_LEVEL": "debug"}
    config = OperatorConfig.from_args([], env)
    assert config.namespaces == ("a", "b") and not config.clusterwide
    assert config.worker_image == "env/worker:1" and config.log_level == "DEBUG"
    config = OperatorConfig.from_args(["--namespace", "c", "--worker-image", "flag/w:2"], env)
    assert config.namespaces == ("c",) and config.worker_image == "flag/w:2"
    default = OperatorConfig.from_args([], {})
    assert default.clusterwide and default.peering is None and default.kubeconfig is None
    assert OperatorConfig.from_args([], {"KUBECONFIG": "/k"}).kubeconfig == "/k"


@pytest.mark.parametrize("argv, message", [
    (["--namespace", "Bad_NS"], "not a namespace"),
    (["--log-level", "loud"], "BATON_LOG_LEVEL"),
    (["--resync-seconds", "0"], "must be positive"),
    (["--resync-seconds", "soon"], "not a number"),
    (["--health-port", "70000"], "65535"),
    (["--worker-image", "has space"], "not an image reference"),
])
def test_bad_settings_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        OperatorConfig.from_args(argv, {})


# --- the model fetcher ----------------------------------------------------------------------


def test_hf_uris_parse():
    assert parse_hf("hf://org/name@rev") == ("org/name", "rev")
    assert parse_hf("hf://org/name") == ("org/name", None)
    with pytest.raises(FetchError):
        parse_hf("hf://just-a-name")


@pytest.fixture
def archive_server(tmp_path):
    """A loopback HTTP server with model.tar.gz holding model/{config.json, weights, tokenizer}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("model/config.json", b"{}"), ("model/tokenizer.json", b"{}"),
                           ("model/model.safetensors", b"\0" * 64)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "model.tar.gz").write_bytes(buffer.getvalue())
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_unpacks_archives_and_skips_a_finished_fetch(archive_server, tmp_path):
    dest = tmp_path / "full"
    assert fetch(f"{archive_server}/model.tar.gz", dest) is True
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == [
        "config.json", "model.safetensors", "tokenizer.json"]
    assert fetch(f"{archive_server}/model.tar.gz", dest) is False
    router = tmp_path / "router"
    fetch(f"{archive_server}/model.tar.gz", router, tokenizer_only=True)
    assert not (router / "model.safetensors").exists() and (router / "tokenizer.json").exists()


def test_fetch_failures_are_clear(archive_server, tmp_path):
    from baton.operator.fetch_model import main

    assert main(["--uri", f"{archive_server}/missing.tar.gz", "--dest", str(tmp_path / "a")]) == 1
    assert main(["--uri", f"{archive_server}/bad.tar.gz", "--dest", str(tmp_path / "b")]) == 1
    with pytest.raises(FetchError, match="supported sources"):
        fetch("s3://bucket/model", tmp_path / "c")
    with pytest.raises(FetchError, match="archive"):
        fetch(f"{archive_server}/model.zip", tmp_path / "d")


# --- the command line -----------------------------------------------------------------------

# The control image has no torch (Dockerfile.control): the operator must not need it.
NO_TORCH = ("import sys\n"
            "for name in ('torch', 'xgrammar', 'safetensors'): sys.modules[name] = None\n"
            "from baton.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, "operator", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_cli_help_runs_without_torch():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "--peering" in result.stdout and "--namespace" in result.stdout


def test_cli_reports_bad_settings_and_a_missing_cluster(tmp_path):
    bad = run_cli("--log-level", "loud")
    assert bad.returncode == 2 and "BATON_LOG_LEVEL" in bad.stderr
    missing = run_cli("--kubeconfig", str(tmp_path / "nope"),
                      env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert missing.returncode == 1
    assert "no usable kubeconfig" in missing.stderr

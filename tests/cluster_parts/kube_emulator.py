"""The operator tests' API-server emulator, plus what the real kubectl asks of an API server.

`KubectlApiServer` extends `ApiServer` (tests/operator/conftest.py) with, as a real API
server serves them:
- the CRD's names in discovery (short name `bisvc`, category `baton`);
- OpenAPI v3 documents (`/openapi/v3`) for the CRD's group, built from the CRD's schema,
  so `kubectl apply` validates a manifest client-side before sending it;
- server-side printing: a `meta.k8s.io/v1` Table when the client asks for one, with the
  CRD's additionalPrinterColumns evaluated by a JSONPath subset (`.a.b`, `[?(@.k=="v")]`);
- the `scale` subresource of Deployments (an `autoscaling/v1` Scale);
- `fieldSelector` on lists and watches (`metadata.name`, `metadata.namespace`,
  `involvedObject.*` of Events), as `kubectl describe` and `kubectl delete --wait` use.
"""

from __future__ import annotations

import copy
import datetime
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import aiohttp.web
import jsonschema
import kmock
import yaml
from cluster_harness import ROOT
from kmock._internal import dicts, enums

from baton.operator import crd


def _load(name: str, path: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The operator tests' emulator, and their checks of a manifest against the CRD (its schema,
# strict about unknown fields, and its CEL rules).
emulator = _load("operator_emulator", "tests/operator/conftest.py")
crd_checks = _load("operator_crd_checks", "tests/operator/test_operator_crd.py")

CRD = yaml.safe_load(emulator.CRD_FILE.read_text())
GROUP, VERSION = CRD["spec"]["group"], CRD["spec"]["versions"][0]["name"]
PRINTER_COLUMNS = CRD["spec"]["versions"][0]["additionalPrinterColumns"]
_FILTER = re.compile(r'\[\?\(@\.(\w+)=="([^"]*)"\)\]')


def jsonpath(obj: Any, path: str) -> Any:
    """The value at a kubectl-style JSONPath (`.a.b`, `.list[?(@.key=="value")].field`)."""
    for part in re.findall(r'\.\w+|\[\?\(@\.\w+=="[^"]*"\)\]', path):
        if obj is None:
            return None
        match = _FILTER.fullmatch(part)
        if match:
            obj = next((item for item in obj or [] if item.get(match[1]) == match[2]), None)
        else:
            obj = obj.get(part[1:]) if isinstance(obj, dict) else None
    return obj


def _cell(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "date":
        return age(value)
    if kind in ("integer", "number", "boolean"):
        return value
    return value if isinstance(value, str) else json.dumps(value)


def age(created: str | None) -> str:
    """A timestamp as the API server prints a `date` column: the time since, humanised."""
    if not created:
        return "<unknown>"
    then = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = max(0, int((datetime.datetime.now(datetime.UTC) - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    return f"{minutes // 60}h"


def openapi_document() -> dict:
    """An OpenAPI v3 document of the CRD's group-version, as the API server publishes it."""
    schema = copy.deepcopy(CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    schema.setdefault("properties", {}).update({
        "apiVersion": {"type": "string"}, "kind": {"type": "string"},
        "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}})
    kind = CRD["spec"]["names"]["kind"]
    schema["x-kubernetes-group-version-kind"] = [
        {"group": GROUP, "version": VERSION, "kind": kind}]
    name = f"dev.baton.{VERSION}.{kind}"
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{CRD['spec']['names']['plural']}"
    ref = {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}
    gvk = {"group": GROUP, "version": VERSION, "kind": kind}
    # The fieldValidation parameter tells kubectl the server validates fields (strictly when
    # asked), so kubectl sends ?fieldValidation=Strict instead of validating itself.
    params = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]
    return {
        "openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": {
            base: {"post": {"requestBody": ref, "responses": {"201": ref}, "parameters": params,
                            "x-kubernetes-action": "post",
                            "x-kubernetes-group-version-kind": gvk}},
            base + "/{name}": {"patch": {"requestBody": ref, "responses": {"200": ref},
                                         "parameters": params, "x-kubernetes-action": "patch",
                                         "x-kubernetes-group-version-kind": gvk}}},
        "components": {"schemas": {name: schema}},
    }


def write_kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """A kubeconfig for the emulator at `server`, readable by anyone (containers run as 1000)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test",
                                                  "namespace": namespace}}]}))
    path.chmod(0o644)
    return path


class KubectlApiServer(emulator.ApiServer):
    """`ApiServer` plus discovery names, OpenAPI v3, Tables, Scale and field selectors."""

    def serve(self, resources: dict[str, tuple[str, set[str]]]) -> None:
        super().serve(resources)
        names = CRD["spec"]["names"]
        for key, info in self.resources.items():
            if key.group == GROUP:
                self.resources[key] = kmock.ResourceInfo(
                    kind=info.kind, singular=names["singular"], namespaced=True,
                    verbs=info.verbs, subresources=info.subresources,
                    shortnames=set(names["shortNames"]), categories=set(names["categories"]))

    async def _serve_version(self, request: Any) -> dict:
        # Subresources are listed without the names and categories of their resource, or
        # `kubectl get bisvc` would match `inferenceservices/status` too.
        result = await super()._serve_version(request)
        for entry in result["resources"]:
            if "/" in entry["name"]:
                entry.update(shortNames=[], categories=[], singularName="")
        return result

    async def _handle(self, request: Any) -> Any:
        path = request.url.path
        if path == "/openapi/v3":
            return aiohttp.web.json_response({"paths": {f"apis/{GROUP}/{VERSION}": {
                "serverRelativeURL": f"/openapi/v3/apis/{GROUP}/{VERSION}?hash=1"}}})
        if path == f"/openapi/v3/apis/{GROUP}/{VERSION}":
            return aiohttp.web.json_response(openapi_document())
        if path.startswith("/openapi/"):
            return await self._render_error(kmock.KubernetesEndpointNotFoundError())
        if (request.resource is not None and request.resource.plural == crd.PLURAL
                and request.subresource is None
                and request.action in (enums.action.CREATE, enums.action.UPDATE)):
            refusal = self._validate(request)
            if refusal is not None:
                return await self._render_error(refusal)
        if request.resource is not None and request.subresource == "scale":
            return await self._scale(request)
        if request.resource is not None and "as=Table" in request.headers.get("Accept", ""):
            return await self._table(request)
        return await super()._handle(request)

    # Validation of InferenceServices against the CRD.

    def _validate(self, request: Any) -> kmock.KubernetesError | None:
        """What the API server refuses: unknown fields (with ?fieldValidation=Strict, as
        kubectl sends by default) as BadRequest, schema and CEL violations as Invalid."""
        if request.action == enums.action.CREATE:
            obj = copy.deepcopy(request.data or {})
        else:
            old = self.get_object(self._path_of(request), request.namespace, request.name)
            if old is None:
                return None  # the emulator answers 404
            obj = (copy.deepcopy(request.data) if request.method.value.upper() == "PUT"
                   else dicts.patch_dict(old, request.data))
        obj = {k: v for k, v in dict(obj).items() if k != "status"}
        name = (obj.get("metadata") or {}).get("name", "")
        what = f'{CRD["spec"]["names"]["kind"]}.{GROUP} "{name}"'
        errors = self._schema_errors(obj)
        unknown = [e for e in errors if e.validator == "additionalProperties"]
        if unknown and request.params.get("fieldValidation") == "Strict":
            fields = [".".join([*map(str, e.path), extra]) for e in unknown
                      for extra in set(e.instance) - set(e.schema.get("properties", {}))]
            return kmock.KubernetesError(status=400, reason="BadRequest", message=(
                f"{what} cannot be handled: strict decoding error: "
                + ", ".join(f'unknown field "{f}"' for f in sorted(fields))))
        invalid = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors
                   if e.validator != "additionalProperties"]
        invalid += crd_checks.violations(obj) if not invalid else []
        if invalid:
            return kmock.KubernetesError(status=422, reason="Invalid",
                                         message=f"{what} is invalid: {'; '.join(invalid)}")
        return None

    @staticmethod
    def _schema_errors(obj: dict) -> list:
        schema = crd_checks._json_schema(crd_checks.SCHEMA)
        return list(jsonschema.Draft7Validator(schema).iter_errors(crd.apply_defaults(obj)))

    # Field selectors.

    @staticmethod
    def _selected(obj: dict, selector: str) -> bool:
        for term in filter(None, selector.split(",")):
            key, _, wanted = term.partition("=")
            value = obj
            for part in key.rstrip("=").split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if (value or "") != wanted.lstrip("="):
                return False
        return True

    async def _serve_list(self, request: Any) -> dict:
        result = await super()._serve_list(request)
        selector = request.params.get("fieldSelector")
        if selector:
            result["items"] = [i for i in result["items"] if self._selected(i, selector)]
        return result

    async def _serve_watch(self, request: Any):
        selector = request.params.get("fieldSelector")
        async for event in super()._serve_watch(request):
            if not selector or not isinstance(event, dict) or self._selected(
                    event.get("object", {}), selector):
                yield event

    # Server-side printing.

    async def _table(self, request: Any) -> Any:
        if request.name:
            obj = self.get_object(self._path_of(request), request.namespace, request.name)
            if obj is None:
                return await self._render_error(self._object_not_found(request))
            items, meta = [obj], {"resourceVersion": obj["metadata"].get("resourceVersion", "")}
        else:
            listed = await self._serve_list(request)
            items, meta = listed["items"], listed["metadata"]
        if request.resource.plural == crd.PLURAL:
            columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                        "description": "Name of the resource"}]
            columns += [{"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                         "priority": c.get("priority", 0), "description": c.get("description", "")}
                        for c in PRINTER_COLUMNS]
            rows = [[item["metadata"]["name"], *(
                _cell(jsonpath(item, c["jsonPath"]), c["type"]) for c in PRINTER_COLUMNS)]
                for item in items]
        else:  # other kinds: what the API server prints for a kind it has no columns for
            columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                        "description": ""},
                       {"name": "Created At", "type": "date", "format": "", "priority": 0,
                        "description": ""}]
            rows = [[item["metadata"]["name"], age(item["metadata"].get("creationTimestamp"))]
                    for item in items]
        include = request.params.get("includeObject", "Metadata")
        table_rows = []
        for item, cells in zip(items, rows):
            row = {"cells": cells}
            if include == "Object":
                row["object"] = item
            elif include == "Metadata":
                row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                 "metadata": item["metadata"]}
            table_rows.append(row)
        return aiohttp.web.json_response({
            "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
            "columnDefinitions": columns, "rows": table_rows})

    @staticmethod
    def _object_not_found(request: Any) -> kmock.KubernetesError:
        r = request.resource
        return kmock.KubernetesError(status=404, reason="NotFound", message=(
            f'{r.plural}{"." + r.group if r.group else ""} "{request.name}" not found'))

    @staticmethod
    def _path_of(request: Any) -> str:
        r = request.resource
        return f"{r.group}/{r.version}/{r.plural}" if r.group else f"{r.version}/{r.plural}"

    # The scale subresource.

    async def _scale(self, request: Any) -> Any:
        resource = self._path_of(request)
        info = self.resources.get(request.resource)
        if info is None or "scale" not in info.subresources:
            return await self._render_error(kmock.KubernetesError(
                status=404, reason="NotFound", message="the server could not find the requested resource"))
        obj = self.get_object(resource, request.namespace, request.name)
        if obj is None:
            return await self._render_error(self._object_not_found(request))
        if request.method.value.upper() in ("PATCH", "PUT"):
            data = request.data or {}
            replicas = (data.get("spec") or {}).get("replicas")
            if not isinstance(replicas, int) or replicas < 0:
                return await self._render_error(kmock.KubernetesError(
                    status=422, reason="Invalid", message="spec.replicas: a non-negative integer"))
            obj = await self.merge(resource, request.namespace, request.name,
                                   {"spec": {"replicas": replicas}})
        return aiohttp.web.json_response({
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {k: obj["metadata"].get(k) for k in
                         ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")},
            "spec": {"replicas": obj["spec"].get("replicas", 1)},
            "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                       "selector": ",".join(f"{k}={v}" for k, v in (
                           obj["spec"].get("selector", {}).get("matchLabels") or {}).items())},
        })


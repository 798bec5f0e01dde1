"""The command lines the operator writes are the ones the workers and the router accept
(docs/operations.md, "Process command lines")."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from baton import cli
from baton.operator import spec
from baton.operator.builders import router as router_builder
from baton.operator.builders import workers as worker_builder
from baton.router.config import build_parser as router_parser
from baton.worker.flags import build_parser as worker_parser

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
ROLES = {"prefill": "prefill", "decode": "decode", "colocated": "colocated"}


def _services(path: Path):
    return [spec.parse(doc) for doc in yaml.safe_load_all(path.read_text())
            if doc and doc.get("kind") == "InferenceService"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_operator_command_lines_parse(path):
    services = _services(path)
    if not services:
        pytest.skip("no InferenceService in this example")
    for svc in services:
        svc = _with_extra_args(svc)
        for role in svc.roles:
            args = worker_builder.worker_args(svc, role)
            command = worker_builder.COMMANDS[role.name]
            assert cli.ALIASES.get(command, command) == f"serve-{ROLES[role.name]}"
            ns = worker_parser(f"baton {command}", ROLES[role.name]).parse_args(args)
            assert ns.port == 50051 and ns.metrics_port == 9090 and ns.host == "0.0.0.0"
            if ROLES[role.name] != "colocated":
                assert ns.kv_transfer == svc.transport
        ns = router_parser().parse_args(router_builder.router_args(svc))
        assert ns.discovery == "kubernetes" and ns.port == 8000


def _with_extra_args(svc):
    """The engine fields an `extraArgs` list may set reach EngineArgs through flags too."""
    import dataclasses

    roles = tuple(dataclasses.replace(r, engine=dataclasses.replace(
        r.engine, extra_args=("--enforce-eager", "--attention-backend", "torch")))
        for r in svc.roles)
    return dataclasses.replace(svc, roles=roles)


def test_every_crd_transport_is_a_worker_transport():
    from baton.operator import crd

    for transport in crd.TRANSPORTS:
        for role in ("prefill", "decode"):
            ns = worker_parser(f"baton serve-{role}", role).parse_args(["--kv-transfer", transport])
            assert ns.kv_transfer == transport

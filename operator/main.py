"""`baton operator`: run the InferenceService operator.

Connects with `--kubeconfig` / KUBECONFIG when given, else with the pod's service account
when running in a cluster, else with ~/.kube/config. Watches every namespace unless `--namespace` is given,
and runs standalone (no kopf peering objects) unless `--peering NAME` is given.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import sys
import tempfile
import weakref

import kopf
import kubernetes

from baton.operator.config import ConfigError, OperatorConfig
from baton.operator.handlers import register
from baton.operator.kube import Kube
from baton.operator.reconcile import Reconciler


class ClusterConfigError(RuntimeError):
    """Neither in-cluster credentials nor a usable kubeconfig were found."""


def load_api_client(kubeconfig: str | None) -> kubernetes.client.ApiClient:
    """An API client for `kubeconfig` if given, else the in-cluster service account, else
    ~/.kube/config. Leaves the kubernetes library's global configuration alone."""
    if kubeconfig is None:
        configuration = kubernetes.client.Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
            return kubernetes.client.ApiClient(configuration)
        except kubernetes.config.ConfigException:
            pass
    try:
        return kubernetes.config.new_client_from_config(config_file=kubeconfig)
    except (kubernetes.config.ConfigException, OSError) as error:
        where = kubeconfig or "~/.kube/config"
        raise ClusterConfigError(
            f"not in a cluster and no usable kubeconfig at {where} (set --kubeconfig or "
            f"KUBECONFIG): {error}") from None


def build(config: OperatorConfig, api_client: kubernetes.client.ApiClient,
          ) -> tuple[kopf.OperatorRegistry, Reconciler]:
    """The registry with every handler, and the reconciler behind them."""
    # Discovery answers are cached per process: another cluster or a restarted API server
    # must not read a stale cache, and the root filesystem may be read-only but /tmp not.
    cache = tempfile.mkdtemp(prefix="baton-operator-")
    reconciler = Reconciler(Kube(api_client, cache_file=os.path.join(cache, "discovery.json")),
                            config)
    weakref.finalize(reconciler, shutil.rmtree, cache, True)  # gone with the reconciler
    registry = kopf.OperatorRegistry()
    register(registry, reconciler, config, api_client.configuration)
    return registry, reconciler


async def run(config: OperatorConfig, registry: kopf.OperatorRegistry, *,
              stop_flag: asyncio.Event | None = None,
              ready_flag: asyncio.Event | None = None) -> None:
    """Run kopf until `stop_flag` is set (or a signal arrives, in the main thread)."""
    await kopf.operator(
        registry=registry,
        clusterwide=config.clusterwide,
        namespaces=list(config.namespaces),
        standalone=config.peering is None,
        peering_name=config.peering,
        # Replicas sharing a peering must differ in priority: equal ones all pause.
        priority=random.randint(1, 2**30) if config.peering else 0,
        liveness_endpoint=(f"http://0.0.0.0:{config.health_port}/healthz"
                           if config.health_port else None),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of `baton operator`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = OperatorConfig.from_args(argv, os.environ)
    except ConfigError as error:
        print(f"baton operator: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        api_client = load_api_client(config.kubeconfig)
    except ClusterConfigError as error:
        print(f"baton operator: {error}", file=sys.stderr)
        return 1
    registry, _ = build(config, api_client)
    scope = ", ".join(config.namespaces) if config.namespaces else "all namespaces"
    logging.getLogger("baton.operator").info(
        "watching %s; worker image %s, control image %s; %s", scope, config.worker_image,
        config.control_image, f"peering {config.peering}" if config.peering else "standalone")
    asyncio.run(run(config, registry))
    return 0

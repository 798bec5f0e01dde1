"""The operator's settings: one frozen value built from flags and environment.

Every setting has a flag and a `BATON_*` environment variable (the chart sets the
variables); a flag wins over the variable, the variable over the default. Nothing else in
`baton.operator` reads the environment.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from baton import __version__

# The images built from Dockerfile and Dockerfile.control (docs/operator.md says how);
# the tag follows the package version, as the chart's appVersion does.
DEFAULT_WORKER_IMAGE = f"ghcr.io/baton-dev/baton:{__version__}"
DEFAULT_CONTROL_IMAGE = f"ghcr.io/baton-dev/baton-control:{__version__}"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ConfigError(ValueError):
    """A setting is invalid; the message names the flag and its variable."""


@dataclass(frozen=True)
class OperatorConfig:
    """Settings of one `baton operator` process.

    `namespaces` empty means every namespace (cluster-wide watch). `peering` None means
    standalone: no kopf peering objects are read or needed.
    """

    worker_image: str = DEFAULT_WORKER_IMAGE
    control_image: str = DEFAULT_CONTROL_IMAGE
    namespaces: tuple[str, ...] = ()
    log_level: str = "INFO"
    peering: str | None = None
    resync_seconds: float = 60.0
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    cluster_domain: str = "cluster.local"
    health_port: int = 8080
    kubeconfig: str | None = None  # None: in-cluster service account, else ~/.kube/config

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_args(cls, argv: Sequence[str], environ: Mapping[str, str]) -> OperatorConfig:
        """Parse `baton operator` flags over `environ`. Raises ConfigError on bad values.

        `--help` exits through argparse (SystemExit 0), as any CLI does.
        """
        parser = _parser(environ)
        args = parser.parse_args(list(argv))
        given = args.namespace or [environ.get("BATON_NAMESPACES", "")]
        namespaces = tuple(dict.fromkeys(
            ns.strip() for item in given for ns in item.split(",") if ns.strip()))
        for ns in namespaces:
            if not _DNS_LABEL.match(ns):
                raise ConfigError(f"--namespace / BATON_NAMESPACES: {ns!r} is not a namespace "
                                  "name")
        level = args.log_level.upper()
        if level not in LOG_LEVELS:
            raise ConfigError(f"--log-level / BATON_LOG_LEVEL: {args.log_level!r} is not one of "
                              f"{', '.join(LOG_LEVELS)}")
        resync = _number(args.resync_seconds, "--resync-seconds / BATON_RESYNC_SECONDS", float)
        if resync <= 0:
            raise ConfigError("--resync-seconds / BATON_RESYNC_SECONDS must be positive")
        port = _number(args.health_port, "--health-port / BATON_HEALTH_PORT", int)
        if not 0 <= port <= 65535:
            raise ConfigError("--health-port / BATON_HEALTH_PORT must be 0 (off) to 65535")
        for flag, value in (("--worker-image", args.worker_image),
                            ("--control-image", args.control_image)):
            if not value or any(ch.isspace() for ch in value):
                raise ConfigError(f"{flag}: {value!r} is not an image reference")
        return cls(
            worker_image=args.worker_image,
            control_image=args.control_image,
            namespaces=namespaces,
            log_level=level,
            peering=args.peering or None,
            resync_seconds=resync,
            prometheus_url=args.prometheus_url,
            cluster_domain=args.cluster_domain,
            health_port=port,
            kubeconfig=args.kubeconfig or None,
        )


def _number(text: str, name: str, kind: type) -> float:
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {text!r} is not a number") from None


def _parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton operator",
        description="Run the InferenceService operator.",
    )
    parser.add_argument(
        "--namespace", action="append", default=None,
        metavar="NS[,NS...]",
        help="watch only these namespaces (repeatable; env BATON_NAMESPACES); default: all")
    parser.add_argument(
        "--worker-image", default=env.get("BATON_WORKER_IMAGE", DEFAULT_WORKER_IMAGE),
        help="image for prefill/decode/worker pods when spec.image is unset "
             "(env BATON_WORKER_IMAGE; default %(default)s)")
    parser.add_argument(
        "--control-image", default=env.get("BATON_CONTROL_IMAGE", DEFAULT_CONTROL_IMAGE),
        help="image for router pods when spec.router.image is unset "
             "(env BATON_CONTROL_IMAGE; default %(default)s)")
    parser.add_argument(
        "--log-level", default=env.get("BATON_LOG_LEVEL", "INFO"),
        help=f"one of {', '.join(LOG_LEVELS)} (env BATON_LOG_LEVEL; default %(default)s)")
    parser.add_argument(
        "--peering", default=env.get("BATON_PEERING") or None, metavar="NAME",
        help="coordinate replicas through the kopf peering object NAME (env BATON_PEERING); "
             "default: standalone, no peering objects needed")
    parser.add_argument(
        "--resync-seconds", default=env.get("BATON_RESYNC_SECONDS", "60"),
        help="re-check every InferenceService this often, repairing drift and retrying "
             "blocked ones (env BATON_RESYNC_SECONDS; default %(default)s)")
    parser.add_argument(
        "--prometheus-url",
        default=env.get("BATON_PROMETHEUS_URL", OperatorConfig.prometheus_url),
        help="Prometheus that KEDA queries for worker metrics (env BATON_PROMETHEUS_URL; "
             "default %(default)s)")
    parser.add_argument(
        "--cluster-domain", default=env.get("BATON_CLUSTER_DOMAIN", "cluster.local"),
        help="DNS domain used in status.url (env BATON_CLUSTER_DOMAIN; default %(default)s)")
    parser.add_argument(
        "--kubeconfig", default=env.get("KUBECONFIG") or None, metavar="FILE",
        help="connect with this kubeconfig (env KUBECONFIG); default: the in-cluster service "
             "account, else ~/.kube/config")
    parser.add_argument(
        "--health-port", default=env.get("BATON_HEALTH_PORT", "8080"),
        help="serve GET /healthz on this port, 0 to disable (env BATON_HEALTH_PORT; "
             "default %(default)s)")
    return parser

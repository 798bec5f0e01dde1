"""What `spec.kvTransfer` adds to prefill and decode pods: UCX settings, RDMA devices.

UCX reads its settings from the environment (`UCX_TLS`, `UCX_NET_DEVICES`), so the spec's
`kvTransfer.ucx` becomes container variables; a role's own `env` still wins. With
`kvTransfer.rdma` each prefill and decode pod requests the RDMA device plugin's resource,
joins the listed secondary networks (Multus), gets IPC_LOCK to pin memory for the HCA,
and UCX's transports default to the RDMA set without `tcp`, so a pod without a usable HCA
fails its handoffs visibly instead of moving KV over TCP unnoticed.
"""

from __future__ import annotations

from baton.operator.builders import common
from baton.operator.spec import InferenceService, Role

# UCX transports with RDMA: reliable-connected verbs for the wire, cuda_copy to stage GPU
# memory where GPUDirect RDMA is not available, sm/self for UCX's own local endpoints.
RDMA_TLS = ("rc", "cuda_copy", "sm", "self")
NETWORKS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"


def _moves_kv(role: Role) -> bool:
    return role.name in ("prefill", "decode")


def listeners(svc: InferenceService, role: Role) -> list[tuple[str, int, str]]:
    """(port name, port, worker flag) of the KV listeners a decode worker opens besides its
    gRPC port: UCX's for ucx, the KV TCP listener for tcp, both for auto (whose UCX listener
    opens only where the pod has an RDMA device). Prefill workers listen for none."""
    if role.name != "decode":
        return []
    transport = svc.transport
    found = []
    if transport in ("ucx", "auto"):
        found.append(("kv", common.KV_PORT, "--kv-port"))
    if transport in ("tcp", "auto"):
        found.append(("kv-tcp", common.KV_TCP_PORT, "--kv-tcp-port"))
    return found


def env(svc: InferenceService, role: Role) -> list[dict]:
    """UCX variables for a prefill or decode container (none for other roles)."""
    kv = svc.kv_transfer
    if not (_moves_kv(role) and kv.uses_ucx):
        return []
    tls = kv.ucx_tls or (RDMA_TLS if kv.rdma else ())
    variables = []
    if tls:
        variables.append({"name": "UCX_TLS", "value": ",".join(tls)})
    if kv.ucx_net_devices:
        variables.append({"name": "UCX_NET_DEVICES", "value": ",".join(kv.ucx_net_devices)})
    return variables


def args(svc: InferenceService, role: Role) -> list[str]:
    """KV listener ports and the UCX progress mode, as worker flags."""
    found = [arg for _, port, flag in listeners(svc, role) for arg in (flag, str(port))]
    kv = svc.kv_transfer
    if _moves_kv(role) and kv.uses_ucx and kv.ucx_progress_mode:
        found += ["--ucx-progress-mode", kv.ucx_progress_mode]
    return found


def resources(svc: InferenceService, role: Role) -> dict:
    """The role's resources plus the RDMA device (unless the role names it itself)."""
    merged = {section: dict(amounts) for section, amounts in role.placement.resources.items()}
    rdma = svc.kv_transfer.rdma
    if rdma and _moves_kv(role):
        limits = merged.setdefault("limits", {})
        limits.setdefault(rdma.resource_name, str(rdma.count))
        if "requests" in merged:  # an extended resource's request must equal its limit
            merged["requests"].setdefault(rdma.resource_name, limits[rdma.resource_name])
    return merged


def capabilities(svc: InferenceService, role: Role) -> list[str]:
    """Capabilities added to the worker container (all others stay dropped)."""
    return ["IPC_LOCK"] if svc.kv_transfer.rdma and _moves_kv(role) else []


def annotations(svc: InferenceService, role: Role) -> dict:
    rdma = svc.kv_transfer.rdma
    if rdma and rdma.networks and _moves_kv(role):
        return {NETWORKS_ANNOTATION: ",".join(rdma.networks)}
    return {}

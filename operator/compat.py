"""Prefill/decode compatibility: checked before any pod starts.

A prefill worker writes KV blocks byte for byte into a decode worker's pool, so both must
build the same KV layout (`baton.kvtransfer.layout.KVLayout`: model, layers, KV heads,
head size, block size, dtype). In an InferenceService the model, its dtype, quantization
and KV cache dtype (`spec.model`; the spec's "fp8" and "fp8_e4m3" are read as one value)
are shared by both roles by construction; what can still differ per role is the block
size and engine flags passed through `extraArgs`.

The CRD refuses it at apply time (CEL): unequal `engine.blockSize`, and `extraArgs` that
set a flag the operator writes from a typed field (`crd.TYPED_FLAGS`: they define the
layout, the pod's ports or its tracing). `problems` checks the same, in either `--flag
value` or `--flag=value` form, so that a spec that reached the operator without CEL (an
old cluster, an edit before the CRD was upgraded) still creates no worker and says what
to change.
"""

from __future__ import annotations

from collections.abc import Sequence

from baton.operator.crd import TYPED_FLAGS
from baton.operator.spec import Engine, InferenceService
from baton.operator.status import Problem

REASON = "IncompatibleRoles"


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of `--flag` in `args` (last one wins, as argparse does), or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == f"--{flag}":
            value = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith(f"--{flag}="):
            value = arg.split("=", 1)[1]
    return value


# What `baton serve-cell` sets per engine besides the typed flags.
CELL_FLAGS = ("device", "cell")


def _typed_flags(path: str, engine: Engine, flags: Sequence[str] = TYPED_FLAGS) -> list[Problem]:
    given = [flag for flag in flags if flag_value(engine.extra_args, flag) is not None]
    if not given:
        return []
    return [Problem(REASON, f"{path}.engine.extraArgs sets --{given[0]}, which the "
                    "operator sets from the spec: remove it from extraArgs and use the typed "
                    "field (model, model.dtype, model.quantization, model.kvCacheDtype, "
                    "engine.blockSize, engine.tensorParallelSize, kvTransfer, tracing.otlpEndpoint)")]


def problems(svc: InferenceService) -> list[Problem]:
    """Why prefill and decode of `svc` could not exchange KV, each saying what to change.

    Empty for a compatible spec and for colocated services (which move no KV).
    """
    found = [problem for role in svc.roles for problem in _typed_flags(f"spec.{role.name}", role.engine)]
    if svc.mode != "disaggregated":
        return found
    engines = [("spec.prefill", svc.role("prefill").engine), ("spec.decode", svc.role("decode").engine)]
    if svc.cells:
        cell_engines = [("spec.cells.prefill", svc.cells.prefill), ("spec.cells.decode", svc.cells.decode)]
        found += [p for path, engine in cell_engines for p in _typed_flags(path, engine, (*TYPED_FLAGS, *CELL_FLAGS))]
        engines += cell_engines
    (first, reference), *others = engines
    for path, engine in others:
        if engine.block_size != reference.block_size:
            found.append(Problem(REASON, (
                f"{first}.engine.blockSize ({reference.block_size}) differs from "
                f"{path}.engine.blockSize ({engine.block_size}): KV blocks are copied "
                "as they are, so set both to the same value")))
            break
    return found

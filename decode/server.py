"""`baton serve-decode` and `baton serve-worker` (colocated): process entry points."""

from __future__ import annotations

from baton.worker_runtime import run_worker


def main(argv: list[str]) -> int:
    """A decode worker: reserves KV blocks, receives prompt KV, streams the output."""

    def make(engine, runtime):
        from baton.decode.service import DecodeServicer

        return DecodeServicer(engine, runtime)

    return run_worker(argv, "baton serve-decode", "decode", make)


def main_colocated(argv: list[str]) -> int:
    """A colocated worker: prefill and decode in one engine."""

    def make(engine, runtime):
        from baton.decode.colocated import ColocatedServicer

        return ColocatedServicer(engine, runtime)

    return run_worker(argv, "baton serve-worker", "colocated", make)

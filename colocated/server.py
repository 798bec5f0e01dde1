"""`baton serve-colocated` (alias `baton serve-worker`): the colocated worker process."""

from __future__ import annotations

from baton.worker.runtime import run_worker


def main(argv: list[str]) -> int:
    """A colocated worker: prefill and decode in one engine."""

    def make(engine, runtime):
        from baton.colocated.service import ColocatedServicer

        return ColocatedServicer(engine, runtime)

    return run_worker(argv, "baton serve-colocated", "colocated", make)

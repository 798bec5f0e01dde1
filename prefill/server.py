"""`baton serve-prefill`: the prefill worker process."""

from __future__ import annotations

from baton.worker.runtime import run_worker


def main(argv: list[str]) -> int:
    """A prefill worker: computes prompt KV and pushes it to the decode worker's reservation."""

    def make(engine, runtime):
        from baton.prefill.service import PrefillServicer

        return PrefillServicer(engine, runtime)

    return run_worker(argv, "baton serve-prefill", "prefill", make)

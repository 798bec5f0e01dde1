"""`baton serve-decode`: the decode worker process."""

from __future__ import annotations

from baton.worker.runtime import run_worker


def main(argv: list[str]) -> int:
    """A decode worker: reserves KV blocks, receives prompt KV, streams the output."""

    def make(engine, runtime):
        from baton.decode.service import DecodeServicer

        return DecodeServicer(engine, runtime)

    return run_worker(argv, "baton serve-decode", "decode", make)

"""Test-only fault injection: `BATON_KV_FAULT=<point>` makes this process misbehave on purpose.

Read through `baton.settings.kv_fault()` at each handoff, so a test process can switch it
on and off. Points (each fires at most once per handoff, mid-data):

- `sender_exit`: the sender process exits (killed mid-transfer).
- `sender_stop`: the sender process stops itself (SIGSTOP): a peer that never answers.
- `receiver_exit`, `receiver_stop`: the same on the receiving (decode) process.
- `corrupt_chunk`: the sender flips a byte of its second gRPC chunk after checksumming it.

Never set in production; the worker logs a warning at start when it is.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from baton import settings

POINTS = ("sender_exit", "sender_stop", "receiver_exit", "receiver_stop", "corrupt_chunk")


def active(point: str) -> bool:
    return settings.kv_fault() == point


def fire(point: str) -> None:
    """Exit or stop this process if `point` is the configured fault."""
    if not active(point):
        return
    if point.endswith("_exit"):
        sys.stderr.write(f"BATON_KV_FAULT={point}: exiting\n")
        sys.stderr.flush()
        os._exit(17)
    if point.endswith("_stop"):
        # Directed at this thread, not the process: a process-directed SIGSTOP may be taken
        # by another thread, and this one would run on (and send its bytes) until that
        # thread is scheduled to stop the group, which on a loaded machine it did.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)

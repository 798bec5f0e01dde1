import sys
from pathlib import Path

import pytest

# The worker processes import their code from this folder (kvt_harness.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def kv_tiny_dir(tmp_path_factory) -> Path:
    """The embedded tiny model (random Llama), written once for this area's tests."""
    from baton.engine.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("kv-tiny"))


class Peers:
    """Long-lived worker processes by name, started in parallel, respawned after a test
    killed or stopped one. `d*` peers act as decode workers, `p*` as prefill workers."""

    SPECS = {
        "d16": dict(block_size=16, num_blocks=400),
        "p16": dict(block_size=16, num_blocks=400),
        "d4": dict(block_size=4, num_blocks=400),
        "p4": dict(block_size=4, num_blocks=400),
        # Tensor-parallel engines (two processes each over gloo), started only by the tests
        # that name them.
        "d4tp2": dict(block_size=4, num_blocks=64, tensor_parallel_size=2),
        "p4tp2": dict(block_size=4, num_blocks=64, tensor_parallel_size=2),
    }

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self._peers = {}

    def start(self, *names):
        from kvt_harness import Peer

        for name in names:
            peer = self._peers.get(name)
            if peer is None or not peer.alive:
                self._peers[name] = Peer(self.model_dir, **self.SPECS[name])

    def __getitem__(self, name):
        self.start(name)
        return self._peers[name].ready()

    def discard(self, name):
        peer = self._peers.pop(name, None)
        if peer is not None:
            peer.close()

    def close(self):
        for name in list(self._peers):
            self.discard(name)


@pytest.fixture(scope="session")
def peers(kv_tiny_dir):
    registry = Peers(kv_tiny_dir)
    registry.start(*(name for name in Peers.SPECS if "tp" not in name))  # the rest on first use
    yield registry
    registry.close()

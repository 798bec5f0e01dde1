from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kv_tiny_dir(tmp_path_factory) -> Path:
    """The embedded tiny model (random Llama), written once for this area's tests."""
    from baton.engine.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("kv-tiny"))

"""Quantized tiny checkpoints: `quant_checkpoints.py` writes them (this folder is put on
`sys.path`, as the project imports test modules with `--import-mode=importlib`)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """Baton's embedded tiny model (float32 weights)."""
    from baton.engine.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny"))

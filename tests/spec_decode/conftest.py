"""Speculative decoding tests: the tiny model, and `spec_helpers` on `sys.path` (the project
imports test modules with `--import-mode=importlib`)."""

import sys
from pathlib import Path

import pytest

from baton.engine.tiny_model import write_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))

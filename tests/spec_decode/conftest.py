"""Speculative decoding tests: the tiny model, and `spec_helpers` on `sys.path` (the project
imports test modules with `--import-mode=importlib`)."""

import sys
from pathlib import Path

import pytest

from baton.engine.tiny_model import write_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_helpers import make_engine, perturbed_copy  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def plain(tiny_model):
    """An engine without speculation: what speculation must reproduce."""
    return make_engine(tiny_model)


@pytest.fixture(scope="session")
def draft_dir(tiny_model, tmp_path_factory) -> Path:
    """A draft model for `tiny_model` (`spec_helpers.perturbed_copy`)."""
    return perturbed_copy(tiny_model, tmp_path_factory.mktemp("draft") / "draft")

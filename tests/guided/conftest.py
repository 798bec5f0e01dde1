"""Engines over the embedded tiny model (random weights: it never writes valid JSON itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from baton.engine import EngineArgs, LLMEngine, SamplingParams
from baton.engine.tiny_model import random_llama_weights, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _make_engine(model: Path, **overrides) -> LLMEngine:
    args = dict(model=str(model), device="cpu", num_gpu_blocks_override=512, max_model_len=2048)
    args.update(overrides)
    return LLMEngine.from_engine_args(EngineArgs(**args))


@pytest.fixture(scope="session")
def engine(tiny_model) -> LLMEngine:
    """One shared engine; every test leaves it empty (all requests finished)."""
    return _make_engine(tiny_model)


@pytest.fixture
def clean_engine(engine):
    yield engine
    assert not engine.has_unfinished_requests()
    assert engine.stats().kv_cache_usage == 0.0  # no leaked blocks


@pytest.fixture(scope="session")
def padded_vocab_model(tmp_path_factory) -> Path:
    """The tiny model with a 600-wide lm_head over its 512-token tokenizer."""
    out = write_tiny_model(tmp_path_factory.mktemp("padded"))
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = 600
    (out / "config.json").write_text(json.dumps(config))
    weights = {k: v.contiguous() for k, v in random_llama_weights(config, seed=3).items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _run_all(engine: LLMEngine, requests: dict[str, tuple[object, SamplingParams]], max_steps: int = 5000):
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    return _drain(engine, max_steps)


def _drain(engine: LLMEngine, max_steps: int = 5000):
    finals = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finals
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    raise AssertionError("the engine did not finish its requests")


@pytest.fixture
def run_all():
    """run_all(engine, {id: (prompt, params)}): add all, step until done; id -> final output."""
    return _run_all


@pytest.fixture
def drain():
    """drain(engine): step until nothing is left; id -> final output of what finished."""
    return _drain


@pytest.fixture
def make_engine():
    """make_engine(model_dir, **engine_args): a CPU engine over a tiny model."""
    return _make_engine

"""GPU tests: CUDA-only ones carry the `gpu` marker (CI never runs them; run `pytest -m gpu`).

The engine's tiny Hugging Face models and the transformers reference come from
tests/engine/conftest.py (which also puts tests/engine on `sys.path` for `lora_helpers`),
and `run_all` (add requests, step until done) from tests/guided/conftest.py, loaded here by
path so the folders share one definition. The
project imports test modules with `--import-mode=importlib`, so this folder is put on
`sys.path` for the shared `attention_cases` helpers.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))



def _load(folder: str):
    spec = importlib.util.spec_from_file_location(f"{folder}_conftest", Path(__file__).parents[1] / folder / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_engine = _load("engine")
tiny_dir = _engine.tiny_dir
hf_models = _engine.hf_models
hf = _engine.hf
run_all = _load("guided").run_all

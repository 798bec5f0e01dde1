"""Embeddings: how a prompt's final hidden states become one vector (`--task embed`).

A pooling request is a prefill that samples nothing: the model runner hands the engine the
final hidden states (after the model's last norm) of the rows each step computed for it,
the engine folds them with `Pooler`, and the request ends when its whole prompt has been
computed, freeing its KV blocks (nothing is kept, nothing is cached for a later prefix).

The pooling comes from the model directory as sentence-transformers writes it
(`modules.json` naming a `Pooling` module whose `config.json` says `pooling_mode_lasttoken`,
`pooling_mode_mean_tokens` or `pooling_mode_cls_token`, and a `Normalize` module for L2
normalisation), as vLLM reads it; a model without one (a plain decoder) pools its last token
and normalises, vLLM's default for decoder embedding models. `EngineArgs.pooling_type`
overrides the kind.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

POOLING_TYPES = ("last", "mean", "cls")
TASKS = ("generate", "embed")
_ST_MODES = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}


@dataclass(frozen=True)
class PoolingConfig:
    type: str  # "last", "mean" or "cls" (first token)
    normalize: bool
    source: str  # where it was read, for the log and errors

    def __post_init__(self) -> None:
        if self.type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {self.type!r}")


def read_pooling_config(model_dir: Path, override: str | None = None) -> PoolingConfig:
    """The model's pooling (see the module docstring); raises ValueError for one Baton does
    not implement (max pooling, several modes at once)."""
    kind, normalize, source = "last", True, "a decoder without a pooling config: last token, normalized (default)"
    modules_file = model_dir / "modules.json"
    if modules_file.exists():
        modules = json.loads(modules_file.read_text())
        normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        pooling = next((m for m in modules if str(m.get("type", "")).endswith("Pooling")), None)
        if pooling is not None:
            cfg = json.loads((model_dir / pooling.get("path", "") / "config.json").read_text())
            modes = [mode for key, mode in _ST_MODES.items() if cfg.get(key)]
            others = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _ST_MODES]
            if len(modes) != 1 or others:
                raise ValueError(f"{model_dir}: pooling {sorted(k for k, v in cfg.items() if v is True)} is not "
                                 f"supported (one of {sorted(_ST_MODES)})")
            kind = modes[0]
        source = f"{modules_file.name}: {kind}" + (", normalized" if normalize else "")
    if override is not None:
        kind, source = override.lower(), f"pooling_type={override}" + (", normalized" if normalize else "")
    return PoolingConfig(kind, normalize, source)


class Pooler:
    """Folds one request's hidden-state rows, chunk by chunk, into its embedding.

    `add(rows, start)`: the hidden states [n, hidden] of prompt positions start..start+n-1
    (a chunk may be computed again from 0 after a preemption, which restarts the fold).
    """

    def __init__(self, config: PoolingConfig, num_tokens: int):
        self.config = config
        self.num_tokens = num_tokens
        self.value: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, start: int) -> None:
        rows = rows.float()
        kind = self.config.type
        if kind == "mean":
            total = rows.sum(dim=0)
            self.value = total if start == 0 or self.value is None else self.value + total
        elif kind == "cls" and start == 0:
            self.value = rows[0].clone()
        elif kind == "last" and start + rows.shape[0] == self.num_tokens:
            self.value = rows[-1].clone()

    def result(self) -> list[float]:
        """The embedding, once every position was added."""
        if self.value is None:
            raise RuntimeError("no hidden states were pooled")
        vec = self.value / self.num_tokens if self.config.type == "mean" else self.value
        if self.config.normalize:
            vec = torch.nn.functional.normalize(vec, p=2, dim=0)
        return vec.cpu().tolist()

"""The shared base, the router and the operator import no torch and no engine.

Only worker processes load torch: the worker runtime and the role folders (`baton.worker`,
`baton.prefill`, `baton.decode`, `baton.colocated`), the engine, and the KV data plane
(the `baton.kvtransfer` modules that move tensors). Everything else, the CLI, settings,
tokenizer, protocol, `baton up`, router and operator, must start without them: the router
and operator images ship no torch.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER_AND_ENGINE = {"baton.engine", "baton.worker", "baton.prefill", "baton.decode", "baton.colocated"}
# The kvtransfer modules that hold or copy KV tensors; `baton.kvtransfer` itself and its
# ticket, layout, config and errors stay torch-free (the router forwards tickets).
KV_DATA_PLANE = {f"baton.kvtransfer.{m}" for m in
                 ("blocks", "pool", "sender", "receiver", "grpc_transport", "ucx_transport", "tcp_transport",
                  "ipc_transport")}
FORBIDDEN = ("torch", "baton.engine")


def _modules() -> dict[str, list[str]]:
    """Top-level package -> every module in its folder, from pyproject's package-dir."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    mapped = {(ROOT / folder).resolve() for folder in package_dir.values()}
    found: dict[str, list[str]] = {}
    for package, folder in package_dir.items():
        if package in WORKER_AND_ENGINE:
            continue
        base = ROOT / folder
        for dirpath, dirnames, filenames in os.walk(base):  # does not follow baton/operator's link
            here = pathlib.Path(dirpath)
            dirnames[:] = [d for d in dirnames if (here / d).resolve() not in mapped and d != "__pycache__"]
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                parts = [*here.relative_to(base).parts, name[:-3]]
                module = ".".join([package, *(p for p in parts if p != "__init__")])
                if module not in KV_DATA_PLANE:
                    found.setdefault(package, []).append(module)
    return found


MODULES = _modules()

# One fresh interpreter per component; each module is imported in turn and sys.modules is
# checked right after it, so a module that loads torch is named exactly (everything imported
# before it was found torch-free).
_PROBE = """
import importlib, json, sys
bad = {}
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
    loaded = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
    if loaded:
        bad[name] = loaded
        break
print(json.dumps(bad))
"""


def test_the_walk_finds_the_shared_modules():
    names = {m for mods in MODULES.values() for m in mods}
    for expected in ("baton.cli", "baton.up", "baton.tokenizer", "baton.router.app",
                     "baton.operator.main", "baton.kvtransfer.ticket", "baton.protos.worker_pb2"):
        assert expected in names
    assert not names & KV_DATA_PLANE and not any(n.startswith("baton.engine") for n in names)


@pytest.mark.parametrize("package", sorted(MODULES))
def test_importing_shared_modules_loads_no_torch_or_engine(package):
    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(MODULES[package]), json.dumps(FORBIDDEN)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}, "these modules import torch or the engine"

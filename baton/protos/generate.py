"""Regenerate the protobuf and gRPC modules: `python -m baton.protos.generate`.

Protos import each other by their path from the repository root (`baton/protos/x.proto`),
so the generated modules import each other as `baton.protos.x_pb2`. The output is committed;
tests/test_protos.py checks it is up to date.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        return []
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    rel = PROTO_DIR.relative_to(ROOT)
    return sorted((out_dir / rel).glob("*_pb2*.py*"))


if __name__ == "__main__":
    for path in generate():
        print(path)
    sys.exit(0)

"""The committed gRPC/protobuf modules are exactly what `python -m baton.protos.generate` makes."""

from pathlib import Path

from baton.protos.generate import PROTO_DIR, ROOT, generate


def test_generated_modules_are_up_to_date(tmp_path: Path):
    fresh = generate(out_dir=tmp_path)
    assert fresh, "no protos found"
    rel = PROTO_DIR.relative_to(ROOT)
    committed = sorted(p.name for p in PROTO_DIR.glob("*_pb2*.py*"))
    assert committed == sorted(p.name for p in fresh), "run: python -m baton.protos.generate"
    for path in fresh:
        assert (ROOT / rel / path.name).read_text() == path.read_text(), (
            f"{rel / path.name} is stale; run: python -m baton.protos.generate"
        )

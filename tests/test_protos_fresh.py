"""The committed authz/envoy/gen/ is what protos/ compiles to (`make protos`)."""

from __future__ import annotations

from pathlib import Path

from authz.envoy import protogen


class TestGenerated:
    def test_committed_modules_are_fresh(self, tmp_path: Path) -> None:
        """Regenerating into a temporary directory gives byte-identical files."""
        written = protogen.generate(tmp_path)
        fresh = {p.name: p.read_bytes() for p in written}
        committed = {
            p.name: p.read_bytes()
            for p in protogen.GEN_DIR.iterdir()
            if p.is_file() and p.suffix in (".py", ".pyi")
        }
        stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
        assert not stale, f"authz/envoy/gen is stale ({', '.join(stale)}): run `make protos`"

    def test_one_module_per_proto(self) -> None:
        """Every .proto in protos/ has its generated module."""
        for proto in protogen.PROTO_DIR.glob("*.proto"):
            assert (protogen.GEN_DIR / f"{proto.stem}_pb2.py").is_file(), proto.name

"""The committed admin API code is what `make protos` generates from protos/ (fails when stale)."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
PROTO = "aviary/admin/v1/admin.proto"
GENERATED = ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("protos")
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/timestamp.proto
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{REPO / 'protos'}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(REPO / "protos" / PROTO),
        ]
    )
    assert status == 0, "protoc failed"
    return out / "aviary" / "admin" / "v1"


@pytest.mark.parametrize("name", GENERATED)
def test_generated_code_is_fresh(regenerated: Path, name: str) -> None:
    committed = REPO / "xds" / "aviary" / "admin" / "v1" / name
    assert committed.read_text() == (regenerated / name).read_text(), (
        f"{committed.relative_to(REPO)} is stale: run `make protos` and commit the result"
    )

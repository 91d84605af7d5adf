"""The committed generated code is what `make protos` generates from protos/ (fails when stale)."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
# proto -> (its package directory, the files generated from it)
PROTOS = {
    "aviary/admin/v1/admin.proto": ("aviary/admin/v1", ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")),
    "aviary/reports/v1/envoy_metrics.proto": (
        "aviary/reports/v1", ("envoy_metrics_pb2.py", "envoy_metrics_pb2.pyi", "envoy_metrics_pb2_grpc.py")),
}


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
            *(str(REPO / "protos" / proto) for proto in PROTOS),
        ]
    )
    assert status == 0, "protoc failed"
    return out


@pytest.mark.parametrize(("package", "name"), [(package, name) for package, names in PROTOS.values()
                                               for name in names])
def test_generated_code_is_fresh(regenerated: Path, package: str, name: str) -> None:
    committed = REPO / "xds" / package / name
    assert committed.read_text() == (regenerated / package / name).read_text(), (
        f"{committed.relative_to(REPO)} is stale: run `make protos` and commit the result"
    )

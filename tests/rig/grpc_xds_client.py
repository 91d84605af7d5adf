"""Proxyless gRPC client on ``xds:///<name>`` (run with sys.executable, in its own process).

Kept out of the pytest process on purpose: ``GRPC_XDS_BOOTSTRAP`` and gRPC's xDS client are
process-global. Makes N unary calls to /aviary.test.Echo/Version over ONE channel and prints one
JSON line: {"by_version": {...}, "failed": n, "errors": [...], "first_rpc_s": s, "total_s": s}.

Usage: grpc_xds_client.py --bootstrap FILE --target xds:///name --rpcs N [--header name=value ...]
(``--header`` sends that metadata with every call: what a cohort's header or cookie condition reads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

VERSION_METHOD = "/aviary.test.Echo/Version"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", type=Path, required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--rpcs", type=int, default=500)
    ap.add_argument("--first-timeout", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--header", action="append", default=[], help="name=value metadata on every call")
    args = ap.parse_args()
    metadata = tuple(tuple(item.split("=", 1)) for item in args.header)

    os.environ["GRPC_XDS_BOOTSTRAP"] = str(args.bootstrap)
    import grpc  # after the env var: the xDS client reads it when the first xds channel is made

    by_version: dict[str, int] = {}
    failed = 0
    errors: list[str] = []
    started = time.monotonic()
    first_rpc_s: float | None = None
    with grpc.insecure_channel(args.target) as channel:
        rpc = channel.unary_unary(VERSION_METHOD)
        for i in range(args.rpcs):
            try:
                # The first call waits for the xDS resources (LDS, RDS, CDS, EDS) to arrive.
                answer: bytes = rpc(
                    b"",
                    timeout=args.first_timeout if i == 0 else args.timeout,
                    wait_for_ready=i == 0,
                    metadata=metadata or None,
                )
                version = answer.decode()
                by_version[version] = by_version.get(version, 0) + 1
            except grpc.RpcError as exc:
                failed += 1
                if len(errors) < 10:
                    errors.append(f"rpc {i}: {exc.code()}: {exc.details()}")  # type: ignore[attr-defined]
            if i == 0:
                first_rpc_s = time.monotonic() - started
    result = {
        "by_version": by_version,
        "failed": failed,
        "errors": errors,
        "first_rpc_s": first_rpc_s,
        "total_s": time.monotonic() - started,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

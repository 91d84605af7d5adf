"""Watch `aviary serve` while N Envoy-like streams connect (the fan-out harness's first phase).

    python -m tests.bench.stall_probe --streams 10000 [--workers 2] [--no-retry] [--workdir DIR]

Every 5 s: streams with a route and streams ended (from the client logs), the server's CPU seconds
per process, and its established TCP connections (``ss``). Once no stream got a route for 15 s
while some still wait (a stall), or at ``--dump-at`` s, every server process's stack is dumped with
py-spy into the work directory. Nothing is asserted; the logs stay in the work directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
from pathlib import Path

from tests.bench.fanout import BIN, aviary_server, clients
from tests.bench.fanout_client import raise_fd_limit
from tests.bench.procstat import cpu_seconds, load_average


def established(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    return len(out.splitlines())


def client_progress(workdir: Path) -> str:
    lines = []
    for log in sorted(workdir.glob("client-*.log")):
        last = [line for line in log.read_text().splitlines() if "routed" in line]
        lines.append(last[-1].split(": ", 1)[1] if last else "-")
    return " | ".join(lines)


def dump(pids: list[int], workdir: Path, tag: str) -> None:
    for pid in pids:
        out = subprocess.run([str(BIN / "py-spy"), "dump", "--pid", str(pid)], capture_output=True, text=True,
                             check=False)  # fmt: skip
        (workdir / f"pyspy-{tag}-{pid}.txt").write_text(out.stdout + out.stderr)
    summary = subprocess.run(["ss", "-s"], capture_output=True, text=True, check=False).stdout
    (workdir / f"ss-{tag}.txt").write_text(summary)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-retry", action="store_true")
    parser.add_argument("--ready-timeout", type=float, default=150)
    parser.add_argument("--dump-at", type=float, default=0, help="also dump stacks at this second")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/stall-probe"))
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `aviary serve` argument")
    args = parser.parse_args()
    raise_fd_limit()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    client_args = ("--ready-timeout", str(args.ready_timeout), *(("--no-retry",) if args.no_retry else ()))
    async with aviary_server(args.workers, workdir, extra_args=tuple(args.serve_arg)) as server:
        pids = server.pids()
        print("server pids", pids, "load", load_average(), flush=True)
        async with clients(server.port, args.streams, workdir, client_args) as procs:
            start = time.time()
            for proc in procs:
                proc.send("connect")
            ready_tasks = [asyncio.create_task(proc.expect("ready", args.ready_timeout + 60)) for proc in procs]
            cpu_before = {pid: cpu_seconds([pid]) for pid in pids}
            last_progress, routed_before, dumped_stall, dumped_at = time.time(), "", False, False
            while not all(t.done() for t in ready_tasks):
                await asyncio.sleep(5)
                now = time.time() - start
                cpu = {pid: round(cpu_seconds([pid]) - cpu_before[pid], 1) for pid in pids}
                progress = client_progress(workdir)
                print(f"{now:5.0f}s cpu {cpu} estab {established(server.port)} clients: {progress}", flush=True)
                if progress != routed_before:
                    routed_before, last_progress = progress, time.time()
                elif not dumped_stall and time.time() - last_progress >= 15:
                    await asyncio.to_thread(dump, pids, workdir, f"stall-{now:.0f}s")
                    print("  no progress for 15 s: stacks dumped", flush=True)
                    dumped_stall = True
                if args.dump_at and not dumped_at and now >= args.dump_at:
                    await asyncio.to_thread(dump, pids, workdir, f"at-{now:.0f}s")
                    dumped_at = True
            ready = [t.result() for t in ready_tasks]
            served = sum(int(r[0]) for r in ready)
            ended: dict[str, int] = {}
            for r in ready:
                for code, count in json.loads(r[3]).items():
                    ended[code] = ended.get(code, 0) + count
            print(json.dumps({"streams": args.streams, "workers": args.workers, "served": served,
                              "first_route_all_s": round(max(float(r[1]) for r in ready) - start, 1),
                              "ended": ended, "retries": sum(int(r[4]) for r in ready),
                              "load": load_average()}), flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())

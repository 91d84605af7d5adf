"""One process per state file and per port: the lock file, the state store's use of it, and the
listening-socket checks (``aviary.store.lock``, ``aviary.listen``)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from aviary.discovery.cache import SnapshotCache
from aviary.discovery.server import AggregatedDiscoveryService, start_xds_server
from aviary.listen import ListenError, check_can_listen, split_address
from aviary.store.lock import LockHeld, ProcessLock, lock_path_for
from aviary.store.sqlite import StateError, StateInUse, StateStore
from tests.rig.ports import free_port

# ------------------------------------------------------------------------------ the lock


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock of tmp_path/state.db until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from aviary.store.lock import ProcessLock
        lock = ProcessLock.acquire(Path({str(tmp_path / "state.db")!r}))
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    with pytest.raises(LockHeld) as refused:
        ProcessLock.acquire(tmp_path / "state.db")
    assert refused.value.pid == holder.pid
    assert refused.value.lock_file == tmp_path / "state.db.lock"


def test_the_lock_goes_with_its_holder_even_after_kill_9(tmp_path: Path, holder: subprocess.Popen[str]) -> None:
    holder.kill()
    holder.wait()
    lock = ProcessLock.acquire(tmp_path / "state.db")  # the kernel dropped it: nothing stale to clean
    assert lock.held
    lock.release()


def test_one_process_cannot_take_its_own_lock_twice(tmp_path: Path) -> None:
    """flock belongs to the open file: a second StateStore in the same process is refused too."""
    with ProcessLock.acquire(tmp_path / "state.db"), pytest.raises(LockHeld):
        ProcessLock.acquire(tmp_path / "state.db")


def test_release_frees_it_and_leaves_the_file(tmp_path: Path) -> None:
    lock = ProcessLock.acquire(tmp_path / "state.db")
    assert lock_path_for(tmp_path / "state.db").read_text().strip().isdigit()
    lock.release()
    lock.release()  # idempotent
    assert lock_path_for(tmp_path / "state.db").exists()  # never unlinked: see aviary.store.lock
    ProcessLock.acquire(tmp_path / "state.db").release()


def test_a_forgotten_lock_is_freed_when_collected(tmp_path: Path) -> None:
    ProcessLock.acquire(tmp_path / "state.db")  # dropped at once
    ProcessLock.acquire(tmp_path / "state.db").release()


def test_children_that_exec_do_not_inherit_it(tmp_path: Path) -> None:
    lock = ProcessLock.acquire(tmp_path / "state.db")
    child = subprocess.Popen(["sleep", "30"], close_fds=False)  # even with close_fds off: O_CLOEXEC
    try:
        lock.release()
        ProcessLock.acquire(tmp_path / "state.db").release()
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------------------------------------ the state store


def test_a_second_store_on_the_same_file_is_refused_and_reset_deletes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = StateStore(path)
    first.mark_alive(1.0, ["envoy-1"])
    with pytest.raises(StateInUse, match=r"state\.db is in use by another aviary serve \(pid \d+\)"):
        StateStore(path)
    with pytest.raises(StateInUse):
        StateStore(path, reset=True)
    assert path.exists()
    assert first.last_alive() == (1.0, frozenset({"envoy-1"}))  # still its file, still readable
    first.close()
    assert StateStore(path).last_alive() == (1.0, frozenset({"envoy-1"}))


def test_a_directory_where_the_state_file_should_be(tmp_path: Path) -> None:
    """Works as root too: nothing opens a directory for writing."""
    path = tmp_path / "state.db"
    path.mkdir()
    with pytest.raises(StateError, match=r"state\.db cannot be used: Is a directory$"):
        StateStore(path)
    ProcessLock.acquire(path).release()  # the refusal released the lock


def test_a_state_file_under_a_file_instead_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match=r"cannot open lock file .*: Not a directory$"):
        StateStore(tmp_path / "file" / "state.db")


# ------------------------------------------------------------------------------ ports


def test_split_address() -> None:
    assert split_address("127.0.0.1:18000") == ("127.0.0.1", 18000)
    assert split_address("[::1]:0") == ("::1", 0)
    for bad in ("18000", "host:", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_a_busy_port_is_named_with_the_os_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ListenError, match="address already in use") as refused:
            check_can_listen("admin", address)
    assert (refused.value.role, refused.value.address) == ("admin", address)
    check_can_listen("admin", address)  # free again
    check_can_listen("xds", "127.0.0.1:0")


async def test_a_second_xds_server_on_the_same_port_fails_unless_reuse_port_is_asked_for() -> None:
    """grpcio would set SO_REUSEPORT and let both listen; Aviary's servers turn it off."""
    service = AggregatedDiscoveryService(SnapshotCache(), lambda event: None)
    address = f"127.0.0.1:{free_port()}"
    first, _ = await start_xds_server(address, service)
    try:
        with pytest.raises(ListenError, match="address already in use"):
            await start_xds_server(address, service)
    finally:
        await first.stop(0)
    shared = [await start_xds_server(address, service, reuse_port=True) for _ in range(2)]
    for server, _ in shared:
        await server.stop(0)

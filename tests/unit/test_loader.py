"""Loading policy files: per-file errors, cross-file rules, and the last-good PolicyBook."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from aviary.discovery.resources import cluster_name
from aviary.policy.loader import (
    LoadResult,
    PolicyBook,
    load_directory,
    orphan_conflicts,
    parse_policy_text,
    validate_paths,
)
from aviary.policy.schema import PolicyError, PolicySet, Rollout


def policy(name: str, hosts: tuple[str, ...] = ("*",), port: int = 10000, version: str = "v1") -> str:
    host_list = ", ".join(f'"{h}"' for h in hosts)
    return (
        "apiVersion: aviary.dev/v1\n"
        "kind: Rollout\n"
        f"metadata: {{name: {name}}}\n"
        "spec:\n"
        f"  listener: {{address: 0.0.0.0, port: {port}}}\n"
        f"  hosts: [{host_list}]\n"
        f"  version: {version}\n"
        '  endpoints: ["127.0.0.1:8081"]\n'
    )


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def fields(errors: list[PolicyError]) -> list[tuple[str, str]]:
    return [(Path(e.file).name, e.field) for e in errors]


# ------------------------------------------------------------------------------ parse_policy_text


def test_parse_valid() -> None:
    rollout, errors = parse_policy_text(policy("a"), "a.yaml")
    assert errors == [] and rollout is not None and rollout.name == "a"


def test_yaml_syntax_error_has_line() -> None:
    rollout, errors = parse_policy_text("kind: Rollout\nspec:\n  hosts: [a\n", "bad.yaml")
    assert rollout is None
    assert len(errors) == 1 and errors[0].field == "-"
    assert "line 4" in errors[0].reason or "line 3" in errors[0].reason


def test_tab_indentation_reports_line() -> None:
    _, errors = parse_policy_text("kind: Rollout\n\tspec: 1\n", "bad.yaml")
    assert errors[0].field == "-" and "line 2" in errors[0].reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "file is empty"),
        ("# only a comment\n", "file is empty"),
        ("---\n", "file is empty"),
        (policy("a") + "---\n" + policy("b"), "found 2"),
        ("- a\n- b\n", "expected a mapping"),
        ("just text\n", "expected a mapping"),
        ("kind: Rollout\nkind: Rollout\n", "duplicate key 'kind'"),
    ],
)
def test_whole_file_errors(text: str, reason: str) -> None:
    rollout, errors = parse_policy_text(text, "x.yaml")
    assert rollout is None
    assert [(e.file, e.field) for e in errors] == [("x.yaml", "-")]
    assert reason in errors[0].reason


def test_trailing_empty_document_is_fine() -> None:
    rollout, errors = parse_policy_text(policy("a") + "---\n", "a.yaml")
    assert errors == [] and rollout is not None


def test_schema_errors_use_yaml_paths() -> None:
    text = policy("a").replace('["127.0.0.1:8081"]', '["127.0.0.1:8081", "nope"]')
    _, errors = parse_policy_text(text, "a.yaml")
    assert [(e.file, e.field) for e in errors] == [("a.yaml", "spec.endpoints[1]")]
    assert str(errors[0]).startswith("a.yaml: spec.endpoints[1]: invalid endpoint 'nope'")


# ---------------------------------------------------------------------------------- load_directory


def test_load_directory_valid(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", policy("a", ("a.com",)))
    b = write(tmp_path, "b.yml", policy("b", ("b.com",)))
    result = load_directory(tmp_path)
    assert result.errors == []
    assert set(result.rollouts) == {"a", "b"}
    assert result.rollouts["a"][1] == a and result.rollouts["b"][1] == b
    assert result.files[a] == hashlib.sha256(policy("a", ("a.com",)).encode()).hexdigest()


def test_load_directory_ignores_other_files(tmp_path: Path) -> None:
    write(tmp_path, ".hidden.yaml", "broken: [")
    write(tmp_path, "notes.txt", "broken: [")
    write(tmp_path, "a.yaml.bak", "broken: [")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "c.yaml", "broken: [")
    (tmp_path / "dir.yaml").mkdir()
    result = load_directory(tmp_path)
    assert result == LoadResult({}, [], {}, {})


def test_invalid_files_are_listed_with_their_hash(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "kind: [")
    good = write(tmp_path, "good.yaml", policy("good"))
    result = load_directory(tmp_path)
    assert set(result.files) == {bad, good}
    assert list(result.rollouts) == ["good"]
    assert fields(result.errors) == [("bad.yaml", "-")]


def test_non_utf8_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_bytes(b"kind: \xff\xfe\n")
    result = load_directory(tmp_path)
    assert fields(result.errors) == [("a.yaml", "-")]
    assert "UTF-8" in result.errors[0].reason
    assert len(result.files[str(tmp_path / "a.yaml")]) == 64


def test_unreadable_file(tmp_path: Path) -> None:
    """Mode 000 stops anyone but root; as root (CI), a policy file that is a link to
    /proc/self/mem: a regular file to stat, whose read at offset 0 fails (EIO) for root too."""
    path = tmp_path / "a.yaml"
    if os.geteuid() == 0:
        path.symlink_to("/proc/self/mem")
        assert path.is_file()
    else:
        path.write_text(policy("a"))
        path.chmod(0)
    result = load_directory(tmp_path)
    assert fields(result.errors) == [("a.yaml", "-")]
    assert "cannot read file: " in result.errors[0].reason
    assert str(path) in result.files


def test_missing_directory(tmp_path: Path) -> None:
    result = load_directory(tmp_path / "nope")
    assert not result.listed
    assert [(e.file, e.field) for e in result.errors] == [(str(tmp_path / "nope"), "-")]


def test_duplicate_name_across_files(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", policy("shop", ("a.com",)))
    write(tmp_path, "b.yaml", policy("shop", ("b.com",)))
    result = load_directory(tmp_path)
    assert result.rollouts["shop"][1] == a
    assert fields(result.errors) == [("b.yaml", "metadata.name")]
    assert "already used by" in result.errors[0].reason and a in result.errors[0].reason


def test_host_conflict_on_same_listener_is_case_insensitive(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", ("shop.com",)))
    write(tmp_path, "b.yaml", policy("b", ("other.com", "SHOP.com")))
    result = load_directory(tmp_path)
    assert list(result.rollouts) == ["a"]
    assert fields(result.errors) == [("b.yaml", "spec.hosts[1]")]
    assert "0.0.0.0:10000" in result.errors[0].reason and "'a'" in result.errors[0].reason


def test_same_host_on_different_listeners_is_fine(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", ("shop.com",), port=10000))
    write(tmp_path, "b.yaml", policy("b", ("shop.com",), port=10001))
    assert set(load_directory(tmp_path).rollouts) == {"a", "b"}


def test_wildcards_do_not_conflict_with_exact_hosts(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", ("*",)))
    write(tmp_path, "b.yaml", policy("b", ("*.shop.com",)))
    write(tmp_path, "c.yaml", policy("c", ("a.shop.com",)))
    assert load_directory(tmp_path).errors == []


def test_validate_blames_the_newer_file_as_the_running_server_does(tmp_path: Path) -> None:
    """z.yaml serves; a.yaml, added later, claims its host: the server refuses a.yaml, the newcomer.
    `aviary validate` used to blame the lexically later file (z.yaml) instead."""
    serving = write(tmp_path, "z.yaml", policy("z", ("shop.com",)))
    os.utime(serving, ns=(1_000_000_000, 1_000_000_000))
    book = PolicyBook()
    book.apply(load_directory(tmp_path))
    write(tmp_path, "a.yaml", policy("a", ("shop.com",)))
    _, server_errors = book.apply(load_directory(tmp_path))
    assert fields(server_errors) == [("a.yaml", "spec.hosts[0]")]
    assert fields(validate_paths([tmp_path])) == [("a.yaml", "spec.hosts[0]")]
    assert fields(PolicyBook().apply(load_directory(tmp_path))[1]) == [("a.yaml", "spec.hosts[0]")]  # fresh start


def test_losers_still_count_as_valid_on_their_own(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a"))
    b = write(tmp_path, "b.yaml", policy("b"))
    result = load_directory(tmp_path)
    assert b in result.valid and "b" not in result.rollouts


# ------------------------------------------------------------------------------------ PolicyBook


def test_book_applies_valid_files(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", policy("a", ("a.com",)))
    book = PolicyBook()
    policy_set, errors = book.apply(load_directory(tmp_path))
    assert errors == []
    assert list(policy_set.rollouts) == ["a"] and policy_set.files == {"a": a}
    assert policy_set.revision is None
    assert book.current is policy_set


def test_broken_file_keeps_last_good(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", version="v1"))
    book = PolicyBook()
    first, _ = book.apply(load_directory(tmp_path))
    write(tmp_path, "a.yaml", policy("a", version="v2").replace("port: 10000", "port: 0"))
    second, errors = book.apply(load_directory(tmp_path))
    assert second.rollouts == first.rollouts
    assert fields(errors) == [("a.yaml", "spec.listener.port")]
    write(tmp_path, "a.yaml", policy("a", version="v2"))
    third, errors = book.apply(load_directory(tmp_path))
    assert errors == [] and third.rollouts["a"].spec.version == "v2"


def test_broken_new_file_serves_nothing(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "kind: [")
    policy_set, errors = PolicyBook().apply(load_directory(tmp_path))
    assert policy_set.rollouts == {} and fields(errors) == [("a.yaml", "-")]


def test_removed_file_removes_its_rollout(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", ("a.com",)))
    write(tmp_path, "b.yaml", policy("b", ("b.com",)))
    book = PolicyBook()
    book.apply(load_directory(tmp_path))
    (tmp_path / "a.yaml").unlink()
    policy_set, errors = book.apply(load_directory(tmp_path))
    assert errors == [] and list(policy_set.rollouts) == ["b"]


def test_removed_broken_file_removes_last_good(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a"))
    book = PolicyBook()
    book.apply(load_directory(tmp_path))
    write(tmp_path, "a.yaml", "kind: [")
    assert list(book.apply(load_directory(tmp_path))[0].rollouts) == ["a"]
    (tmp_path / "a.yaml").unlink()
    assert book.apply(load_directory(tmp_path)) == (book.current, [])
    assert book.current.rollouts == {}


def test_unlisted_directory_keeps_everything(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a"))
    book = PolicyBook()
    before, _ = book.apply(load_directory(tmp_path))
    after, errors = book.apply(load_directory(tmp_path / "gone"))
    assert after == before and len(errors) == 1


def test_serving_rollout_wins_over_lexically_earlier_newcomer(tmp_path: Path) -> None:
    z = write(tmp_path, "z.yaml", policy("z", ("shop.com",)))
    book = PolicyBook()
    book.apply(load_directory(tmp_path))
    write(tmp_path, "a.yaml", policy("a", ("shop.com",)))
    policy_set, errors = book.apply(load_directory(tmp_path))
    assert policy_set.files == {"z": z}
    assert fields(errors) == [("a.yaml", "spec.hosts[0]")]


def test_serving_name_wins_over_newcomer(tmp_path: Path) -> None:
    z = write(tmp_path, "z.yaml", policy("shop", ("z.com",)))
    book = PolicyBook()
    book.apply(load_directory(tmp_path))
    write(tmp_path, "a.yaml", policy("shop", ("a.com",)))
    policy_set, errors = book.apply(load_directory(tmp_path))
    assert policy_set.files == {"shop": z}
    assert fields(errors) == [("a.yaml", "metadata.name")]


def test_changed_file_cannot_displace_a_running_rollout(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", ("a.com",)))
    write(tmp_path, "b.yaml", policy("b", ("b.com",)))
    book = PolicyBook()
    before, _ = book.apply(load_directory(tmp_path))
    write(tmp_path, "a.yaml", policy("a", ("a.com", "b.com"), version="v2"))
    after, errors = book.apply(load_directory(tmp_path))
    assert after.rollouts == before.rollouts  # a keeps serving its old version, b untouched
    assert fields(errors) == [("a.yaml", "spec.hosts[1]")]


def test_released_host_can_be_taken_in_the_same_load(tmp_path: Path) -> None:
    write(tmp_path, "z.yaml", policy("z", ("shop.com",)))
    book = PolicyBook()
    book.apply(load_directory(tmp_path))
    write(tmp_path, "z.yaml", policy("z", ("other.com",)))
    a = write(tmp_path, "a.yaml", policy("a", ("shop.com",)))
    policy_set, errors = book.apply(load_directory(tmp_path))
    assert errors == []
    assert policy_set.files["a"] == a and policy_set.rollouts["z"].spec.hosts == ("other.com",)


def test_released_host_between_serving_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", ("a.com",)))
    write(tmp_path, "b.yaml", policy("b", ("shop.com",)))
    book = PolicyBook()
    book.apply(load_directory(tmp_path))
    # a (processed first) wants the host b gives up in the same load.
    write(tmp_path, "a.yaml", policy("a", ("a.com", "shop.com")))
    write(tmp_path, "b.yaml", policy("b", ("b.com",)))
    policy_set, errors = book.apply(load_directory(tmp_path))
    assert errors == []
    assert policy_set.rollouts["a"].spec.hosts == ("a.com", "shop.com")


def test_newcomers_lexically_first_wins(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", policy("a", ("shop.com",)))
    write(tmp_path, "b.yaml", policy("b", ("shop.com",)))
    policy_set, errors = PolicyBook().apply(load_directory(tmp_path))
    assert policy_set.files == {"a": a}
    assert fields(errors) == [("b.yaml", "spec.hosts[0]")]


def test_loser_takes_over_when_winner_leaves(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", ("shop.com",)))
    b = write(tmp_path, "b.yaml", policy("b", ("shop.com",)))
    book = PolicyBook()
    book.apply(load_directory(tmp_path))
    (tmp_path / "a.yaml").unlink()
    policy_set, errors = book.apply(load_directory(tmp_path))
    assert errors == [] and policy_set.files == {"b": b}


def test_errors_are_all_current_problems(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", ("shop.com",)))
    write(tmp_path, "b.yaml", policy("b", ("shop.com",)))
    write(tmp_path, "c.yaml", "kind: [")
    book = PolicyBook()
    _, errors = book.apply(load_directory(tmp_path))
    assert fields(errors) == [("c.yaml", "-"), ("b.yaml", "spec.hosts[0]")]
    _, again = book.apply(load_directory(tmp_path))
    assert again == errors
    write(tmp_path, "c.yaml", policy("c", ("c.com",)))
    write(tmp_path, "b.yaml", policy("b", ("b.com",)))
    policy_set, errors = book.apply(load_directory(tmp_path))
    assert errors == [] and set(policy_set.rollouts) == {"a", "b", "c"}


def test_unchanged_load_returns_same_set(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a"))
    book = PolicyBook()
    first, _ = book.apply(load_directory(tmp_path))
    second, _ = book.apply(load_directory(tmp_path))
    assert second is first


# -------------------------------------------------------------------------------- validate_paths


def test_validate_files_and_directories(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    write(d, "a.yaml", policy("a", ("shop.com",)))
    write(d, "bad.yaml", "kind: [")
    other = Path(write(tmp_path, "other.txt", policy("b", ("shop.com",))))
    errors = validate_paths([d, other])
    assert fields(errors) == [("bad.yaml", "-"), ("other.txt", "spec.hosts[0]")]


def test_validate_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    errors = validate_paths([missing])
    assert errors == [PolicyError(str(missing), "-", "no such file or directory")]


def test_validate_counts_a_file_once(tmp_path: Path) -> None:
    path = Path(write(tmp_path, "a.yaml", policy("a")))
    assert validate_paths([tmp_path, path, path]) == []


def test_validate_all_good(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", policy("a", ("a.com",)))
    write(tmp_path, "b.yaml", policy("b", ("b.com",)))
    assert validate_paths([tmp_path]) == []


# ----------------------------------------------------------------- orphans and cluster names


def _parsed(name: str, hosts: tuple[str, ...], version: str = "v1", port: int = 10000) -> Rollout:
    rollout, errors = parse_policy_text(policy(name, hosts, port, version), f"{name}.yaml")
    assert rollout is not None, errors
    return rollout


def test_a_host_still_served_by_an_orphan_is_refused_with_file_field_and_orphan() -> None:
    renamed = _parsed("r40b", ("a.example.com", "SHOP.example.com"))
    policy_set = PolicySet(rollouts={"r40b": renamed}, files={"r40b": "policies/r40b.yaml"})
    errors = orphan_conflicts(policy_set, {"r40": _parsed("r40", ("shop.example.com",))})
    assert [(e.file, e.field) for e in errors] == [("policies/r40b.yaml", "spec.hosts[1]")]
    assert errors[0].reason == (
        "host 'SHOP.example.com' on listener 0.0.0.0:10000 is still served by orphaned rollout r40 "
        "(its policy file was removed; restart with --prune to drop it)"
    )


def test_an_orphan_on_another_listener_or_host_is_no_conflict() -> None:
    policy_set = PolicySet(rollouts={"b": _parsed("b", ("shop.example.com",), port=10001)}, files={"b": "b.yaml"})
    assert orphan_conflicts(policy_set, {"a": _parsed("a", ("shop.example.com",))}) == []
    policy_set = PolicySet(rollouts={"b": _parsed("b", ("b.example.com",))}, files={"b": "b.yaml"})
    assert orphan_conflicts(policy_set, {"a": _parsed("a", ("a.example.com",))}) == []


def test_names_that_used_to_collide_as_clusters_are_valid_and_distinct(tmp_path: Path) -> None:
    # `shop` at `eu-v1` and `shop-eu` at `v1` were both the cluster `shop-eu-v1`: Envoy got a
    # duplicate resource. Cluster names are injective now, so both files are valid together.
    write(tmp_path, "shop.yaml", policy("shop", ("a.example.com",), version="eu-v1"))
    write(tmp_path, "shop-eu.yaml", policy("shop-eu", ("b.example.com",), version="v1"))
    assert validate_paths([tmp_path]) == []
    assert cluster_name("shop", "eu-v1") != cluster_name("shop-eu", "v1")


def test_a_file_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    """Files, git commits and Validate share the limit: 1 MiB is some 20,000 hosts of one rollout."""
    from aviary.policy.loader import MAX_POLICY_BYTES

    padding = "#" + "é" * (MAX_POLICY_BYTES // 2) + "\n"  # 2 bytes per character: just over the limit
    (tmp_path / "a.yaml").write_text(policy("a") + padding)
    result = load_directory(tmp_path)
    size = len((tmp_path / "a.yaml").read_bytes())
    assert [(e.field, e.reason) for e in result.errors] == [
        ("-", f"file is {size:,} bytes; the limit is {MAX_POLICY_BYTES:,} bytes")
    ]
    assert parse_policy_text(policy("a") + "#" + "x" * (MAX_POLICY_BYTES - len(policy("a")) - 2) + "\n", "b")[0]

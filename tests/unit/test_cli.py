"""The `aviary` command line in process: flags with units, defaults in --help, --version, one-line
errors, and `aviary validate` against the server it is for (--prometheus-url)."""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from aviary.admin import render
from aviary.admin.v1 import admin_pb2 as pb
from aviary.cli import build_parser, main
from aviary.policy.loader import parse_policy_text
from aviary.policy.schema import PolicySet, Rollout
from aviary.policy.server_rules import PROMETHEUS_NEEDED, needs_prometheus, refuse_unserviceable
from aviary.store.sqlite import StateStore
from tests.rig.policies import rollout_doc

# ---- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "dest", "seconds"),
    [
        (["serve", "--policies", "p", "--git-poll", "10s"], "git_poll", 10.0),
        (["serve", "--policies", "p", "--git-poll", "1m30s"], "git_poll", 90.0),
        (["serve", "--policies", "p", "--git-poll", "2.5"], "git_poll", 2.5),  # a bare number: seconds
        (["serve", "--policies", "p"], "git_poll", 10.0),
        (["serve", "--policies", "p", "--reconnect-grace", "30s"], "reconnect_grace", 30.0),
        (["serve", "--policies", "p", "--reconnect-grace", "0"], "reconnect_grace", 0.0),  # 0: do not wait
        (["serve", "--policies", "p"], "reconnect_grace", 30.0),
        (["status", "--timeout", "10s"], "timeout", 10.0),
        (["status", "--timeout", "500ms"], "timeout", 0.5),
        (["status"], "timeout", 10.0),
        (["watch", "--refresh", "1s"], "refresh", 1.0),
        (["watch", "--refresh", "0.2"], "refresh", 0.2),
        (["watch"], "refresh", 2.0),
        (["validate", "--remote", "x.yaml", "--timeout", "1m"], "timeout", 60.0),
    ],
)
def test_duration_flags_take_units(argv: list[str], dest: str, seconds: float) -> None:
    assert getattr(build_parser().parse_args(argv), dest) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["serve", "--policies", "p", "--git-poll", "abc"],
         "aviary serve: argument --git-poll: invalid duration 'abc': "),
        (["serve", "--policies", "p", "--git-poll", "0s"],
         "aviary serve: argument --git-poll: invalid duration '0s': must be greater than zero"),
        (["serve", "--policies", "p", "--reconnect-grace", "-1"],
         "aviary serve: argument --reconnect-grace: invalid duration '-1': must be zero or more"),
        (["status", "--timeout", "30s1m"],
         "aviary status: argument --timeout: invalid duration '30s1m': units must go from largest to smallest"),
        (["watch", "--refresh", "1x"], "aviary watch: argument --refresh: invalid duration '1x': "),
    ],
)
def test_a_bad_duration_is_one_line_naming_the_flag(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err
    assert "usage:" not in err and "Traceback" not in err


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    found = {"aviary": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update({f"aviary {name}": sub for name, sub in action.choices.items()})
    return found


def test_no_duration_flag_is_a_bare_float() -> None:
    """Every time flag goes through the duration parser (a new `type=float` would take no units)."""
    floats = [
        f"{prog} {'/'.join(action.option_strings)}"
        for prog, parser in _parsers().items()
        for action in parser._actions
        if action.type is float
    ]
    assert floats == []


def test_help_shows_every_default() -> None:
    missing = []
    for prog, parser in _parsers().items():
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default in (None, False, argparse.SUPPRESS) or action.help is None:
                continue
            if "default" not in (action.help or "") and f"(default: {default})" not in text:
                missing.append(f"{prog} {action.option_strings[0]}")
    assert missing == []
    serve = " ".join(_parsers()["aviary serve"].format_help().split())
    for shown in ("--git-poll DURATION", "(default: 10s)", "(default: 30s)", "(default: 127.0.0.1:18000)"):
        assert shown in serve
    assert "(default: 2s)" in " ".join(_parsers()["aviary watch"].format_help().split())


def test_every_option_has_help() -> None:
    """An option without help gets no default shown (argparse formats help text only)."""
    bare = [
        f"{prog} {action.option_strings[0]}"
        for prog, parser in _parsers().items()
        for action in parser._actions
        if action.option_strings and action.help is None
    ]
    assert bare == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"aviary {importlib.metadata.version('aviary')}"


# ---- analysis needs a Prometheus -----------------------------------------------------------

ANALYSIS = {"metrics": [{"name": "success", "template": "request-success-rate", "min": 99}]}


def measured_doc(version: str = "v1", prometheus: str | None = None) -> dict[str, Any]:
    doc = rollout_doc("shop", version)
    doc["spec"]["analysis"] = {**ANALYSIS, **({"prometheus": prometheus} if prometheus else {})}
    return doc


def parsed(doc: dict[str, Any]) -> Rollout:
    rollout, errors = parse_policy_text(yaml.safe_dump(doc), "shop.yaml")
    assert rollout is not None, errors
    return rollout


def test_validate_refuses_analysis_without_a_prometheus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(yaml.safe_dump(measured_doc()))
    assert main(["validate", str(path)]) == 1
    assert capsys.readouterr().out == f"{path}: spec.analysis.prometheus: {PROMETHEUS_NEEDED}\n"
    # ... valid for a server that has one, or when the policy names its own
    assert main(["validate", str(path), "--prometheus-url", "http://127.0.0.1:9090"]) == 0
    path.write_text(yaml.safe_dump(measured_doc(prometheus="http://127.0.0.1:9090")))
    assert main(["validate", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == ["1 file(s) valid", "1 file(s) valid"]


def test_needs_prometheus() -> None:
    assert needs_prometheus(parsed(rollout_doc("shop", "v1")), "shop.yaml", None) is None  # no analysis
    assert needs_prometheus(parsed(measured_doc(prometheus="http://p:9090")), "shop.yaml", None) is None
    assert needs_prometheus(parsed(measured_doc()), "shop.yaml", "http://p:9090") is None
    error = needs_prometheus(parsed(measured_doc()), "shop.yaml", None)
    assert str(error) == f"shop.yaml: spec.analysis.prometheus: {PROMETHEUS_NEEDED}"


def test_a_refused_rollout_keeps_its_running_version_and_a_new_one_stays_out() -> None:
    running = parsed(rollout_doc("shop", "v1"))
    new_set = PolicySet({"shop": parsed(measured_doc("v2"))}, {"shop": "policies/shop.yaml"}, "abc")
    kept, errors = refuse_unserviceable(new_set, None, {"shop": running}.get)
    assert kept == PolicySet({"shop": running}, {"shop": "policies/shop.yaml"}, "abc")
    assert [str(e) for e in errors] == [f"policies/shop.yaml: spec.analysis.prometheus: {PROMETHEUS_NEEDED}"]
    dropped, errors = refuse_unserviceable(new_set, None, lambda name: None)
    assert (dropped, len(errors)) == (PolicySet({}, {}, "abc"), 1)
    assert refuse_unserviceable(new_set, "http://p:9090", lambda name: None) == (new_set, [])


# ---- what set-weight says ------------------------------------------------------------------


def test_set_weight_says_resume_returns_to_the_step_weight() -> None:
    manual = pb.Rollout(name="shop", canary_version="v2", weight=40, step=1, steps=2, step_weight=20)
    assert render.resume_hint(manual) == "automation paused; `aviary resume` returns to step 1's weight 20%"
    assert render.resume_hint(pb.Rollout(name="shop", stable_version="v1")) is None


# ---- -o json carries what the text shows ---------------------------------------------------


def _text(renderable: Any) -> str:
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def _values(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [v for item in value.values() for v in _values(item)]
    if isinstance(value, list):
        return [v for item in value for v in _values(item)]
    return [str(value)]


def test_status_json_carries_the_policy_source_and_its_refusals() -> None:
    policy = pb.PolicySource(
        source="https://git.example/policies.git", applied_commit="a" * 40, rejected_commit="b" * 40,
        errors=[pb.ValidateError(file="bbbbbbb:shop.yaml", field="spec.version", reason="required field is missing")],
        fetch_error="since 2026-12-01T16:02:11Z: git ls-remote: connection refused",
    )
    overview = pb.ListRolloutsResponse(policy=policy, health=pb.ControlPlaneHealth(serving=True))
    document = json.loads(render.as_json(overview))
    assert document["policy"] == {
        "source": "https://git.example/policies.git", "applied_commit": "a" * 40, "rejected_commit": "b" * 40,
        "errors": [{"file": "bbbbbbb:shop.yaml", "field": "spec.version", "reason": "required field is missing"}],
        "fetch_error": "since 2026-12-01T16:02:11Z: git ls-remote: connection refused",
    }
    text = _text(render.policy_summary(policy))
    for shown in ("https://git.example/policies.git", "a" * 12, "b" * 12, "bbbbbbb:shop.yaml: spec.version",
                  "git ls-remote: connection refused"):
        assert shown in text


def test_rollout_json_has_every_fact_of_the_detail_and_no_sentinels() -> None:
    check = pb.CheckResult(name="success", outcome="Fail", value=97.5, min=99, reason="97.5 < min 99")
    rollout = pb.Rollout(
        name="shop", phase="Paused", stable_version="v1", canary_version="v2", weight=40, step=2, steps=3,
        step_weight=50, acked_weight=20, seconds_in_step=12, checks=[check], git_commit="c" * 40,
        overrides=[pb.Override(kind="set-weight", detail="manual weight 40% until Resume")], reason="held",
        envoy_rejected="Envoy rejected route r: bad", engine_error="boom", state_error="disk full",
    )
    text = _text(render.rollout_detail(rollout))
    document = render.to_dict(rollout)
    assert (document["step"], document["steps"], document["acked_weight"]) == (2, 3, 20)
    assert "2/3" in text and "20%" in text
    values = _values(document)
    for fact in ("held", "v1", "v2", "40", "20", "12.0", "97.5", "99.0", "97.5 < min 99", "c" * 40, "set-weight",
                 "manual weight 40% until Resume", "Envoy rejected route r: bad", "boom", "disk full"):
        assert fact in values, fact
    stable = render.to_dict(pb.Rollout(name="shop", phase="Stable", stable_version="v1", steps=3))
    assert not {"step", "acked_weight", "step_weight"} & set(stable)  # unknown: absent, never -1
    assert -1 not in stable.values()


def test_validate_counts_policy_files_like_the_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory of two policy files is two files, not "1 path(s)"; a README beside them is none."""
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(rollout_doc(name)))
    (tmp_path / "README.md").write_text("not a policy\n")
    assert main(["validate", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "2 file(s) valid\n"


def test_serve_on_a_state_file_with_an_undecodable_row_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The row is only read while starting (after the file opened fine): that used to end in a
    traceback and exit status 1."""
    state = tmp_path / "state.db"
    StateStore(state).close()
    with sqlite3.connect(state) as db:
        db.execute("INSERT INTO meta (key, value) VALUES ('alive', 'not json')")
    policies = tmp_path / "policies"
    policies.mkdir()
    argv = ["serve", "--policies", str(policies), "--state", str(state), "--state-dir", str(tmp_path),
            "--xds-address", "127.0.0.1:0", "--admin-address", "", "--metrics-address", ""]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"aviary serve: state file {state} is not usable") and err.count("\n") == 1, err


def test_rollout_detail_shows_kind_compare_bounds_samples_and_queries() -> None:
    compare = pb.CheckResult(name="p99-vs", outcome="Fail", kind="compare", value=300, stable_value=200, max=1.2,
                             compare_by="ratio", reason="canary 300 / stable 200 = 1.5 > max (1.2)",
                             queries=["histogram_quantile(0.99, canary)", "histogram_quantile(0.99, stable)"])
    series = pb.CheckResult(name="latency", outcome="Inconclusive", kind="judge", canary_samples=12,
                            stable_samples=30, effect=4.5, effect_low=-1, effect_high=9, reason="too few samples")
    text = _text(render.rollout_detail(pb.Rollout(name="shop", phase="Progressing", stable_version="v1",
                                                  canary_version="v2", steps=3, checks=[compare, series])))
    for shown in ("compare", "canary / stable <= 1.2", "canary 300 / stable 200 = 1.5 > max (1.2)", "n=12", "n=30",
                  "histogram_quantile(0.99, canary)", "histogram_quantile(0.99, stable)", "judge",
                  "effect 4.5 [-1, 9]"):
        assert shown in text, shown

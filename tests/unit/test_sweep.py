"""``aviary simulate --sweep``: how a setting is read (``parse_setting``) and every combination
applied to the policy file (``variants``), with the refusals a user can meet."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from aviary.simulation.sweep import SweepError, parse_setting, variants
from tests.unit.synthetic_recordings import policy_doc

TEXT = yaml.safe_dump(policy_doc(), sort_keys=False)


@pytest.mark.parametrize(("text", "path", "values", "texts"), [
    ("analysis.failureLimit=0,1,2", ("analysis", "failureLimit"), (0, 1, 2), ("0", "1", "2")),
    ("spec.analysis.failureLimit=3", ("analysis", "failureLimit"), (3,), ("3",)),  # spec. may be given
    ("strategy.interval=30s, 1m", ("strategy", "interval"), ("30s", "1m"), ("30s", "1m")),  # text stays text
    ("strategy.steps=[10, 50],[5,20,80]", ("strategy", "steps"), ([10, 50], [5, 20, 80]), ("[10, 50]", "[5,20,80]")),
    ("analysis.metrics.0={name: a, min: 1},{name: b, max: 2}", ("analysis", "metrics", "0"),
     ({"name": "a", "min": 1}, {"name": "b", "max": 2}), ("{name: a, min: 1}", "{name: b, max: 2}")),
    ("analysis.metrics.0.min=99.5,1e2", ("analysis", "metrics", "0", "min"), (99.5, "1e2"), ("99.5", "1e2")),
    ("analysis.onInconclusive=pause,rollback,", ("analysis", "onInconclusive"), ("pause", "rollback"),
     ("pause", "rollback")),  # an empty value is dropped
    ("analysis.judge=null", ("analysis", "judge"), (None,), ("null",)),
])
def test_parse_setting(text: str, path: tuple[str, ...], values: tuple[Any, ...], texts: tuple[str, ...]) -> None:
    setting = parse_setting(text)
    assert (setting.path, setting.values, setting.texts) == (path, values, texts)
    assert setting.name == ".".join(path)


@pytest.mark.parametrize(("text", "reason"), [
    ("analysis.failureLimit", "expected PATH=VALUE"),
    ("=1,2", "expected PATH=VALUE"),
    ("analysis.failureLimit=", "expected PATH=VALUE"),
    ("analysis.failureLimit= ", "expected PATH=VALUE"),
    ("...=1", "expected PATH=VALUE"),
    ("strategy.steps=[10, 50", "not valid YAML"),
    ("analysis.metrics.0={name: a", "not valid YAML"),
])
def test_parse_setting_refuses_in_one_line(text: str, reason: str) -> None:
    with pytest.raises(SweepError) as refused:
        parse_setting(text)
    assert reason in str(refused.value) and repr(text) in str(refused.value)
    assert "\n" not in str(refused.value)


def test_variants_are_every_combination_in_order_with_labels() -> None:
    settings = [parse_setting("analysis.failureLimit=0,1,2"), parse_setting("strategy.interval=30s,1m")]
    found = variants(TEXT, "shop.yaml", settings)
    assert [v.label for v in found] == [
        f"analysis.failureLimit={limit} strategy.interval={interval}" for limit in "012" for interval in ("30s", "1m")]
    got = [(v.rollout.spec.analysis.failure_limit, v.rollout.spec.strategy.interval)  # type: ignore[union-attr]
           for v in found]
    assert got == [(limit, interval) for limit in (0, 1, 2) for interval in (30.0, 60.0)]


def test_a_variant_changes_only_its_setting() -> None:
    [one] = variants(TEXT, "shop.yaml", [parse_setting("analysis.metrics.0.min=95")])
    [metric] = one.rollout.spec.analysis.metrics  # type: ignore[union-attr]
    assert (metric.name, metric.template, metric.min) == ("success", "request-success-rate", 95)
    assert one.rollout.spec.strategy.weights == (10, 50)  # type: ignore[union-attr]
    assert one.rollout.name == "shop" and one.rollout.spec.version == "v2"


def test_a_block_the_file_leaves_out_is_created() -> None:
    [one] = variants(TEXT, "shop.yaml", [parse_setting("strategy.afterPromotion.keep=5m")])
    assert one.rollout.spec.strategy.after_promotion.keep == 300  # type: ignore[union-attr]


@pytest.mark.parametrize(("setting", "fragments"), [
    ("analysis.metrics.3.min=1", ("--sweep analysis.metrics.3.min", "spec.analysis.metrics.3", "shop.yaml",
                                  "no item 3", "(1 item(s))")),
    ("analysis.metrics.first.min=1", ("spec.analysis.metrics.first", "no item first")),
    ("listener.port.number=1", ("spec.listener.port.number", "has a value there, not a block")),
    ("analysis.failureLimit=0,-1", ("with analysis.failureLimit=-1", "shop.yaml", "spec.analysis.failureLimit",
                                    "greater than or equal to 0")),
    ("strategy.interval=soon", ("with strategy.interval=soon", "spec.strategy.interval")),
    ("analysis.failurelimit=1", ("with analysis.failurelimit=1", "spec.analysis.failurelimit")),  # a typo
])
def test_a_setting_the_policy_cannot_take_is_refused_naming_the_field(setting: str, fragments: tuple[str, ...]
                                                                      ) -> None:
    with pytest.raises(SweepError) as refused:
        variants(TEXT, "shop.yaml", [parse_setting(setting)])
    for fragment in fragments:
        assert fragment in str(refused.value), str(refused.value)


@pytest.mark.parametrize(("text", "reason"), [("spec: [", "invalid YAML"), ("- 1\n", "not a policy document")])
def test_a_file_that_is_not_a_policy_is_refused(text: str, reason: str) -> None:
    with pytest.raises(SweepError, match=reason):
        variants(text, "shop.yaml", [parse_setting("analysis.failureLimit=1")])

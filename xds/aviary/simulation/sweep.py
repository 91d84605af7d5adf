"""``--sweep 'analysis.failureLimit=0,1,2'``: every combination of settings, applied to a policy file.

A setting is a path into the policy's ``spec`` as written in YAML (``analysis.failureLimit``,
``strategy.interval``, ``analysis.metrics.0.min``; ``spec.`` may be given) and values separated by
commas (each read as YAML: ``30s`` stays text, ``2`` is a number, ``[10, 50]`` a list; commas inside
brackets do not separate). Each combination is the policy file with those values set, validated
like any policy file, so a value the schema refuses is reported with its field.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from aviary.policy.loader import parse_policy_text
from aviary.policy.schema import Rollout

__all__ = ["Setting", "SweepError", "Variant", "parse_setting", "variants"]


class SweepError(ValueError):
    """A --sweep that cannot be applied: its syntax, a path the policy does not have, a refused value."""


@dataclass(frozen=True, slots=True)
class Setting:
    path: tuple[str, ...]
    values: tuple[Any, ...]
    texts: tuple[str, ...]

    @property
    def name(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True, slots=True)
class Variant:
    """One combination: its settings as ``path=value`` and the policy with them."""

    label: str
    rollout: Rollout


def parse_setting(text: str) -> Setting:
    """``PATH=V1,V2,...`` -> a Setting; SweepError naming the flag's text otherwise."""
    path, sep, values = text.partition("=")
    parts = tuple(part for part in path.strip().split(".") if part)
    if not sep or not parts or not values.strip():
        raise SweepError(f"--sweep {text!r}: expected PATH=VALUE,VALUE,... such as analysis.failureLimit=0,1,2")
    if parts[0] == "spec":
        parts = parts[1:]
    texts = tuple(_split(values))
    try:
        parsed = tuple(yaml.safe_load(value) for value in texts)
    except yaml.YAMLError as exc:
        problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else " ".join(str(exc).split())
        raise SweepError(f"--sweep {text!r}: a value is not valid YAML: {problem}") from None  # one line
    return Setting(parts, parsed, texts)


def variants(document_text: str, file: str, settings: Sequence[Setting]) -> list[Variant]:
    """The policy of ``document_text`` with every combination of ``settings`` applied, in order."""
    try:
        document = yaml.safe_load(document_text)
    except yaml.YAMLError as exc:
        raise SweepError(f"{file}: invalid YAML: {exc}") from None
    found: list[Variant] = []
    for combination in itertools.product(*(range(len(setting.values)) for setting in settings)):
        changed = copy.deepcopy(document)
        labels = []
        for setting, index in zip(settings, combination, strict=True):
            _set(changed, file, setting, setting.values[index])
            labels.append(f"{setting.name}={setting.texts[index]}")
        label = " ".join(labels)
        rollout, errors = parse_policy_text(yaml.safe_dump(changed, sort_keys=False), file)
        if rollout is None:
            raise SweepError(f"with {label}: " + "; ".join(str(error) for error in errors))
        found.append(Variant(label, rollout))
    return found


def _set(document: Any, file: str, setting: Setting, value: Any) -> None:
    if not isinstance(document, dict) or not isinstance(document.get("spec"), dict):
        raise SweepError(f"{file}: not a policy document with a spec")
    node: Any = document["spec"]
    for depth, key in enumerate(setting.path):
        last = depth == len(setting.path) - 1
        where = "spec." + ".".join(setting.path[:depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise SweepError(f"--sweep {setting.name}: {where}: {file} has no item {key} there "
                                 f"({len(node)} item(s))")
            if last:
                node[int(key)] = value
                return
            node = node[int(key)]
        elif isinstance(node, dict):
            if last:
                node[key] = value
                return
            if key not in node:  # a block the file leaves out (its defaults) is created
                node[key] = {}
            node = node[key]
        else:
            raise SweepError(f"--sweep {setting.name}: {where}: {file} has a value there, not a block")


def _split(values: str) -> list[str]:
    """Split on commas outside brackets and braces."""
    parts: list[str] = []
    depth = 0
    current = ""
    for char in values:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [part for part in parts if part]

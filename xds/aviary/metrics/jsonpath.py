"""A small JSONPath subset for the ``web`` provider: enough to pick numbers out of a JSON answer.

Supported (Argo Rollouts' web metric examples use these)::

    $                     the whole document
    .name  ['name']       a member of an object ("name": letters, digits, '_' and '-')
    [0]  [-1]             an element of an array (negative counts from the end)
    [*]  .*               every element of an array, or every value of an object

Optionally wrapped in braces, as Argo writes it: ``{$.data.rate}``. No filters, slices or recursive
descent: an unsupported path is refused when the policy loads, not when the check runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["JsonPathError", "Step", "evaluate", "parse"]

Step = str | int | None
"""A member name, an array index, or None for the wildcard."""

_TOKEN = re.compile(r"""\.([A-Za-z0-9_-]+)|\.\*|\[\*\]|\[(-?\d+)\]|\['([^']*)'\]|\["([^"]*)"\]""")


class JsonPathError(ValueError):
    """The path is not in the supported subset."""


def parse(path: str) -> tuple[Step, ...]:
    """The steps of ``path``; raises JsonPathError naming what is not supported."""
    text = path.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1].strip()
    if not text.startswith("$"):
        raise JsonPathError(f"invalid JSONPath {path!r}: must start with '$' (e.g. $.data.rate)")
    steps: list[Step] = []
    position = 1
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise JsonPathError(f"invalid JSONPath {path!r} at {text[position:]!r}: supported are .name, ['name'], "
                                "[N], [*] and .*")
        name, index, single, double = match.groups()
        if index is not None:
            steps.append(int(index))
        elif name is not None or single is not None or double is not None:
            steps.append(next(part for part in (name, single, double) if part is not None))
        else:
            steps.append(None)
        position = match.end()
    return tuple(steps)


def evaluate(path: str, document: Any) -> list[Any]:
    """Every value ``path`` selects in ``document`` (empty when nothing matches)."""
    current = [document]
    for step in parse(path):
        selected: list[Any] = []
        for value in current:
            if step is None:
                if isinstance(value, Mapping):
                    selected.extend(value.values())
                elif isinstance(value, Sequence) and not isinstance(value, str):
                    selected.extend(value)
            elif isinstance(step, int):
                if isinstance(value, Sequence) and not isinstance(value, str) and -len(value) <= step < len(value):
                    selected.append(value[step])
            elif isinstance(value, Mapping) and step in value:
                selected.append(value[step])
        current = selected
    return current

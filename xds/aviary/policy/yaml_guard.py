"""Refuse YAML that would exhaust the loader before it is loaded.

Policy text arrives from files, git commits and the admin API's Validate. A few hundred bytes of
nested aliases expand to billions of nodes once validation messages print them, and deep nesting
overflows the recursive composer; both are caught on the parser's event stream, which is produced
without recursion and without building anything.
"""

from __future__ import annotations

import yaml

MAX_YAML_DEPTH = 64  # the policy schema nests a handful of levels
MAX_YAML_NODES = 100_000  # counting every alias expanded: a "billion laughs" text is refused


def yaml_bomb(text: str) -> str | None:
    """Why ``text`` must not be loaded (too deep, or aliases expanding too far), or None.

    Runs on the event stream, which the parser produces without recursion and without building
    anything: loading a deeply nested text overflows the recursive composer, and a few hundred
    bytes of nested aliases expand to billions of nodes once validation messages print them.
    """
    sizes: dict[str, int] = {}
    stack: list[tuple[int, str | None]] = [(0, None)]  # (nodes so far, anchor) per open collection
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                count, anchor = stack[-1]
                stack[-1] = (count + sizes.get(event.anchor or "", 1), anchor)
            elif isinstance(event, yaml.ScalarEvent):
                count, anchor = stack[-1]
                stack[-1] = (count + 1, anchor)
                if event.anchor:
                    sizes[event.anchor] = 1
            elif isinstance(event, yaml.CollectionStartEvent):
                stack.append((1, event.anchor))
                if len(stack) > MAX_YAML_DEPTH:
                    return f"nested deeper than {MAX_YAML_DEPTH} levels"
            elif isinstance(event, yaml.CollectionEndEvent):
                size, anchor = stack.pop()
                if anchor:
                    sizes[anchor] = size
                count, parent = stack[-1]
                stack[-1] = (count + size, parent)
            else:
                continue
            if stack[-1][0] > MAX_YAML_NODES:
                return f"expands to more than {MAX_YAML_NODES} nodes (aliases included)"
    except yaml.YAMLError:
        return None  # parse_policy_text reports it, with line and column
    return None

"""Rollout policy documents (the schema of policies/checkout.yaml) for tests that need no real backend."""

from __future__ import annotations

from typing import Any


def rollout_doc(name: str = "shop", version: str = "v1", steps: tuple[int, ...] = (20, 50)) -> dict[str, Any]:
    """A Rollout on 127.0.0.1:10000 for ``<name>.example.com`` with ``steps`` an hour apart
    (nothing advances by itself), as a plain dict."""
    return {
        "apiVersion": "aviary.dev/v1",
        "kind": "Rollout",
        "metadata": {"name": name},
        "spec": {
            "listener": {"address": "127.0.0.1", "port": 10000},
            "hosts": [f"{name}.example.com"],
            "version": version,
            "endpoints": ["127.0.0.1:8081"],
            "strategy": {"steps": list(steps), "interval": "1h"},
        },
    }


def rollout_text(name: str, version: str, host: str) -> str:
    """A Rollout as the YAML text of a policy file: port 10000, one host, one endpoint, no strategy."""
    return (
        "apiVersion: aviary.dev/v1\nkind: Rollout\n"
        f"metadata: {{name: {name}}}\n"
        f'spec: {{listener: {{port: 10000}}, hosts: ["{host}"], version: {version}, '
        'endpoints: ["127.0.0.1:8081"]}\n'
    )

"""Aviary: an Envoy xDS control plane that runs canary releases."""

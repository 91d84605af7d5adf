"""Envoy's own reports (metrics service sink, gRPC access logs) received on the xDS address."""

"""The xDS resource types Aviary serves, by type URL.

Order matters: it is the order in which a new configuration must be applied by a proxy that
gets everything at once (clusters and their endpoints before the listeners and routes that
name them), and the order we push in when several types change together.

TOKEN_BUCKET is served on ADS only (no per-type discovery service exists for it): the access log's
``process_ratelimit`` filter of a ``provider: envoy`` listener subscribes to one bucket per rollout and slot
(`resources.build_sampling_bucket`). It goes before the listeners that name it: Envoy creates the filter
with the listener and waits for the bucket before the listener is warm.
"""

from typing import Final

LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TOKEN_BUCKET: Final = "type.googleapis.com/envoy.type.v3.TokenBucket"

PUSH_ORDER: Final = (CLUSTER, ENDPOINT, TOKEN_BUCKET, LISTENER, ROUTE)
SUPPORTED: Final = frozenset(PUSH_ORDER)

SHORT_NAMES: Final = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS", TOKEN_BUCKET: "token bucket"}


def short_name(type_url: str) -> str:
    """LDS/RDS/CDS/EDS (or "token bucket") for logs; the URL itself for anything else."""
    return SHORT_NAMES.get(type_url, type_url)

"""Plain events the xDS streams report about proxies.

They are the whole interface from the streams side back to the rest of Aviary: values only, no
references to stream objects, so the streams can later live in worker processes and send these
over a pipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProxyConnected:
    stream_id: int
    node_id: str
    node_cluster: str
    peer: str
    at: float  # wall-clock seconds
    # The one type a per-type discovery stream serves (CDS, EDS, LDS or RDS service); "" for ADS.
    # A node's per-type streams are one proxy to `ProxyStatus`.
    type_url: str = ""


@dataclass(frozen=True, slots=True)
class SubscriptionChanged:
    stream_id: int
    type_url: str
    wildcard: bool
    names: frozenset[str]


@dataclass(frozen=True, slots=True)
class ResourcesAcked:
    """The proxy applied the response it was sent: exactly `resources` (name -> version)."""

    stream_id: int
    type_url: str
    version: str
    resources: Mapping[str, str]
    sent_at: float  # monotonic time of the response that is being ACKed
    at: float  # monotonic time of the ACK


@dataclass(frozen=True, slots=True)
class ResourcesNacked:
    """The proxy rejected the response `version`; it keeps its last ACKed state."""

    stream_id: int
    type_url: str
    version: str
    resources: Mapping[str, str]
    message: str
    at: float  # wall-clock seconds


@dataclass(frozen=True, slots=True)
class ResponseSent:
    """A response went out on a stream (for metrics: responses and bytes by type).

    A stream reports each response (`count` 1). An xDS worker folds those of one type in one frame
    into one event: `count` responses of `size` bytes in all, `stream_id` the first of them
    (`worker_protocol.encode_events`): a weight change is not a thousand events for two counters.
    """

    stream_id: int
    type_url: str
    size: int
    count: int = 1


@dataclass(frozen=True, slots=True)
class ProxyDisconnected:
    stream_id: int


ProxyEvent = (
    ProxyConnected | SubscriptionChanged | ResourcesAcked | ResourcesNacked | ResponseSent | ProxyDisconnected
)

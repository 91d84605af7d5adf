"""Hand-assembled protobuf wire format for DiscoveryResponse.

Why by hand: a response is mostly resources that are identical for every proxy. Encoding each
resource once (as the bytes of one `repeated Any resources = 2` entry) and concatenating those
bytes per stream keeps the push path free of protobuf object building, which is what makes one
snapshot cheap to fan out to thousands of streams. Field numbers come from
envoy/service/discovery/v3/discovery.proto; tests decode the result with the real classes.
"""

from __future__ import annotations

from collections.abc import Iterable

_LEN = 2  # wire type: length-delimited

# DiscoveryResponse fields
_VERSION_INFO = 1
_RESOURCES = 2
_TYPE_URL = 4
_NONCE = 5
# google.protobuf.Any fields
_ANY_TYPE_URL = 1
_ANY_VALUE = 2
# envoy.service.discovery.v3.Resource fields
_RESOURCE_VERSION = 1
_RESOURCE_BODY = 2
_RESOURCE_NAME = 3


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def length_delimited(field_number: int, payload: bytes) -> bytes:
    return varint((field_number << 3) | _LEN) + varint(len(payload)) + payload


def encode_any(type_url: str, value: bytes) -> bytes:
    return length_delimited(_ANY_TYPE_URL, type_url.encode()) + length_delimited(_ANY_VALUE, value)


def resources_entry(any_bytes: bytes) -> bytes:
    """One `resources` entry of a DiscoveryResponse, ready to concatenate."""
    return length_delimited(_RESOURCES, any_bytes)


# Types whose message has no name field: a State-of-the-World response names them by sending each in
# a `Resource` wrapper (Envoy unwraps one in any response). Envoy reads a TokenBucket's name from the
# wrapper or nowhere: unwrapped, it arrives named "", matches no subscription, and Envoy 1.40's
# process_ratelimit filter, handed an empty update, crashes (SIGSEGV, address 0x20).
NAMELESS_TYPES = frozenset({"type.googleapis.com/envoy.type.v3.TokenBucket"})
_RESOURCE_WRAPPER = "type.googleapis.com/envoy.service.discovery.v3.Resource"


def sotw_entry(type_url: str, name: str, version: str, any_bytes: bytes) -> bytes:
    """The `resources` entry a State-of-the-World response carries for this resource: its Any, or for
    a type in `NAMELESS_TYPES` a `Resource` with its name wrapping that Any."""
    if type_url not in NAMELESS_TYPES:
        return resources_entry(any_bytes)
    wrapped = (
        length_delimited(_RESOURCE_VERSION, version.encode())
        + length_delimited(_RESOURCE_BODY, any_bytes)
        + length_delimited(_RESOURCE_NAME, name.encode())
    )
    return resources_entry(encode_any(_RESOURCE_WRAPPER, wrapped))


def discovery_response(version: str, type_url: str, nonce: str, entries: Iterable[bytes]) -> bytes:
    return with_nonce(discovery_response_body(version, type_url, entries), nonce)


def discovery_response_body(version: str, type_url: str, entries: Iterable[bytes]) -> bytes:
    """A DiscoveryResponse but its nonce: the same for every stream sent these resources."""
    return (
        length_delimited(_VERSION_INFO, version.encode())
        + b"".join(entries)
        + length_delimited(_TYPE_URL, type_url.encode())
    )


def with_nonce(body: bytes, nonce: str) -> bytes:
    """`body` (from `discovery_response_body`) made one stream's response."""
    return body + length_delimited(_NONCE, nonce.encode())


# ---- incremental (delta) xDS ------------------------------------------------------------------
# DeltaDiscoveryResponse fields (its nonce is field 5 as well: `with_nonce` serves both)
_SYSTEM_VERSION_INFO = 1
_DELTA_RESOURCES = 2
_DELTA_TYPE_URL = 4
_REMOVED_RESOURCES = 6


def delta_resource_entry(name: str, version: str, any_bytes: bytes) -> bytes:
    """One `resources` entry of a DeltaDiscoveryResponse: a `Resource` wrapping the Any, ready to concatenate."""
    wrapped = (
        length_delimited(_RESOURCE_VERSION, version.encode())
        + length_delimited(_RESOURCE_BODY, any_bytes)
        + length_delimited(_RESOURCE_NAME, name.encode())
    )
    return length_delimited(_DELTA_RESOURCES, wrapped)


def delta_response_body(system_version: str, type_url: str, entries: Iterable[bytes], removed: Iterable[str]) -> bytes:
    """A DeltaDiscoveryResponse but its nonce (`with_nonce` adds it)."""
    return (
        length_delimited(_SYSTEM_VERSION_INFO, system_version.encode())
        + b"".join(entries)
        + length_delimited(_DELTA_TYPE_URL, type_url.encode())
        + b"".join(length_delimited(_REMOVED_RESOURCES, name.encode()) for name in removed)
    )

"""The only module that knows Envoy's types: published traffic in, xDS resources out.

Naming (documented for users in README):
- cluster `<rollout>_<version>`: one per version; EDS when every endpoint is an IP address, STRICT_DNS
  (endpoints inline, re-resolved by Envoy) when any endpoint is a host name. `_` appears in neither a
  rollout name (a DNS label) nor a version (`[a-z0-9][a-z0-9.-]*`), so the name is injective: `shop`
  at `eu-v1` and `shop-eu` at `v1` are `shop_eu-v1` and `shop-eu_v1`. Releases up to state schema 2 used `-`
  (`legacy_cluster_name`), which collided; such clusters appear only while an upgraded control plane
  retires what the previous one published;
- listener `listener-<address>-<port>` and route configuration `route-<address>-<port>`: rollouts that
  share an address:port are virtual hosts of one listener and one route configuration;
- listener `<rollout>` with an `api_listener` and route configuration `grpc-<rollout>`: what a
  proxyless gRPC client on `xds:///<rollout>` asks for. Never sent to wildcard (Envoy) subscribers.
  It is the same virtual host: gRPC skips routes with query-parameter conditions and ignores what it
  does not implement (cookie hash policies, `use_hash_policy`, added response headers), so it splits
  by the plain weights (tests/e2e/test_proxyless_grpc.py).

Stickiness: the weighted default carries a route `hash_policy` and `use_hash_policy`, so Envoy picks
the cluster from `hash % 100` against the weights in order; the canary is listed last, so raising its
weight only moves hashes from stable to canary. Envoy 1.40 issues no cookie for a cookie hash policy
used by weighted clusters (it passes no cookie callback there, only to hashing load balancers), so a
cookie with a ttl gets a route of its own for requests without it: it hashes the request's
`x-request-id` (which the connection manager sets before routing) and returns that same value as the
cookie, whose hash is then the same on every later request.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2
from envoy.extensions.access_loggers.filters.process_ratelimit.v3 import process_ratelimit_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as grpc_access_log_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

from aviary.discovery import typeurls, wire
from aviary.discovery.config_sources import XDS_CLUSTER  # the bootstrap's cluster of the control plane
from aviary.discovery.snapshot import Resource, Snapshot, digest
from aviary.matching import CohortRule, Condition, Match, cookie_value_regex
from aviary.policy.schema import ListenerSpec
from aviary.traffic import Backend, Stickiness

HCM_FILTER = "envoy.filters.network.http_connection_manager"
GRPC_ACCESS_LOG = "envoy.access_loggers.http_grpc"
ACCESS_LOG_NAME = "aviary"
ACCESS_LOG_FLUSH_SECONDS = 0.5  # Envoy buffers entries at most this long before it sends them
CEL_LOG_FILTER = "envoy.access_loggers.extension_filters.cel"
RATELIMIT_LOG_FILTER = "envoy.access_loggers.extension_filters.process_ratelimit"
SAMPLING_BUCKET_PREFIX = "aviary-samples-"
SAMPLING_METADATA = "aviary.samples"  # route metadata: cluster -> its sampling slot, "<rollout>#<slot>"
SAMPLING_SLOTS = 3  # stable, canary, and a canary being replaced; any further cluster shares the last
ROUTER_FILTER = "envoy.filters.http.router"
CONNECT_TIMEOUT_SECONDS = 2
# Builders of resources that depend only on their (hashable, immutable) inputs are memoized: a
# weight change re-encodes its route configurations and nothing else, and a cluster that several
# proxy groups share is encoded once.
BUILT_RESOURCES_KEPT = 8192


CLUSTER_SEPARATOR = "_"


def cluster_name(rollout: str, version: str) -> str:
    """The one cluster name of a rollout's version; see the module docstring for why `_`."""
    return f"{rollout}{CLUSTER_SEPARATOR}{version}"


def legacy_cluster_name(rollout: str, version: str) -> str:
    """The name releases up to state schema 2 gave that cluster (not injective); only to retire such clusters."""
    return f"{rollout}-{version}"


@dataclass(frozen=True, slots=True)
class PublishedRollout:
    """What one rollout contributes to a snapshot at one moment of a make-before-break sequence.

    `route` is what its virtual host routes to (cluster name, weight); `clusters` are the clusters
    that exist (name, backend), a superset of the route's: a new backend appears here first, an old
    one stays until every proxy has stopped routing to it. Names are explicit because one version
    can have two: its current name and, while an upgrade retires it, its legacy one.
    """

    name: str
    listener: ListenerSpec
    hosts: tuple[str, ...]
    route: tuple[tuple[str, int], ...]
    clusters: tuple[tuple[str, Backend], ...]
    cohorts: tuple[tuple[CohortRule, str], ...] = ()  # tried before `route`: (cohort, cluster name)
    stickiness: Stickiness | None = None  # `route` split by a hash of this key (last cluster: the canary)
    mirror: tuple[str, int] | None = None  # (cluster name, percent of `route`'s requests copied to it)
    access_log: bool = False  # its listener sends access logs to Aviary (analysis.provider: envoy)
    samples_per_second: int = 100  # with access_log: entries each of its clusters sends per second at most

    @classmethod
    def of(
        cls,
        name: str,
        listener: ListenerSpec,
        hosts: tuple[str, ...],
        route: Iterable[tuple[Backend, int]],
        clusters: Iterable[Backend],
        cohorts: Iterable[tuple[CohortRule, Backend]] = (),
        stickiness: Stickiness | None = None,
        mirror: tuple[Backend, int] | None = None,
    ) -> PublishedRollout:
        """The usual case: every cluster under its current name."""
        return cls(
            name,
            listener,
            hosts,
            tuple((cluster_name(name, backend.version), weight) for backend, weight in route),
            tuple((cluster_name(name, backend.version), backend) for backend in clusters),
            tuple((cohort, cluster_name(name, backend.version)) for cohort, backend in cohorts),
            stickiness,
            (cluster_name(name, mirror[0].version), mirror[1]) if mirror is not None else None,
        )


def _address_part(address: str) -> str:
    return address.replace(":", "_").strip("[]")


def listener_name(listener: ListenerSpec) -> str:
    return f"listener-{_address_part(listener.address)}-{listener.port}"


def route_name(listener: ListenerSpec) -> str:
    return f"route-{_address_part(listener.address)}-{listener.port}"


def grpc_route_name(rollout: str) -> str:
    return f"grpc-{rollout}"


def _ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def sampling_slot(rollout: str, slot: int) -> str:
    """A rollout's sampling slot: what a route's metadata maps a cluster to, and its bucket's suffix."""
    return f"{rollout}#{slot}"


def sampling_bucket_name(rollout: str, slot: int) -> str:
    """The token bucket that limits the access-log entries of one sampling slot of ``rollout``."""
    return f"{SAMPLING_BUCKET_PREFIX}{rollout}-{slot}"


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def build_sampling_bucket(rollout: str, slot: int, per_second: int) -> Resource:
    """``per_second`` tokens a second, no more saved up than that: at most ``per_second`` access-log
    entries a second of the cluster in that slot (a burst of ``per_second`` after a quiet second)."""
    bucket = token_bucket_pb2.TokenBucket(
        max_tokens=per_second,
        tokens_per_fill=wrappers_pb2.UInt32Value(value=per_second),
        fill_interval=duration_pb2.Duration(seconds=1),
    )
    return Resource.from_message(sampling_bucket_name(rollout, slot), typeurls.TOKEN_BUCKET, bucket, wildcard=False)


def _sampling_slots(rollout: PublishedRollout) -> dict[str, str]:
    """Each cluster the rollout routes to (split, then cohorts) -> its slot, in route order."""
    named = list(dict.fromkeys([c for c, _ in rollout.route] + [c for _, c in rollout.cohorts]))
    return {cluster: sampling_slot(rollout.name, min(i, SAMPLING_SLOTS - 1)) for i, cluster in enumerate(named)}


def _sampling_metadata(rollout: PublishedRollout) -> base_pb2.Metadata:
    """The route metadata the access log's filter reads: which slot (bucket) the chosen cluster uses."""
    slots = struct_pb2.Struct()
    slots.update(_sampling_slots(rollout))
    return base_pb2.Metadata(filter_metadata={SAMPLING_METADATA: slots})


def _sampled(rollout: str, slot: int) -> accesslog_pb2.AccessLogFilter:
    """True for a request whose route maps the cluster it chose to this slot, while the slot's bucket
    has a token (it takes one).

    The slot comes from the route's metadata, not from a cluster name in the listener: a new canary
    changes the route (as it does anyway) and not the listener, so connections opened before it are
    sampled for it too (a changed listener leaves them on its old version until they drain). The CEL
    test comes first: ``and_filter`` stops at the first false, so other requests take no token.
    ``xds.cluster_name`` is the cluster the router chose, the weighted cluster picked included.
    """
    slots = f"xds.route_metadata.filter_metadata['{SAMPLING_METADATA}']"
    expression = (f"'{SAMPLING_METADATA}' in xds.route_metadata.filter_metadata"
                  f" && xds.cluster_name in {slots} && {slots}[xds.cluster_name] == '{sampling_slot(rollout, slot)}'")
    selects = cel_pb2.ExpressionFilter(expression=expression)
    limits = process_ratelimit_pb2.ProcessRateLimitFilter(
        dynamic_config=process_ratelimit_pb2.DynamicTokenBucket(
            resource_name=sampling_bucket_name(rollout, slot), config_source=_ads_source()))
    return accesslog_pb2.AccessLogFilter(and_filter=accesslog_pb2.AndFilter(filters=[
        accesslog_pb2.AccessLogFilter(extension_filter=accesslog_pb2.ExtensionFilter(
            name=CEL_LOG_FILTER, typed_config=_packed(selects))),
        accesslog_pb2.AccessLogFilter(extension_filter=accesslog_pb2.ExtensionFilter(
            name=RATELIMIT_LOG_FILTER, typed_config=_packed(limits))),
    ]))


def grpc_access_log(sampled: Sequence[str] = ()) -> accesslog_pb2.AccessLog:
    """Access-log entries streamed to the control plane (``AccessLogService``).

    With ``sampled`` (rollout names), Envoy sends an entry only for a request of one of them, and
    only while the token bucket of the slot its cluster has (`build_sampling_bucket`, served over
    ADS) has a token: the policy's ``samplesPerSecond`` per cluster, counted where the requests are,
    so the rest are never encoded or sent. Aviary still caps what arrives
    (``aviary.metrics.envoy_reports``): several proxies of one cluster each send their share.
    """
    filters = [_sampled(rollout, slot) for rollout in sampled for slot in range(SAMPLING_SLOTS)]
    log_filter = None
    if len(filters) == 1:
        log_filter = filters[0]
    elif filters:  # or_filter wants two or more
        log_filter = accesslog_pb2.AccessLogFilter(or_filter=accesslog_pb2.OrFilter(filters=filters))
    config = grpc_access_log_pb2.HttpGrpcAccessLogConfig(
        common_config=grpc_access_log_pb2.CommonGrpcAccessLogConfig(
            log_name=ACCESS_LOG_NAME,
            transport_api_version=config_source_pb2.ApiVersion.V3,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)),
            buffer_flush_interval=duration_pb2.Duration(nanos=int(ACCESS_LOG_FLUSH_SECONDS * 1e9)),
        ))
    return accesslog_pb2.AccessLog(name=GRPC_ACCESS_LOG, filter=log_filter, typed_config=_packed(config))


def _http_connection_manager(stat_prefix: str, route_config: str, access_log: bool = False,
                             sampled: Sequence[str] = ()) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.CodecType.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads_source(), route_config_name=route_config),
        http_filters=[hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_packed(router_pb2.Router()))],
        access_log=[grpc_access_log(sampled)] if access_log else [],
    )


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def build_listener(listener: ListenerSpec, access_log: bool = False, sampled: tuple[str, ...] = ()) -> Resource:
    """The listener of ``listener``; ``access_log``: with the gRPC access log to the control plane
    (one of its rollouts uses ``analysis.provider: envoy``), sampled for the ``sampled`` rollouts."""
    name = listener_name(listener)
    route = route_name(listener)
    message = listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(
                address=listener.address.strip("[]"), port_value=listener.port
            )
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name=HCM_FILTER,
                        typed_config=_packed(_http_connection_manager(name, route, access_log, sampled)),
                    )
                ]
            )
        ],
    )
    return Resource.from_message(name, typeurls.LISTENER, message, references=(route,))


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def build_api_listener(rollout: str) -> Resource:
    route = grpc_route_name(rollout)
    message = listener_pb2.Listener(
        name=rollout,
        api_listener=api_listener_pb2.ApiListener(api_listener=_packed(_http_connection_manager(rollout, route))),
    )
    return Resource.from_message(rollout, typeurls.LISTENER, message, wildcard=False, references=(route,))


def _mirror_policy(cluster: str, percent: int) -> route_components_pb2.RouteAction.RequestMirrorPolicy:
    """Copies of `percent` % of the route's requests to `cluster`. Envoy sends a copy without waiting
    for its answer and drops the answer, so the user's response is the chosen cluster's; the copy's
    Host gets a `-shadow` suffix. A fraction (not runtime key) keeps the share in the route itself."""
    return route_components_pb2.RouteAction.RequestMirrorPolicy(
        cluster=cluster,
        runtime_fraction=base_pb2.RuntimeFractionalPercent(
            default_value=percent_pb2.FractionalPercent(
                numerator=percent, denominator=percent_pb2.FractionalPercent.DenominatorType.HUNDRED
            )
        ),
    )


# The header whose value becomes an issued stickiness cookie: the connection manager sets it on every
# request before the route is chosen (generate_request_id defaults to true).
ISSUED_COOKIE_SOURCE = "x-request-id"


def _split(
    route: Sequence[tuple[str, int]],
    hash_by: Sequence[route_components_pb2.RouteAction.HashPolicy] = (),
    mirror: tuple[str, int] | None = None,
) -> route_components_pb2.RouteAction:
    """The weights, in order (the canary last); with ``hash_by``, picked by the request's hash; with
    ``mirror``, a share of the split's requests copied to that cluster."""
    weight_of = route_components_pb2.WeightedCluster.ClusterWeight
    weighted = route_components_pb2.WeightedCluster(
        clusters=[weight_of(name=cluster, weight=wrappers_pb2.UInt32Value(value=weight)) for cluster, weight in route]
    )
    if hash_by:
        weighted.use_hash_policy.value = True
    mirrors = [_mirror_policy(*mirror)] if mirror is not None else []
    return route_components_pb2.RouteAction(
        weighted_clusters=weighted, hash_policy=list(hash_by), request_mirror_policies=mirrors
    )


def _hash_of(stickiness: Stickiness) -> route_components_pb2.RouteAction.HashPolicy:
    policy = route_components_pb2.RouteAction.HashPolicy
    if stickiness.header is not None:
        return policy(header=policy.Header(header_name=stickiness.header))
    # No ttl here: Envoy would not issue the cookie from this route anyway (see the module docstring).
    return policy(cookie=policy.Cookie(name=stickiness.cookie))


def _weighted_route(
    route: Sequence[tuple[str, int]], stickiness: Stickiness | None = None, mirror: tuple[str, int] | None = None
) -> route_components_pb2.Route:
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=_split(route, [_hash_of(stickiness)] if stickiness is not None else [], mirror),
    )


def _cookie_issuing_route(
    route: Sequence[tuple[str, int]], cookie: str, ttl: float, mirror: tuple[str, int] | None
) -> route_components_pb2.Route:
    """For requests without a (non-empty) ``cookie``: split by the hash of their request id, and
    return that id as the cookie, so the next request hashes the same value to the same version."""
    policy = route_components_pb2.RouteAction.HashPolicy
    has_cookie = r"(?:.*;)?\s*" + _escape(cookie) + r"=[^;\s][^;]*(?:;.*)?"
    without = route_components_pb2.HeaderMatcher(
        name="cookie",
        string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=has_cookie)),
        invert_match=True,
        treat_missing_header_as_empty=True,
    )
    set_cookie = f"{cookie}=%REQ({ISSUED_COOKIE_SOURCE})%; Max-Age={int(ttl)}; Path=/; HttpOnly"
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/", headers=[without]),
        route=_split(route, [policy(header=policy.Header(header_name=ISSUED_COOKIE_SOURCE))], mirror),
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="set-cookie", value=set_cookie),
                append_action=base_pb2.HeaderValueOption.HeaderAppendAction.APPEND_IF_EXISTS_OR_ADD,
            )
        ],
    )


_REGEX_SPECIAL = frozenset(".^$*+?()[]{}|\\")


def _escape(text: str) -> str:
    """RE2-safe literal: only regex metacharacters are escaped (RE2 refuses some of Python's escapes)."""
    return "".join("\\" + char if char in _REGEX_SPECIAL else char for char in text)


def _string_matcher(condition: Condition) -> string_pb2.StringMatcher:
    if condition.kind == "regex":
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=condition.value))
    return string_pb2.StringMatcher(**{condition.kind: condition.value})


def _header_matcher(name: str, condition: Condition) -> route_components_pb2.HeaderMatcher:
    if condition.kind in ("present", "absent"):
        return route_components_pb2.HeaderMatcher(
            name=name, present_match=True, invert_match=condition.kind == "absent"
        )
    return route_components_pb2.HeaderMatcher(name=name, string_match=_string_matcher(condition))


def _cookie_value(condition: Condition) -> str:
    """The regex of one cookie's value: it never matches ';', so it cannot reach into the next cookie."""
    value = condition.value
    return {
        "exact": lambda: _escape(value),
        "prefix": lambda: _escape(value) + "[^;]*",
        "suffix": lambda: "[^;]*" + _escape(value),
        "contains": lambda: "[^;]*" + _escape(value) + "[^;]*",
        "regex": lambda: "(?:" + cookie_value_regex(value) + ")",
    }.get(condition.kind, lambda: "[^;]*")()


def _cookie_matcher(name: str, condition: Condition) -> route_components_pb2.HeaderMatcher:
    """A condition on one cookie, as a match of the whole `cookie` header (Envoy's route match has no
    cookie matcher). RE2 matches the full header: the pair `name=value` must start the header or
    follow a `;`, and end it or precede one. A missing header counts as empty (so `absent` holds)."""
    pattern = r"(?:.*;)?\s*" + _escape(name) + "=" + _cookie_value(condition) + r"\s*(?:;.*)?"
    return route_components_pb2.HeaderMatcher(
        name="cookie",
        string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern)),
        invert_match=condition.kind == "absent",
        treat_missing_header_as_empty=True,
    )


def _query_matcher(name: str, condition: Condition) -> route_components_pb2.QueryParameterMatcher:
    """The schema refuses ``absent`` for query parameters: this matcher has no inversion."""
    if condition.kind == "present":
        return route_components_pb2.QueryParameterMatcher(name=name, present_match=True)
    return route_components_pb2.QueryParameterMatcher(name=name, string_match=_string_matcher(condition))


def _cohort_route(match: Match, cluster: str) -> route_components_pb2.Route:
    """One entry of a cohort: its conditions AND'ed in one RouteMatch, to one cluster."""
    headers = [_header_matcher(name, condition) for name, condition in match.headers]
    headers += [_cookie_matcher(name, condition) for name, condition in match.cookies]
    query = [_query_matcher(name, condition) for name, condition in match.query]
    return route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/", headers=headers, query_parameters=query),
        route=route_components_pb2.RouteAction(cluster=cluster),
    )


def _virtual_host(rollout: PublishedRollout, domains: Sequence[str]) -> route_components_pb2.VirtualHost:
    """Cohort routes first (entries OR'ed as separate routes, first match wins), then, for a cookie
    Envoy issues, the route of requests without it, then the weights. The split's routes alone carry
    the mirror: a cohort's requests already reach the canary."""
    routes = [_cohort_route(match, cluster) for cohort, cluster in rollout.cohorts for match in cohort.match]
    sticky = rollout.stickiness
    if sticky is not None and sticky.cookie is not None and sticky.ttl is not None:
        routes.append(_cookie_issuing_route(rollout.route, sticky.cookie, sticky.ttl, rollout.mirror))
    routes.append(_weighted_route(rollout.route, sticky, rollout.mirror))
    if rollout.access_log:
        metadata = _sampling_metadata(rollout)
        for route in routes:
            route.metadata.CopyFrom(metadata)
    return route_components_pb2.VirtualHost(name=rollout.name, domains=list(domains), routes=routes)


def _route_clusters(rollout: PublishedRollout) -> list[str]:
    named = [cluster for cluster, _ in rollout.route]
    named += [cluster for _, cluster in rollout.cohorts if cluster not in named]
    if rollout.mirror is not None and rollout.mirror[0] not in named:
        named.append(rollout.mirror[0])
    return named


def _parts(virtual_hosts: Iterable[route_components_pb2.VirtualHost]) -> list[tuple[str, str]]:
    """(virtual host name, digest of its bytes): what a NACK of the route is blamed by."""
    return [(vh.name, digest(vh.SerializeToString(deterministic=True))) for vh in virtual_hosts]


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def _encoded_virtual_host(rollout: PublishedRollout) -> tuple[bytes, str, tuple[str, ...]]:
    """A rollout's virtual host of its listener's route configuration: its bytes (a ``virtual_hosts``
    entry), their digest, the clusters it names."""
    data = _virtual_host(rollout, rollout.hosts).SerializeToString(deterministic=True)
    return wire.length_delimited(_VIRTUAL_HOSTS, data), digest(data), tuple(_route_clusters(rollout))


_NAME, _VIRTUAL_HOSTS = 1, 2  # RouteConfiguration's field numbers (envoy/config/route/v3/route.proto)


def build_route_configuration(name: str, rollouts: Sequence[PublishedRollout]) -> Resource:
    """The route configuration that a listener's rollouts share, one virtual host each.

    Assembled from each rollout's encoded virtual host (kept while the rollout's content is the
    same): a weight change re-encodes one virtual host, not the listener's thousand. The bytes are
    what ``RouteConfiguration(name=..., virtual_hosts=[...]).SerializeToString(deterministic=True)``
    gives (fields in number order; tests compare the two).
    """
    ordered = sorted(rollouts, key=lambda r: r.name)
    encoded = [_encoded_virtual_host(r) for r in ordered]
    value = (wire.length_delimited(_NAME, name.encode()) if name else b"") + b"".join(e[0] for e in encoded)
    references = [c for e in encoded for c in e[2]]
    parts = [(r.name, e[1]) for r, e in zip(ordered, encoded, strict=True)]
    return Resource.from_bytes(name, typeurls.ROUTE, value, references=references, parts=parts)


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def build_grpc_route_configuration(rollout: PublishedRollout) -> Resource:
    name = grpc_route_name(rollout.name)
    virtual_hosts = [_virtual_host(rollout, ["*"])]
    message = route_pb2.RouteConfiguration(name=name, virtual_hosts=virtual_hosts)
    return Resource.from_message(
        name, typeurls.ROUTE, message, references=_route_clusters(rollout), parts=_parts(virtual_hosts)
    )


def _load_assignment(name: str, backend: Backend) -> endpoint_pb2.ClusterLoadAssignment:
    # gRPC clients NACK an assignment without locality or load_balancing_weight; Envoy does not mind.
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address=endpoint.host.strip("[]"), port_value=endpoint.port
                                )
                            )
                        )
                    )
                    for endpoint in backend.endpoints
                ],
            )
        ],
    )


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def build_cluster(name: str, backend: Backend) -> tuple[Resource, ...]:
    """The cluster `name` for one version, plus its load assignment when it is served over EDS."""
    common = {
        "name": name,
        "connect_timeout": duration_pb2.Duration(seconds=CONNECT_TIMEOUT_SECONDS),
        "lb_policy": cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN,
    }
    if all(endpoint.is_ip for endpoint in backend.endpoints):
        cluster = cluster_pb2.Cluster(
            type=cluster_pb2.Cluster.DiscoveryType.EDS,
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads_source()),
            **common,
        )
        return (
            Resource.from_message(name, typeurls.CLUSTER, cluster, references=(name,)),
            Resource.from_message(name, typeurls.ENDPOINT, _load_assignment(name, backend)),
        )
    cluster = cluster_pb2.Cluster(
        type=cluster_pb2.Cluster.DiscoveryType.STRICT_DNS,
        load_assignment=_load_assignment(name, backend),
        **common,
    )
    return (Resource.from_message(name, typeurls.CLUSTER, cluster),)


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def _own_resources(rollout: PublishedRollout) -> tuple[Resource, ...]:
    """What a rollout has to itself: its clusters (and load assignments), and while it routes, the
    listener and route configuration of proxyless gRPC clients. One lookup per rollout per publish."""
    own = [r for name, backend in rollout.clusters for r in build_cluster(name, backend)]
    if rollout.route:
        own += [build_api_listener(rollout.name), build_grpc_route_configuration(rollout)]
    return tuple(own)


def _resources(rollouts: Iterable[PublishedRollout]) -> list[tuple[str, Resource]]:
    """Every resource of these rollouts, with the rollout it comes from ("" for shared ones)."""
    resources: list[tuple[str, Resource]] = []
    by_listener: dict[str, list[PublishedRollout]] = {}
    listeners: dict[str, ListenerSpec] = {}
    for rollout in rollouts:
        resources.extend((rollout.name, r) for r in _own_resources(rollout))
        if not rollout.route:  # being removed: only its clusters remain, until proxies let go
            continue
        by_listener.setdefault(rollout.listener.key, []).append(rollout)
        listeners[rollout.listener.key] = rollout.listener
    for key, members in by_listener.items():
        listener = listeners[key]
        sampled = sorted(member.name for member in members if member.access_log)
        for member in members:
            if member.access_log:  # every slot's bucket, used or not: the listener waits for each it names
                resources.extend((member.name, build_sampling_bucket(member.name, slot, member.samples_per_second))
                                 for slot in range(SAMPLING_SLOTS))
        resources.append(("", build_listener(listener, bool(sampled), tuple(sampled))))
        resources.append(("", build_route_configuration(route_name(listener), members)))
    return resources


def clear_built() -> None:
    """Forget every memoized resource (the benchmark's cold build)."""
    for builder in (build_listener, build_sampling_bucket, build_api_listener, build_grpc_route_configuration,
                    build_cluster, _encoded_virtual_host, _own_resources, _route_violations):
        builder.cache_clear()


def build_snapshot(rollouts: Iterable[PublishedRollout]) -> Snapshot:
    """One group's snapshot: listeners, routes, clusters and endpoints for these rollouts.

    Raises ValueError on two different resources of one name; `render` reports that instead.
    """
    return Snapshot.of(resource for _, resource in _resources(rollouts))


# ---- what Envoy would reject ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Violation:
    """One rule Envoy enforces that a snapshot breaks, and the rollouts whose content breaks it."""

    reason: str
    rollouts: frozenset[str]


@dataclass(frozen=True, slots=True)
class Rendered:
    """A snapshot, or (when `violations` is not empty) None: it must not be published."""

    snapshot: Snapshot | None
    violations: tuple[Violation, ...]


def render(rollouts: Iterable[PublishedRollout]) -> Rendered:
    """`build_snapshot`, checked against what Envoy rejects (`violations`) before anyone sees it."""
    owned = _resources(rollouts)
    found: list[Violation] = []
    kept: dict[tuple[str, str], tuple[str, Resource]] = {}
    for owner, resource in owned:
        key = (resource.type_url, resource.name)
        first = kept.setdefault(key, (owner, resource))
        if first[1].version != resource.version:
            kind = typeurls.short_name(resource.type_url)
            found.append(Violation(f"two different {kind} resources are both named {resource.name!r}",
                                   frozenset(o for o in (first[0], owner) if o)))
    snapshot = Snapshot.of(resource for _, resource in kept.values())
    found.extend(violations(snapshot))
    return Rendered(None if found else snapshot, tuple(found))


def _domain_problem(domain: str) -> str | None:
    """Envoy's own check of a domain (a header value: no NUL, CR or LF). A `*` anywhere but at the
    start or the end is not an error to Envoy, only an exact match that never matches."""
    if any(c in domain for c in "\0\r\n"):
        return f"domain {domain!r} contains NUL, CR or LF"
    return None


def violations(snapshot: Snapshot) -> list[Violation]:
    """Every rule Envoy would NACK this snapshot for, as far as our builders can break them.

    Reads the route configurations back from their bytes (an independent check of the builders):
    domains unique across the virtual hosts of one route configuration (case-insensitively, as
    Envoy compares them: "Only unique values for domains are permitted"; which makes a second `*`
    an error too), at least one well-formed domain per virtual host, unique virtual host names,
    weighted clusters with a positive total and clusters that exist; then every reference between
    types (`Snapshot.inconsistencies`). Rollouts are named by their virtual hosts (a virtual host is
    named after its rollout).
    """
    found: list[Violation] = []
    clusters = snapshot.items(typeurls.CLUSTER)
    for resource in snapshot.items(typeurls.ROUTE).values():
        own, named = _route_violations(resource)
        found.extend(own)
        for vhost, cluster in named:
            if cluster not in clusters:
                found.append(Violation(f"route {resource.name}: virtual host {vhost} names missing cluster "
                                       f"{cluster!r}", frozenset({vhost})))
    found.extend(Violation(problem, frozenset()) for problem in snapshot.inconsistencies()
                 if not problem.startswith("RDS "))  # a route's missing cluster is blamed above
    return found


@functools.lru_cache(maxsize=BUILT_RESOURCES_KEPT)
def _route_violations(resource: Resource) -> tuple[tuple[Violation, ...], tuple[tuple[str, str], ...]]:
    """What one route configuration breaks on its own, and the (virtual host, cluster) it names.
    Route configurations are immutable and most survive a change: each version is read once."""
    config = _decode_route(resource)
    route = resource.name
    found: list[Violation] = []
    named: list[tuple[str, str]] = []
    domains: dict[str, str] = {}
    names: set[str] = set()
    for vh in config.virtual_hosts:
        if vh.name in names:
            found.append(Violation(f"route {route}: two virtual hosts named {vh.name!r}", frozenset({vh.name})))
        names.add(vh.name)
        seen_here: set[str] = set()
        if not vh.domains:
            found.append(Violation(f"route {route}: virtual host {vh.name} has no domain", frozenset({vh.name})))
        for domain in vh.domains:
            problem = _domain_problem(domain)
            if problem is not None:
                found.append(Violation(f"route {route}: virtual host {vh.name}: {problem}", frozenset({vh.name})))
            other = domains.setdefault(domain.lower(), vh.name)
            if other != vh.name or domain.lower() in seen_here:
                found.append(Violation(
                    f"route {route}: domain {domain!r} is served twice (virtual hosts {other} and {vh.name});"
                    " Envoy permits only unique domains",
                    frozenset({other, vh.name}),
                ))
            seen_here.add(domain.lower())
        for r in vh.routes:
            weighted = r.route.weighted_clusters.clusters
            if r.route.HasField("weighted_clusters") and sum(c.weight.value for c in weighted) == 0:
                found.append(Violation(f"route {route}: virtual host {vh.name}: weights add up to 0",
                                       frozenset({vh.name})))
            named.extend((vh.name, c.name) for c in weighted)
            named.extend((vh.name, m.cluster) for m in r.route.request_mirror_policies)
            if r.route.cluster:
                named.append((vh.name, r.route.cluster))
    return tuple(found), tuple(named)


def _decode_route(resource: Resource) -> route_pb2.RouteConfiguration:
    any_message = any_pb2.Any.FromString(resource.any_bytes)
    config = route_pb2.RouteConfiguration()
    any_message.Unpack(config)
    return config


def virtual_host_bytes(resource: Resource) -> dict[str, bytes]:
    """Each virtual host of a route configuration (by name) as its serialized bytes: what a NACK's
    message can be matched against to tell which virtual host Envoy refused."""
    return {vh.name: vh.SerializeToString(deterministic=True) for vh in _decode_route(resource).virtual_hosts}

# Aviary control plane image, built from this repository (the `aviary` name on PyPI is another project):
#   docker build -t aviary-control-plane:dev .
#   docker run --rm -v "$PWD/policies:/policies:ro" -v "$HOME/.aviary-token:/run/secrets/aviary/admin-token:ro" \
#     -v aviary-state:/var/lib/aviary -p 127.0.0.1:18000:18000 -p 127.0.0.1:18001:18001 \
#     -p 127.0.0.1:18002:18002 aviary-control-plane:dev
# The entrypoint is `aviary serve` with the container defaults below; arguments after the image name
# add to them or override them (`--policies https://git.example.com/team/policies.git`, ...).

# ---- build: install the project and its dependencies into a virtualenv ----------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/aviary
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xds ./xds
RUN /opt/aviary/bin/pip install . \
    && /opt/aviary/bin/pip uninstall --yes pip setuptools

# ---- run ------------------------------------------------------------------------------------------
FROM python:3.11-slim
# git: for `--policies <repository URL>`; Aviary runs it without prompts or user configuration.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 aviary \
    && useradd --system --uid 10001 --gid aviary --home-dir /var/lib/aviary --no-create-home aviary \
    && mkdir -p /var/lib/aviary /policies /run/secrets/aviary \
    && chown aviary:aviary /var/lib/aviary
COPY --from=build /opt/aviary /opt/aviary
ENV PATH=/opt/aviary/bin:$PATH PYTHONUNBUFFERED=1 \
    AVIARY_TOKEN_FILE=/run/secrets/aviary/admin-token
# Numeric, so that Kubernetes can check runAsNonRoot.
USER 10001:10001
WORKDIR /var/lib/aviary
VOLUME ["/var/lib/aviary"]
# xDS (Envoy connects here), admin gRPC API (CLI, health checks), Prometheus /metrics.
EXPOSE 18000 18001 18002
# The admin port's gRPC health service (no token needed): SERVING while the engine makes progress.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:18001')).Check(h.HealthCheckRequest(), timeout=3); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
# Off loopback the admin API needs a token: mount one at /run/secrets/aviary/admin-token (a Docker or
# Kubernetes secret); without it `aviary serve` refuses to start and says so.
ENTRYPOINT ["aviary", "serve", "--xds-address=0.0.0.0:18000", "--admin-address=0.0.0.0:18001", "--admin-token-file=/run/secrets/aviary/admin-token", "--metrics-address=0.0.0.0:18002", "--state-dir=/var/lib/aviary"]
CMD ["--policies=/policies"]

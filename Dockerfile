# egress-authz image: the ext_authz service the Istio egress gateway calls.
#   docker build -t egress-authz:0.1.0 .
# Runtime dependencies are pinned by requirements.lock (used as constraints, so
# the test and lint tools listed there stay out of the image). Runs as an
# unprivileged user with a read-only root filesystem (the chart mounts /tmp).

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/egress-authz
WORKDIR /src
# Dependencies first: this layer is reused until pyproject.toml or the lock changes.
# The runtime dependencies are read from pyproject.toml and pinned by the lock.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > runtime-requirements.txt \
 && /opt/egress-authz/bin/pip install -c requirements.lock -r runtime-requirements.txt
# Then the package itself (generated protobuf classes are committed in authz/envoy/gen).
COPY README.md ./
COPY authz ./authz
RUN /opt/egress-authz/bin/pip install --no-deps -c requirements.lock . \
 && /opt/egress-authz/bin/egress-authz --help >/dev/null

FROM python:3.11-slim
LABEL org.opencontainers.image.title="egress-authz" \
      org.opencontainers.image.description="Per-workload, per-hostname egress authorization for Istio meshes (Envoy ext_authz)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/egress-authz/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/egress-authz /opt/egress-authz
# A fixed numeric UID/GID, so Kubernetes can check runAsNonRoot without a name lookup.
RUN groupadd --system --gid 10001 egress-authz \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin egress-authz
USER 10001:10001
# 9000: ext_authz gRPC + grpc.health.v1; 9090: admin HTTP (/healthz, /readyz, /metrics).
EXPOSE 9000 9090
ENTRYPOINT ["egress-authz"]
# No default command: serve needs a policy source (--kube in a cluster, as the Helm
# chart runs it, or --policies DIR with a mounted directory).
CMD ["--help"]

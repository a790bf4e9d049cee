# The service-user gateway: `gateway serve` on the config in /etc/gateway, as a non-root user.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GATEWAY_CONFIG=/etc/gateway/gateway.yaml \
    GATEWAY_PROXY_LISTEN=0.0.0.0:8080 \
    GATEWAY_ADMIN_LISTEN=0.0.0.0:8081 \
    GATEWAY_STORE_URL=sqlite+aiosqlite:////var/lib/gateway/gateway.db

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# The package itself is the pinned artefact here; its dependencies are bounded in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-compile ".[fast]" \
    && useradd --system --uid 10001 --home-dir /var/lib/gateway --create-home gateway \
    && mkdir -p /etc/gateway \
    && rm -rf /src

COPY gateway.yaml /etc/gateway/gateway.yaml
COPY policies /etc/gateway/policies
# gateway.secret (the signing keys' sealing secret) is created beside gateway.yaml when
# GATEWAY_SECRET_KEY is not set: the folder must be writable by the gateway user.
RUN chown 10001 /etc/gateway

USER 10001
WORKDIR /var/lib/gateway
# The SQLite default lives here: keep it (and its WAL) on a volume, not in the container's layer.
VOLUME ["/var/lib/gateway"]
EXPOSE 8080 8081
# Ready, not just alive: 503 while the store is unreachable past its grace or while draining.
# The image has no curl; the admin address is the one GATEWAY_ADMIN_LISTEN names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD ["python", "-c", \
    "import os, urllib.request; port = os.environ.get('GATEWAY_ADMIN_LISTEN', ':8081').rsplit(':', 1)[1]; urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2)"]
ENTRYPOINT ["gateway"]
# One worker per core the container may use (its cpuset, capped by a --cpus quota).
CMD ["serve", "--workers", "auto"]

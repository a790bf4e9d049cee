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
EXPOSE 8080 8081
ENTRYPOINT ["gateway"]
CMD ["serve"]

# xiaoai-bridge container image: docker build -t xiaoai-bridge .
# Config: /config/xiaoai-bridge.toml (mount read-only), state: /data (a volume).
# BASE_IMAGE: any image with python3 >= 3.11 and its venv module, e.g. the default, or plain
# Debian with python3 and python3-venv (scripts/container-test builds on that).
ARG BASE_IMAGE=python:3.12-slim

# -- build: the project installed into a venv ------------------------------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install .

# -- runtime: the venv only, run as an unprivileged user --------------------------------------
FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 xiaoai \
    && useradd --system --uid 10001 --gid xiaoai --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin xiaoai \
    && mkdir -p /config /data \
    && chown xiaoai:xiaoai /data \
    && chmod 0700 /data
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    XIAOAI_BRIDGE_DATA_DIR=/data \
    XIAOAI_BRIDGE_CONFIG=/config/xiaoai-bridge.toml

USER xiaoai
WORKDIR /data
VOLUME ["/config", "/data"]
EXPOSE 8099

# /healthz is reached on the container's loopback, which works whatever [http] host is.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('XIAOAI_BRIDGE_HTTP__PORT', '8099'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status != 200)"]

# Two conveniences, then exec (the bridge is PID 1 and gets SIGTERM directly):
# - no file at $XIAOAI_BRIDGE_CONFIG: run from environment variables alone;
# - XIAOAI_BRIDGE_HTTP__TOKEN set and no host chosen: serve the status page beyond the
#   container (the service refuses a non-loopback host without a token).
CMD ["sh", "-c", "if [ -n \"$XIAOAI_BRIDGE_CONFIG\" ] && [ ! -f \"$XIAOAI_BRIDGE_CONFIG\" ]; then echo \"no config file at $XIAOAI_BRIDGE_CONFIG: using environment variables only\" >&2; unset XIAOAI_BRIDGE_CONFIG; fi; if [ -n \"$XIAOAI_BRIDGE_HTTP__TOKEN\" ] && [ -z \"$XIAOAI_BRIDGE_HTTP__HOST\" ]; then export XIAOAI_BRIDGE_HTTP__HOST=0.0.0.0; fi; exec xiaoai-bridge run"]

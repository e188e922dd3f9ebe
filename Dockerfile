# syntax=docker/dockerfile:1
#
# One image for every role; the command picks it:
#   docker run IMAGE                 -> hatched-mirror serve   (HTTP on 8000)
#   docker run IMAGE worker          -> hatched-mirror worker  (arq)
#   docker run IMAGE migrate         -> hatched-mirror migrate (one-off, idempotent)
#
# Reproducible: dependencies come from requirements.lock (every pin ==), the build tools are
# pinned below, and the package itself is installed with --no-deps. For bit-for-bit rebuilds
# pin the base image too: --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest>.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=84.2.1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY requirements.lock /tmp/requirements.lock
RUN pip install "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}" \
 && pip install --require-virtualenv -r /tmp/requirements.lock

# Then the package, without letting pip resolve anything else.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install --no-deps --no-build-isolation . \
 && pip check

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="hatched-mirror" \
      org.opencontainers.image.description="Webhook-driven mirror of Hatched buddies" \
      org.opencontainers.image.licenses="MIT"

# The migrations are not package data: the wheel holds only service/, and service/store.py
# would look for <site-packages>/sql. MIRROR_SQL_DIR points it at the copy below.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH \
    MIRROR_SQL_DIR=/app/sql

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY sql/ /app/sql/

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

EXPOSE 8000

# For `serve` (the default command). The worker and migrate containers override or disable it
# (deploy/compose.yaml); Kubernetes ignores it and uses the probes in deploy/k8s/.
# The image has no curl: Python's urllib does the request.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["hatched-mirror"]
CMD ["serve"]

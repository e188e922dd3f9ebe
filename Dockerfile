# syntax=docker/dockerfile:1
#
# One image for every role; the command picks it:
#   docker run IMAGE                 -> hatched-mirror serve   (HTTP on 8000)
#   docker run IMAGE worker          -> hatched-mirror worker  (arq)
#   docker run IMAGE migrate         -> hatched-mirror migrate (one-off, idempotent)
#
# Without a Docker daemon: `buildah bud --format docker -t hatched-mirror .` (the OCI format,
# buildah's default, has no HEALTHCHECK and silently drops it).
#
# Reproducible: dependencies come from requirements.lock (every pin ==, every file hashed,
# installed with --require-hashes), the build tool is pinned below, and the package is built
# as a wheel and installed with --no-deps. For bit-for-bit rebuilds pin the base image too:
# --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest>.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG SETUPTOOLS_VERSION=84.2.1

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    PYTHONDONTWRITEBYTECODE=1

# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY requirements.lock /tmp/requirements.lock
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-virtualenv --require-hashes -r /tmp/requirements.lock

# Then the package: a wheel (the migrations in sql/ are its package data `service.sql`), built
# with a pinned setuptools in a venv of its own so no build tool reaches the runtime venv.
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY service ./service
COPY sql ./sql
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install "setuptools==${SETUPTOOLS_VERSION}" \
 && /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /dist . \
 && /opt/venv/bin/pip install --require-virtualenv --no-deps /dist/hatched_mirror-*.whl \
 && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -m pip uninstall --yes pip setuptools

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="hatched-mirror" \
      org.opencontainers.image.description="Webhook-driven mirror of Hatched buddies" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

# No installer in the running image: the base image's pip, setuptools and wheel go too (the
# slim image has no compilers to remove).
RUN python -m pip uninstall --yes --disable-pip-version-check pip setuptools wheel \
 && groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app

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

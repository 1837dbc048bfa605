# syntax=docker/dockerfile:1
#
# Two images (docs/CONTAINERS.md): the API without torch, and the Celery workers with it.
#
#   docker build -t modelpress-api --target api .
#   docker build -t modelpress-worker --target worker .            # CPU torch (default)
#   docker build -t modelpress-worker:cuda --target worker \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker build -t modelpress-worker:cuda --target worker \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Where pip must trust an extra CA (an HTTPS proxy), pass its bundle as a build secret; it is
# mounted for the pip steps only and is in no layer:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt ...

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# python:3.11-* images already have Python 3.11 and this step does nothing there. Bases without
# Python (nvidia/cuda:*-ubuntu22.04, a bare Debian 12) take 3.11 from the distribution. Versions
# are not pinned because the same line must work on whichever base image BASE_IMAGE names.
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            ca-certificates python3.11 python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Non-root user. /data (MODELPRESS_DATA_DIR) is created here, owned by that user, so that a
# named volume mounted on it starts out with the same owner.
RUN groupadd --system --gid 10001 modelpress \
    && useradd --system --uid 10001 --gid modelpress --create-home --home-dir /home/modelpress \
        --shell /usr/sbin/nologin modelpress \
    && install -d -o modelpress -g modelpress -m 0755 /data

# ---------------------------------------------------------------------------------------------
FROM base AS api-builder

# The whole build context (minus .dockerignore) so that pyproject.toml, README.md and every
# package directory are there, whatever packages are added later.
COPY . /src
# `server` extra: the API without torch; `s3`: s3fs, for MODELPRESS_STORAGE_URL=s3://bucket/prefix.
# constraints.txt: every package at the version CI tested. Then what the running image never uses:
# pip itself and the packages' own test suites.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c /src/constraints.txt "/src[server,s3]" \
    && /opt/venv/bin/pip uninstall -y -q pip \
    && find /opt/venv/lib -type d -name tests -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
FROM base AS worker-builder

# torch goes in first, from the index named here (CPU wheels by default; a CUDA index such as
# https://download.pytorch.org/whl/cu128 for GPU workers). A bare `pip install .` would take
# torch from PyPI, which on Linux is the multi-GB CUDA build. --no-deps: torch's own
# dependencies come from PyPI in the next step, at the versions of constraints.txt.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY . /src
# `worker` extra: the server's packages and the compression stack; torch is already satisfied.
# As in api-builder, pip and the packages' test suites go.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && /opt/venv/bin/pip install --no-cache-dir -c /src/constraints.txt "/src[worker,s3]" \
    && /opt/venv/bin/pip uninstall -y -q pip \
    && find /opt/venv/lib -type d -name tests -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
FROM base AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    MODELPRESS_DATA_DIR=/data \
    HF_HOME=/data/huggingface

WORKDIR /home/modelpress
USER 10001:10001

# ---------------------------------------------------------------------------------------------
FROM runtime AS worker

# Only the virtual environment: the package is installed (not editable), migrations included.
COPY --from=worker-builder /opt/venv /opt/venv

CMD ["modelpress", "worker", "--queues", "cpu", "--concurrency", "1"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS api

COPY --from=api-builder /opt/venv /opt/venv

# No torch here, so no embedded worker: this image is the API of a cluster (Postgres, Redis,
# worker containers; docker-compose.yml). One container that serves on its own (embedded mode)
# is the worker image: `docker run -p 8000:8000 modelpress-worker modelpress serve --host 0.0.0.0`.
ENV MODELPRESS_MODE=cluster

EXPOSE 8000
CMD ["sh", "-c", "modelpress migrate && exec modelpress serve --host 0.0.0.0 --port 8000"]

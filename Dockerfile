# syntax=docker/dockerfile:1
#
# One image for the modelpress API and its Celery workers (docs/CONTAINERS.md).
#
#   docker build -t modelpress .                       # CPU torch (default)
#   docker build -t modelpress:cuda \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker build -t modelpress:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# Targets: `api` (the last stage, so the default) and `worker`; they differ only in CMD.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# python:3.11-* images already have Python 3.11 and this step does nothing there. CUDA bases
# (nvidia/cuda:*-ubuntu22.04) have no Python: take 3.11 from the distribution. Versions are not
# pinned because the same line must work on whichever base image BASE_IMAGE names.
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            ca-certificates python3.11 python3.11-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# ---------------------------------------------------------------------------------------------
FROM base AS builder

# torch goes in first, from the index named here (CPU wheels by default; a CUDA index such as
# https://download.pytorch.org/whl/cu128 for GPU workers). A bare `pip install .` would take
# torch from PyPI, which on Linux is the multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

RUN python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The whole build context (minus .dockerignore) so that pyproject.toml, README.md and every
# package directory are there, whatever packages are added later.
COPY . /src
# `s3` extra: s3fs, for MODELPRESS_STORAGE_URL=s3://bucket/prefix. torch is already satisfied.
# constraints.txt: every other package at the version CI tested.
RUN /opt/venv/bin/pip install --no-cache-dir -c /src/constraints.txt "/src[s3]"

# ---------------------------------------------------------------------------------------------
FROM base AS runtime

# Non-root user. /data (MODELPRESS_DATA_DIR) is created here, owned by that user, so that a
# named volume mounted on it starts out with the same owner.
RUN groupadd --system --gid 10001 modelpress \
    && useradd --system --uid 10001 --gid modelpress --create-home --home-dir /home/modelpress \
        --shell /usr/sbin/nologin modelpress \
    && install -d -o modelpress -g modelpress -m 0755 /data

# Only the virtual environment: the package is installed (not editable), migrations included.
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    MODELPRESS_DATA_DIR=/data \
    HF_HOME=/data/huggingface

WORKDIR /home/modelpress
USER 10001:10001

# ---------------------------------------------------------------------------------------------
FROM runtime AS worker

CMD ["modelpress", "worker", "--queues", "cpu", "--concurrency", "1"]

# ---------------------------------------------------------------------------------------------
FROM runtime AS api

EXPOSE 8000
CMD ["sh", "-c", "modelpress migrate && exec modelpress serve --host 0.0.0.0 --port 8000"]

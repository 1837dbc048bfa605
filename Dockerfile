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
# apt's caches go in the same step: the package lists, the downloaded .debs and the binary caches
# (pkgcache.bin, srcpkgcache.bin: 78 MB on a bare Debian 12 without the docker-clean config).
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            ca-certificates python3.11 python3.11-venv \
        && apt-get clean \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb; \
    fi

# Non-root user. /data (MODELPRESS_DATA_DIR) is created here, owned by that user, so that a
# named volume mounted on it starts out with the same owner.
RUN groupadd --system --gid 10001 modelpress \
    && useradd --system --no-log-init --uid 10001 --gid modelpress --create-home --home-dir /home/modelpress \
        --shell /usr/sbin/nologin modelpress \
    && install -d -o modelpress -g modelpress -m 0755 /data

# ---------------------------------------------------------------------------------------------
FROM base AS api-builder

# The whole build context (minus .dockerignore) so that pyproject.toml, README.md and every
# package directory are there, whatever packages are added later.
COPY . /src
# `server` extra: the API without torch; `s3`: s3fs, for MODELPRESS_STORAGE_URL=s3://bucket/prefix.
# constraints.txt: every package at the version CI tested. Then what the running image never uses:
# pip, setuptools (nothing here requires them) and the packages' own test suites.
# Bytecode: not for every module (--no-compile; that was ~70 MB, mostly for modules the API never
# imports: botocore's, matplotlib's, numpy's, fontTools' until a report chart is drawn), only for
# the ~800 modules that `modelpress migrate` and `serve` import at start: those modules are
# imported here and each one's .pyc written (checked-hash: valid whatever mtime the copy gives
# the sources). Without it, each start compiled them in memory: 3 s -> 9 s on a loaded 2-core
# machine (docs/CONTAINERS.md). A module missing from the list only starts slower.
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --no-compile -c /src/constraints.txt "/src[server,s3]" \
    && /opt/venv/bin/pip uninstall -y -q pip setuptools \
    && find /opt/venv -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} + \
    && /opt/venv/bin/python -c "$(printf '%s\n' \
        'import importlib, py_compile, sys' \
        'for name in sys.argv[1:]:' \
        '    try: importlib.import_module(name)' \
        '    except Exception as e: print(f"bytecode warm-up: {name} not imported ({e!r})")' \
        'files = {getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}' \
        'files = sorted(f for f in files if f.startswith("/opt/venv/") and f.endswith(".py"))' \
        'mode = py_compile.PycInvalidationMode.CHECKED_HASH' \
        'for f in files: py_compile.compile(f, doraise=True, invalidation_mode=mode)' \
        'print(f"bytecode warm-up: {len(files)} modules compiled")')" \
        modelpress._entry app.cli app.main core.config core.db core.logs core.reconcile core.signing \
        alembic.command alembic.config migrations sqlalchemy.orm \
        sqlalchemy.dialects.postgresql.psycopg sqlalchemy.dialects.postgresql.asyncpg \
        uvicorn uvicorn.config uvicorn.lifespan.on uvicorn.protocols.http.h11_impl \
        uvicorn.protocols.websockets.auto uvicorn.loops.asyncio

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
# As in api-builder, pip and the packages' test suites go, but setuptools stays (torch 2.13 requires
# it) and so does the bytecode (a worker imports torch and transformers at start: thousands of
# modules, every time it starts).
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

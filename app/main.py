"""create_app(): routers, error handlers, health checks, metrics."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import text

from app.datasets.endpoints import router as datasets_router
from app.errors import DEFAULT_RETRY_AFTER_S, RETRY_AFTER_HEADER, install_error_handlers
from app.http_limits import BodyLimits
from app.imports.endpoints import router as imports_router
from app.jobs.endpoints import router as jobs_router
from app.keys.endpoints import router as keys_router
from app.models.endpoints import router as models_router
from app.observability import install_observability
from app.openapi import install_openapi, operation_id
from app.resumable.endpoints import TusProtocol
from app.resumable.endpoints import router as uploads_router
from app.sweeper import install_sweeper
from app.sweeps.endpoints import router as sweeps_router
from app.ui.endpoints import router as ui_router
from app.webhooks.endpoints import router as webhooks_router
from core import __version__
from core.db import get_engine

log = logging.getLogger("modelpress.api")


class Readiness(BaseModel):
    """What GET /readyz found."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(description='per dependency (`database`, `broker`): "ok" or "error: <type>"')


def create_app() -> FastAPI:
    app = FastAPI(
        title="modelpress",
        version=__version__,
        description="Compression as a service for transformer and LLM models. "
        "Every /v1 route needs `Authorization: Bearer <api key>`; errors are RFC 9457 problem+json.",
        # Served from local files by install_openapi (app/openapi.py), not from a CDN.
        docs_url=None,
        redoc_url=None,
        # createJob, not submit_job_v1_jobs_post: what generated clients name their functions.
        generate_unique_id_function=operation_id,
    )
    install_error_handlers(app)
    # Body size, read timeout and strict JSON (app/http_limits.py); added first so the
    # observability middleware wraps it (its refusals get a request id and are counted).
    # The upload routes stream multipart to disk and bound it themselves (app/uploads.py).
    app.add_middleware(
        BodyLimits, upload_paths=("/v1/models", "/v1/datasets", "/ui/models"), patch_prefixes=("/v1/uploads/",)
    )
    install_observability(app)  # X-Request-ID, HTTP metrics, GET /metrics
    # Outside the other added middleware: a method override must be seen before the body limits,
    # and Tus-Resumable added to every answer under /v1/uploads, theirs included (an unexpected
    # 500 comes from Starlette's ServerErrorMiddleware, outside this one).
    app.add_middleware(TusProtocol)
    # A staging folder of this process's own, and the folders of API processes that are gone swept.
    install_sweeper(app)
    # POST /v1/models/import before the models router (its paths take no {model_id} POST, but a
    # route added there later must not shadow it).
    app.include_router(imports_router)
    app.include_router(models_router)
    app.include_router(uploads_router)
    app.include_router(jobs_router)
    app.include_router(datasets_router)
    app.include_router(sweeps_router)
    app.include_router(webhooks_router)
    app.include_router(keys_router)
    app.include_router(ui_router)  # the web dashboard at /ui (docs/UI.md); not in the OpenAPI document
    install_openapi(app)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        response_model=Readiness,
        responses={
            503: {
                "model": Readiness,
                "description": "A dependency is down",
                "headers": {"Retry-After": RETRY_AFTER_HEADER},
            }
        },
    )
    def readyz() -> JSONResponse:
        """The database and the broker are reachable."""
        checks: dict[str, str] = {}
        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"error: {e.__class__.__name__}"
        try:
            from core.queue import client

            with client().connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            checks["broker"] = "ok"
        except Exception as e:
            checks["broker"] = f"error: {e.__class__.__name__}"
        if all(v == "ok" for v in checks.values()):
            return JSONResponse({"status": "ok", "checks": checks})
        return JSONResponse(
            {"status": "unavailable", "checks": checks},
            status_code=503,
            headers={"Retry-After": str(DEFAULT_RETRY_AFTER_S)},
        )

    return app

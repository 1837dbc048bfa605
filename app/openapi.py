"""The OpenAPI document as client generators want it, and the pages that show it offline.

What FastAPI generates is finished here (docs/API.md tells the whole story):

* **Operation ids** are camelCase names of what a route does (``createJob``, ``uploadModel``,
  ``getJob``): :func:`operation_id` derives them from the route function's name, with the
  renames of ``OPERATION_IDS`` where that name reads poorly, instead of FastAPI's
  ``upload_model_v1_models_post``. A generated client names its functions after them. They must
  be unique: :func:`finish_spec` refuses a document where two are the same.
* **One** ``Problem`` **schema**: every error response refers to it (app/errors.py,
  ``problem_responses`` and ``declare_problem_errors``).
* **Typed metrics and report**: ``JobOut.metrics`` and ``JobReport`` are free-form where core
  defines them; the document describes them with app/jobs/schemas.py's models.
* **No schema twice**: a Literal or a free-form dict the models repeat inline is one component
  (``_shared_schemas``), referred to from each place.
* **Examples** of the job spec on the routes that take one.

``/docs`` (Swagger UI) and ``/redoc`` load their scripts and styles from this server, out of the
``fastapi-offline`` package: no page asks anything of another host, so they work without network.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from app.jobs.schemas import JOB_EXAMPLES, JobMetrics, JobReport
from app.resumable.schemas import FROM_UPLOADS_SCHEMA
from app.sweeps.schemas import SweepStatus
from core.errors import NotFound
from core.jobs.schemas import JobPlan, JobStatus

# Where the route function's name does not say what the operation does, or says it twice.
# "HEAD <name>": the HEAD route of a function that also serves GET.
OPERATION_IDS = {
    "submit_job": "createJob",
    "job_events": "streamJobEvents",
    "job_report": "getJobReport",
    "job_report_link": "createJobReportLink",
    "job_report_view": "viewJobReport",
    "HEAD download_artifact": "headArtifact",
    "HEAD download_artifact_file": "headArtifactFile",
    "create_link": "createSweepLink",
    "webhook_secret": "getWebhookSecret",
    "job_webhook_deliveries": "listWebhookDeliveries",
    "upload_options": "getUploadOptions",
    "head_upload": "getUploadOffset",
    "patch_upload": "appendToUpload",
    "metrics": "getMetrics",
    "healthz": "checkHealth",
    "readyz": "checkReadiness",
}

CAMEL_CASE = re.compile(r"^[a-z]+(?:[A-Z][a-z0-9]*)*$")


def _camel(snake: str) -> str:
    first, *rest = snake.split("_")
    return first + "".join(word.capitalize() for word in rest)


def _operation_id(route: APIRoute) -> str:
    head_only = route.methods == {"HEAD"}
    renamed = OPERATION_IDS.get(f"HEAD {route.name}") if head_only else None
    if renamed or route.name in OPERATION_IDS:
        return renamed or OPERATION_IDS[route.name]
    name = _camel(route.name)
    return "head" + name[0].upper() + name[1:] if head_only else name


def operation_id(route: APIRoute) -> str:
    """FastAPI's ``generate_unique_id_function``: the operation id of a route. A route that gives
    no summary gets one that says what its id says (``createJob``: "Create job"), not FastAPI's
    default from the function's name ("Submit Job")."""
    oid = _operation_id(route)
    if route.summary is None:
        route.summary = " ".join(re.sub(r"([A-Z])", r" \1", oid).split()).capitalize()
    return oid


def _check_operation_ids(spec: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    for path, item in spec.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "operationId" not in op:
                continue
            oid, where = op["operationId"], f"{method.upper()} {path}"
            if not CAMEL_CASE.match(oid):
                raise RuntimeError(f"operation id {oid!r} of {where} is not camelCase (app/openapi.py)")
            if oid in seen:
                raise RuntimeError(f"operation id {oid!r} of {where} is also {seen[oid]}'s (app/openapi.py)")
            seen[oid] = where


def _typed_metrics(spec: dict[str, Any]) -> None:
    """app/jobs/schemas.py's models in place of the free-form report and metrics."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    _, defs = models_json_schema(
        [(JobReport, "serialization"), (JobMetrics, "serialization")], ref_template="#/components/schemas/{model}"
    )
    for name, schema in defs["$defs"].items():
        if name in schemas and name != "JobReport" and schemas[name] != schema:
            raise RuntimeError(f"app/jobs/schemas.py's {name} would replace another schema of that name")
        schemas[name] = schema
    metrics = schemas.get("JobOut", {}).get("properties", {}).get("metrics")
    if metrics is not None:
        metrics.pop("anyOf", None)
        metrics.pop("additionalProperties", None)
        metrics["anyOf"] = [{"$ref": "#/components/schemas/JobMetrics"}, {"type": "null"}]
        metrics.setdefault("description", "what the job measured, once it has succeeded (null before)")


def _shared_schemas() -> dict[str, dict[str, Any]]:
    """Schemas that the models repeat inline (a Literal, a free-form dict), each a component of
    its own: a generated client gets one class for each instead of one per place."""
    return {
        "JsonObject": {"type": "object", "additionalProperties": True, "description": "any JSON object"},
        "StringMap": {"type": "object", "additionalProperties": {"type": "string"}},
        "JobStatus": TypeAdapter(JobStatus).json_schema(),
        "SweepStatus": TypeAdapter(SweepStatus).json_schema(),
        "PlanPath": TypeAdapter(JobPlan.model_fields["path"].annotation).json_schema(),
        "FilesFromUploads": FROM_UPLOADS_SCHEMA,
    }


# What a schema says about itself or its place, not what it accepts: ignored when comparing.
_ANNOTATIONS = frozenset({"title", "description", "examples", "default"})


def _shape(schema: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in schema.items() if k not in _ANNOTATIONS}, sort_keys=True)


def _share(node: Any, refs: dict[str, str]) -> None:
    """Every schema under ``node`` that is one of ``refs``' shapes becomes a ``$ref`` to it
    (with its description, which says what it is in that place)."""
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in list(children):
        ref = refs.get(_shape(child)) if isinstance(child, dict) else None
        if ref is not None:
            node[key] = {"$ref": ref, **({"description": child["description"]} if "description" in child else {})}
        else:
            _share(child, refs)


def _share_repeated(spec: dict[str, Any]) -> None:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    shared = _shared_schemas()
    refs = {_shape(schema): f"#/components/schemas/{name}" for name, schema in shared.items()}
    for name in list(schemas):
        _share(schemas[name], refs)
    _share(spec.get("paths", {}), refs)
    for name, schema in shared.items():
        if schemas.get(name, schema) != schema:
            raise RuntimeError(f"app/openapi.py's shared schema {name} would replace another schema of that name")
        schemas[name] = schema


def _job_examples(spec: dict[str, Any]) -> None:
    for item in spec.get("paths", {}).values():
        for op in item.values():
            body = (
                op.get("requestBody", {}).get("content", {}).get("application/json") if isinstance(op, dict) else None
            )
            if body and body.get("schema") == {"$ref": "#/components/schemas/JobIn"}:
                body["examples"] = JOB_EXAMPLES


def finish_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The document FastAPI generated (app/errors.py's problems already declared), finished for
    generators: typed metrics, shared schemas, examples, operation ids checked."""
    _typed_metrics(spec)
    _share_repeated(spec)
    _job_examples(spec)
    _check_operation_ids(spec)
    return spec


def install_openapi(app: FastAPI) -> None:
    """``app.openapi()`` with :func:`finish_spec` applied once to each document FastAPI generates
    (after app/errors.py's own step), and the offline ``/docs`` and ``/redoc``."""
    generate = app.openapi
    done: list[int] = []

    def openapi() -> dict[str, Any]:
        spec = generate()
        if done != [id(spec)]:
            finish_spec(spec)
            done[:] = [id(spec)]
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
    _install_docs(app)


# The files of fastapi-offline's static folder that the pages load, and their types.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
ASSETS_PATH = "/docs/assets"
# ReDoc's sidebar shows Redocly's logo from their CDN (whatever its options): an empty image instead.
_REDOC_LOGO = b'src:"https://cdn.redoc.ly/redoc/logo-mini.svg"'
_BLANK_IMAGE = b"src:\"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E\""


def _asset_dir() -> Path:
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "fastapi-offline is not installed: /docs and /redoc serve its files (pip install -e '.[server]')"
        )
    return Path(spec.origin).parent / "static"


@functools.cache
def _asset(name: str) -> bytes:
    raw = (_asset_dir() / name).read_bytes()
    return raw.replace(_REDOC_LOGO, _BLANK_IMAGE) if name == "redoc.standalone.js" else raw


def _install_docs(app: FastAPI) -> None:
    """Swagger UI at /docs, ReDoc at /redoc (the app is built with ``docs_url=None``)."""
    missing = [name for name in ASSETS if not (_asset_dir() / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline lacks {missing}: /docs and /redoc need them")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")
        return f"{root}{app.openapi_url}", f"{root}{ASSETS_PATH}"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        spec_url, assets = urls(request)
        return get_swagger_ui_html(
            openapi_url=spec_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            # No badge from the online validator (it would send the document's URL there).
            swagger_ui_parameters={"validatorUrl": None, "displayOperationId": True},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        spec_url, assets = urls(request)
        return get_redoc_html(
            openapi_url=spec_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in ASSETS:
            raise NotFound(f"no asset {name}")
        # The package's version names the files' contents: a day in caches is safe.
        return Response(_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "public, max-age=86400"})

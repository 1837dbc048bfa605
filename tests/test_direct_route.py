"""app.routing.DirectRoute on its own: what it refuses when the app is built, and that what it
serves matches FastAPI's own handling of the same endpoint (no database: no caller parameter)."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.testclient import TestClient

from app.auth import CurrentCaller
from app.errors import install_error_handlers
from app.routing import DirectRoute
from core.errors import NotFound

pytestmark = pytest.mark.unit


def _app(endpoint, path: str = "/things/{thing_id}/{part}", route_class=DirectRoute) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter(prefix="/v1")
    router.add_api_route(path, endpoint, methods=["GET"], route_class_override=route_class)
    app.include_router(router)
    return app


async def _thing(thing_id: str, part: str) -> Response:
    if thing_id == "missing":
        raise NotFound(f"no thing {thing_id}")
    return Response(f"{thing_id}/{part}".encode(), media_type="text/plain")


def test_serves_path_parameters_and_errors_as_fastapi_does():
    from fastapi.routing import APIRoute

    direct, plain = TestClient(_app(_thing)), TestClient(_app(_thing, route_class=APIRoute))
    for path in (
        "/v1/things/a/b",
        "/v1/things/caf%C3%A9/x%20y",
        "/v1/things/missing/b",
        "/v1/things/a",
        "/v1/things/a/b/c",
    ):
        d, p = direct.get(path), plain.get(path)
        assert (d.status_code, d.content, d.headers.get("content-type")) == (
            p.status_code,
            p.content,
            p.headers.get("content-type"),
        ), path
    assert direct.get("/v1/things/café/x y").text == "café/x y"
    assert direct.get("/v1/things/missing/b").json()["code"] == "not_found"
    assert direct.post("/v1/things/a/b").status_code == 405


def test_a_non_response_return_value_is_an_error():
    async def returns_dict(thing_id: str, part: str):
        return {"id": thing_id}

    with pytest.raises(TypeError, match="not a Response"):
        TestClient(_app(returns_dict), raise_server_exceptions=True).get("/v1/things/a/b")


async def _with_query(thing_id: str, part: str, q: str = Query("x")) -> Response:
    return Response(b"")


async def _with_int(thing_id: int, part: str) -> Response:
    return Response(b"")


def _sync(thing_id: str, part: str) -> Response:
    return Response(b"")


async def _two_callers(thing_id: str, part: str, a: CurrentCaller, b: CurrentCaller) -> Response:
    return Response(b"")


async def _with_request(thing_id: str, part: str, request: Request) -> Response:
    return Response(b"")


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        (_with_query, "only path parameters"),
        (_with_int, "plain str"),
        (_sync, "must be async"),
        (_two_callers, "one CurrentCaller"),
        (_with_request, "no Request"),
    ],
)
def test_refuses_at_build_time_what_it_would_not_fill(endpoint, message):
    with pytest.raises(TypeError, match=message):
        _app(endpoint)

"""app.routing.DirectRoute on its own: what it refuses when the app is built, and that what it
serves matches FastAPI's own handling of the same endpoint (no database: no caller parameter).
And the ETag both it and app.routing.ETagRoute put on a read (app/conditional.py)."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.testclient import TestClient

from app.auth import CurrentCaller
from app.conditional import body_etag, none_match
from app.errors import install_error_handlers
from app.routing import DirectRoute, ETagRoute, etag_get
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


def test_a_read_carries_the_etag_of_its_body_and_a_matching_if_none_match_gets_304():
    c = TestClient(_app(_thing))
    r = c.get("/v1/things/a/b")
    tag = r.headers["etag"]
    assert r.status_code == 200 and tag == body_etag(b"a/b") and r.headers["cache-control"] == "private, no-cache"
    assert c.get("/v1/things/a/c").headers["etag"] != tag  # another body, another tag
    for sent in (tag, f"W/{tag}", f'"x", {tag}', "*", f' "x,y" ,{tag} '):
        r = c.get("/v1/things/a/b", headers={"If-None-Match": sent})
        assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", tag), sent
        assert "content-type" not in r.headers and "content-length" not in r.headers, sent
    for sent in ('"x"', tag.strip('"'), '"x", W/"y"', ""):  # unquoted, or another tag: the body
        r = c.get("/v1/things/a/b", headers={"If-None-Match": sent})
        assert (r.status_code, r.text) == (200, "a/b"), sent
    r = c.get("/v1/things/missing/b", headers={"If-None-Match": "*"})  # an error is never tagged
    assert r.status_code == 404 and "etag" not in r.headers


def test_if_none_match_is_compared_weakly():
    assert none_match('W/"a"', '"a"') and none_match('"a"', 'W/"a"') and none_match(" * ", '"a"')
    assert none_match('"b", "a,c", "a"', '"a"') and not none_match('"a,c"', '"a"')
    assert not none_match('"b"', '"a"') and not none_match("a", '"a"') and not none_match("", '"a"')


def test_an_etag_route_keeps_its_headers_on_304_and_declares_it_all():
    app = FastAPI()
    router = APIRouter(prefix="/v1")

    @etag_get(router, "/pages/{page_id}", responses={200: {"description": "One page"}})
    def page(page_id: str, response: Response) -> dict[str, str]:
        response.headers["Vary"] = "Accept"
        response.headers["Cache-Control"] = "no-store"
        return {"id": page_id}

    app.include_router(router)
    c = TestClient(app)
    r = c.get("/v1/pages/p1")
    assert r.json() == {"id": "p1"} and r.headers["etag"] == body_etag(r.content)
    assert r.headers["cache-control"] == "no-store"  # a route's own Cache-Control stays
    r304 = c.get("/v1/pages/p1", headers={"If-None-Match": r.headers["etag"]})
    assert r304.status_code == 304 and r304.content == b""
    assert {k: r304.headers[k] for k in ("etag", "vary", "cache-control")} == {
        "etag": r.headers["etag"],
        "vary": "Accept",
        "cache-control": "no-store",
    }
    op = app.openapi()["paths"]["/v1/pages/{page_id}"]["get"]
    assert [p["name"] for p in op["parameters"]] == ["page_id", "If-None-Match"]
    assert op["responses"]["200"]["description"] == "One page" and "ETag" in op["responses"]["200"]["headers"]
    assert op["responses"]["304"]["headers"]["ETag"]["required"] is True
    with pytest.raises(TypeError, match="GET only"):
        router.add_api_route("/x", page, methods=["POST"], route_class_override=ETagRoute)

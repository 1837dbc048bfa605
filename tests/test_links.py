"""Links are built on the configured public base URL, never on the request's ``Host`` (or
``X-Forwarded-Host``/``-Proto``) header: embedded mode's default is the address ``serve`` listens
on; a cluster without a configured base gets relative links, which the SDK completes with the
address it uses. (A configured base across two API hosts: tests/test_secret.py.) The same holds
for the RFC 8288 ``Link`` header of list pages (core.pagination.link_header)."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers import safetensors_bytes

HOSTILE = {
    "Host": "evil.example",
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-Proto": "https",
    "Forwarded": "host=evil.example;proto=https",
}


@pytest.mark.unit
def test_base_url_rules(monkeypatch):
    from core import config, signing

    ok = {
        "https://press.example.com": "https://press.example.com",
        "https://press.example.com/mp/": "https://press.example.com/mp",
        "http://10.0.0.5:8000": "http://10.0.0.5:8000",
        "http://[::1]:8000": "http://[::1]:8000",
        "": "",
    }
    for value, want in ok.items():
        assert signing.check_public_base_url(value) == want
    for bad in (
        "press.example.com",
        "ftp://x.example",
        "https://",
        "https://x.example/?a=1",
        "https://x.example/#f",
        "https://user:pw@x.example",
        "https://x.example:99999",
        "https://x.example/a b",
        "javascript:alert(1)",
    ):
        with pytest.raises(signing.BadPublicBaseUrl):
            signing.check_public_base_url(bad)
    assert signing.serve_base_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert signing.serve_base_url("::", 9000) == "http://[::1]:9000"
    assert signing.serve_base_url("fe80::2", 9000) == "http://[fe80::2]:9000"
    assert signing.serve_base_url("press.local", 80) == "http://press.local:80"

    def base(**env: str) -> str:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        config.get_settings.cache_clear()
        try:
            return signing.public_base_url()
        finally:
            for k in env:
                monkeypatch.delenv(k)
            config.get_settings.cache_clear()

    assert base(MODELPRESS_MODE="embedded") == "http://127.0.0.1:8000"
    cluster = {
        "MODELPRESS_MODE": "cluster",
        "MODELPRESS_DATABASE_URL": "postgresql+psycopg://x@h/db",
        "MODELPRESS_BROKER_URL": "redis://h",
    }
    assert base(**cluster) == ""
    assert base(**cluster, MODELPRESS_PUBLIC_BASE_URL="https://p.example/") == "https://p.example"


@pytest.mark.unit
def test_page_links_replace_the_cursor_and_keep_the_rest():
    from core.pagination import page_links

    q = [("limit", "2"), ("cursor", "old"), ("status", "queued")]
    assert page_links("", "/v1/jobs", q, "nxt") == (
        '</v1/jobs?limit=2&status=queued>; rel="first", </v1/jobs?limit=2&status=queued&cursor=nxt>; rel="next"'
    )
    assert page_links("https://p.example/mp", "/v1/jobs", q, None) == (
        '<https://p.example/mp/v1/jobs?limit=2&status=queued>; rel="first"'  # the last page: no next
    )
    assert page_links("", "/v1/models", [], None) == '</v1/models>; rel="first"'
    # What would end the target or the header is escaped, in the query and in the base alike.
    odd = page_links('https://p.example/a>"b', "/v1/keys", [("tenant", 'x>; rel="evil", <y')], "c=")
    target = "https://p.example/a%3E%22b/v1/keys?tenant=x%3E%3B+rel%3D%22evil%22%2C+%3Cy"
    assert odd == f'<{target}>; rel="first", <{target}&cursor=c%3D>; rel="next"'
    assert httpx.Response(200, headers={"Link": odd}).links["next"]["url"] == f"{target}&cursor=c%3D"


def _pages(client: httpx.Client, path: str, **headers: str) -> tuple[list[str], list[str]]:
    """Every item id of a list route, and every ``Link`` target on the way, following
    ``rel="next"`` from a page of one item (``next_cursor`` is not read)."""
    ids, targets, r = [], [], client.get(path, params={"limit": 1}, headers=headers)
    while True:
        assert r.status_code == 200, r.text
        ids += [item["id"] for item in r.json()["items"]]
        targets.append(r.links["first"]["url"])
        if "next" not in r.links:
            assert r.json()["next_cursor"] is None
            return ids, targets
        targets.append(r.links["next"]["url"])
        r = client.get(targets[-1], headers=headers)


def _sweep(client: httpx.Client) -> str:
    data = bytes(range(256))
    header = {"layer.weight": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, len(data)]}}
    r = client.post(
        "/v1/models", files=[("files", ("w.safetensors", safetensors_bytes(header, data)))], data={"name": "links"}
    )
    assert r.status_code == 201, r.text
    r = client.post(
        "/v1/sweeps",
        json={
            "model_id": r.json()["id"],
            "evaluation": {"enabled": False},
            "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}],
            "vary": {"steps[0].params.dtype": ["float16"]},
        },
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.mark.integration
def test_embedded_links_ignore_the_host_header(embedded):
    c = embedded.client()
    sid = _sweep(c)
    r = c.post(f"/v1/sweeps/{sid}/link", headers=HOSTILE)
    assert r.status_code == 201, r.text
    url = r.json()["url"]
    assert url.startswith(f"{embedded.service.url}/v1/sweeps/{sid}/view?expires="), url
    assert "evil" not in url
    assert httpx.get(url, timeout=60).status_code == 200
    ids, links = _pages(c, "/v1/sweeps", **HOSTILE)
    assert sid in ids and len(set(ids)) == len(ids) and len(links) == 2 * len(ids) - 1
    assert all(u.startswith(f"{embedded.service.url}/v1/sweeps?limit=1") for u in links), links
    # A model read on SQLite: an ETag, and 304 while the model is as it was.
    model = c.get(f"/v1/sweeps/{sid}").json()["model_id"]
    r = c.get(f"/v1/models/{model}")
    assert r.status_code == 200 and r.headers["etag"].startswith('"')
    again = c.get(f"/v1/models/{model}", headers={"If-None-Match": r.headers["etag"]})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", r.headers["etag"])


@pytest.mark.integration
def test_cluster_links_are_relative_without_a_base_url(cluster_no_worker):
    from modelpress import Client

    key = cluster_no_worker.service.cli("keys", "create", "--tenant", f"links-{uuid.uuid4().hex[:6]}")
    c = cluster_no_worker.client(key)
    sid = _sweep(c)
    try:
        r = c.post(f"/v1/sweeps/{sid}/link", headers=HOSTILE)
        assert r.status_code == 201, r.text
        url = r.json()["url"]
        assert url.startswith(f"/v1/sweeps/{sid}/view?expires="), url
        assert c.get(url, headers={"Authorization": ""}).status_code == 200  # relative to where it was asked
        ids, links = _pages(c, "/v1/sweeps", **HOSTILE)
        assert ids == [sid] and links == ["/v1/sweeps?limit=1"]  # a fresh tenant: one page, no next
        assert c.get("/v1/sweeps", headers=HOSTILE).headers["link"] == '</v1/sweeps>; rel="first"'
        with Client(cluster_no_worker.service.url, key) as mp:
            full = mp.sweep_link(sid)
        parts = urlsplit(full)
        assert (
            f"{parts.scheme}://{parts.netloc}" == cluster_no_worker.service.url
            and parts.path == f"/v1/sweeps/{sid}/view"
        )
    finally:
        for job in c.get(f"/v1/sweeps/{sid}").json().get("points", []):
            c.post(f"/v1/jobs/{job['job_id']}/cancel")  # nothing of this test stays queued

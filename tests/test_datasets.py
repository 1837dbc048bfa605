"""The datasets API: uploads validated and counted, list/get/delete, tenants, refusals that name
the line and leave nothing behind."""

from __future__ import annotations

import hashlib
import json

import pytest

from tests.helpers import stored_files, table_rows, upload_dir, wait_job

pytestmark = pytest.mark.integration


def _jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def _post(c, filename: str, data: bytes, **form):
    return c.post("/v1/datasets", files={"file": (filename, data)}, data=form or None)


TXT = b"the cat sat on the mat\n\n  \na dog ran in the park\r\nthe sun was warm\n"
LABELED = _jsonl(
    {"text": "good day", "label": "pos"}, {"text": "bad day", "label": "neg"}, {"text": "fine", "label": "pos"}
)


def test_upload_counts_and_reads_back(stack):
    c = stack.client()
    r = _post(c, "corpus.txt", TXT)
    assert r.status_code == 201, r.text
    txt = r.json()
    assert set(txt) == {"id", "name", "format", "samples", "labeled", "labels", "size_bytes", "sha256", "created_at"}
    assert (txt["name"], txt["format"], txt["samples"], txt["labeled"], txt["labels"]) == (
        "corpus",
        "txt",
        3,
        False,
        None,
    )
    assert txt["size_bytes"] == len(TXT) and txt["sha256"] == hashlib.sha256(TXT).hexdigest()
    stored = stack.data_dir / "storage" / "datasets" / txt["id"] / "data.txt"
    assert stored.read_bytes() == TXT

    lab = _post(c, "s.jsonl", LABELED, name="sentiment v1").json()
    assert (lab["name"], lab["format"], lab["samples"], lab["labeled"], lab["labels"]) == (
        "sentiment v1",
        "jsonl",
        3,
        True,
        ["neg", "pos"],
    )
    assert (stack.data_dir / "storage" / "datasets" / lab["id"] / "data.jsonl").read_bytes() == LABELED
    ints = _post(
        c, "i.jsonl", _jsonl({"text": "a", "label": 2}, {"text": "b", "label": 0}, {"text": "c", "label": 2})
    ).json()
    assert (ints["labeled"], ints["labels"]) == (True, [0, 2])
    # Some samples without a label: not a labeled dataset, and no label list.
    part = _post(c, "p.jsonl", _jsonl({"text": "a", "label": "x"}, {"text": "b"})).json()
    assert (part["samples"], part["labeled"], part["labels"]) == (2, False, None)
    # A UTF-8 BOM (Windows editors) does not make line 1 invalid.
    bom = _post(c, "bom.jsonl", b"\xef\xbb\xbf" + _jsonl({"text": "x", "label": 1}))
    assert bom.status_code == 201 and bom.json()["samples"] == 1, bom.text

    assert c.get(f"/v1/datasets/{lab['id']}").json() == lab
    ids = [txt["id"], lab["id"], ints["id"], part["id"], bom.json()["id"]]
    seen, cursor = [], None
    while True:
        page = c.get("/v1/datasets", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [d["id"] for d in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    # Newest first; earlier tests of the session may have added others.
    assert [i for i in seen if i in ids] == list(reversed(ids))
    assert c.get("/v1/datasets", params={"cursor": "!!"}).status_code == 422


def test_other_tenants_see_404_exactly_like_missing_ids(stack, tiny):
    a, b = stack.client(), stack.client(stack.other_key)
    ds = _post(a, "mine.txt", TXT).json()
    for method in ("GET", "DELETE"):
        theirs = b.request(method, f"/v1/datasets/{ds['id']}")
        missing = a.request(method, f"/v1/datasets/{'0' * 36}")
        assert theirs.status_code == missing.status_code == 404, theirs.text
        assert theirs.json()["code"] == missing.json()["code"] == "not_found"
        assert theirs.headers["content-type"] == "application/problem+json"
    assert all(d["id"] != ds["id"] for d in b.get("/v1/datasets").json()["items"])
    m = upload_dir(b, tiny["gpt2"]).json()
    r = b.post(
        "/v1/jobs",
        json={
            "model_id": m["id"],
            "dataset_id": ds["id"],
            "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}],
        },
    )
    assert r.status_code == 422 and r.json()["code"] == "unknown_dataset"
    assert a.get(f"/v1/datasets/{ds['id']}").status_code == 200
    assert (
        b.get("/v1/datasets").status_code == 200 and stack.service.client(None).get("/v1/datasets").status_code == 401
    )


def test_delete_keeps_job_history(cluster, tiny):
    c = cluster.client()
    ds = _post(c, "d.txt", TXT).json()
    folder = cluster.data_dir / "storage" / "datasets" / ds["id"]
    assert folder.is_dir()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = wait_job(
        c,
        c.post(
            "/v1/jobs",
            json={
                "model_id": m["id"],
                "dataset_id": ds["id"],
                "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}],
            },
        ).json()["id"],
    )
    assert job["status"] == "succeeded" and job["dataset_id"] == ds["id"]
    assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 204
    assert c.get(f"/v1/datasets/{ds['id']}").status_code == 404
    assert not folder.exists()
    after = c.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "succeeded" and after["dataset_id"] is None
    assert c.get(f"/v1/jobs/{job['id']}/artifact").status_code == 200
    assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 404


def test_delete_while_a_job_waits_is_409(cluster_no_worker, tiny):
    c = cluster_no_worker.client()
    ds = _post(c, "d.txt", TXT).json()
    m = upload_dir(c, tiny["gpt2"]).json()
    job = c.post(
        "/v1/jobs",
        json={
            "model_id": m["id"],
            "eval_dataset_id": ds["id"],
            "steps": [{"method": "quantize.cast", "params": {"dtype": "float16"}}],
        },
    ).json()
    r = c.delete(f"/v1/datasets/{ds['id']}")
    assert r.status_code == 409 and r.json()["code"] == "dataset_in_use"
    assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 204


# (filename, bytes, expected line or None, code)
BAD = {
    "bad_json": ("d.jsonl", _jsonl({"text": "ok"}, "{nope", {"text": "ok"}), 2, "invalid_dataset"),
    "missing_text": ("d.jsonl", _jsonl({"text": "ok"}, {"text": "ok"}, {"label": 1}), 3, "invalid_dataset"),
    "empty_text": ("d.jsonl", _jsonl({"text": "   "}), 1, "invalid_dataset"),
    "not_an_object": ("d.jsonl", _jsonl({"text": "ok"}, "[1, 2]"), 2, "invalid_dataset"),
    "non_utf8_jsonl": ("d.jsonl", _jsonl({"text": "ok"}) + b'{"text": "caf\xe9"}\n', 2, "invalid_dataset"),
    "non_utf8_txt": ("d.txt", b"fine\nalso fine\n\xff\xfe broken\n", 3, "invalid_dataset"),
    "nul_byte": ("d.txt", b"fine\nnul\x00here\n", 2, "invalid_dataset"),
    "label_list": (
        "d.jsonl",
        _jsonl({"text": "a", "label": 1}, {"text": "b", "label": 2}, {"text": "c", "label": [1]}),
        3,
        "invalid_dataset",
    ),
    "label_bool": ("d.jsonl", _jsonl({"text": "a", "label": True}), 1, "invalid_dataset"),
    "label_float": ("d.jsonl", _jsonl({"text": "a", "label": 0.5}), 1, "invalid_dataset"),
    "labels_mixed_types": (
        "d.jsonl",
        _jsonl({"text": "a", "label": 1}, {"text": "b", "label": "1"}),
        2,
        "invalid_dataset",
    ),
    "line_too_long": ("d.txt", b"short\n" + b"x" * (1024 * 1024 + 10) + b"\n", 2, "invalid_dataset"),
    "wrong_extension": ("d.csv", b"text,label\nhello,1\n", None, "unsupported_file_type"),
    "no_extension": ("data", b"hello\n", None, "unsupported_file_type"),
    "empty": ("d.txt", b"\n\n   \n", None, "empty_dataset"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_uploads_name_the_line_and_leave_nothing(cluster, case):
    c = cluster.client()
    name, data, line, code = BAD[case]
    rows, files = table_rows(cluster, "datasets"), set(stored_files(cluster))
    r = _post(c, name, data)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code and body["status"] == 422 and body["type"] == f"/problems/{code}"
    assert body["errors"][0]["loc"] == ["body", "file"]
    if line is not None:
        assert body["errors"][0]["line"] == line
        assert f"line {line}:" in body["detail"]
    assert table_rows(cluster, "datasets") == rows
    assert set(stored_files(cluster)) == files


def test_malformed_requests_leave_nothing(cluster):
    c = cluster.client()
    rows, files = table_rows(cluster, "datasets"), set(stored_files(cluster))
    cases = [
        (c.post("/v1/datasets", files=[("files", ("d.txt", b"a\n"))]), 422, "unexpected_part"),
        (
            c.post("/v1/datasets", files=[("file", ("a.txt", b"a\n")), ("file", ("b.txt", b"b\n"))]),
            422,
            "unexpected_part",
        ),
        (
            c.post("/v1/datasets", data={"name": "only a name"}, files=[("other", ("x.txt", b""))]),
            422,
            "unexpected_part",
        ),
        (_post(c, "d.txt", b"a\n", name="bad/name"), 422, "invalid_name"),
        # JSON is the body that names a finished upload (/v1/uploads): checked as such.
        (c.post("/v1/datasets", json={"file": "a"}), 422, "validation_error"),
        (c.post("/v1/datasets", content=b"a", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type"),
    ]
    for r, status, code in cases:
        assert r.status_code == status and r.json()["code"] == code, r.text
    assert table_rows(cluster, "datasets") == rows
    assert set(stored_files(cluster)) == files


def test_upload_over_the_size_limit_is_413_and_leaves_nothing(cluster):
    c = cluster.client()
    rows, files = table_rows(cluster, "datasets"), set(stored_files(cluster))
    line = b"the cat sat on the mat\n"
    big = line * (25 * 1024 * 1024 // len(line) + 1)  # the cluster stack's limit is 24 MiB
    r = _post(c, "big.txt", big)
    assert r.status_code == 413 and r.json()["code"] == "payload_too_large", r.text
    assert table_rows(cluster, "datasets") == rows
    assert set(stored_files(cluster)) == files

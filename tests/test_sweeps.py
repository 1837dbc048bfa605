"""Sweeps: the Pareto frontier (pure), Accept negotiation, grid validation (all points or none),
and one small sweep end to end in embedded mode (SQLite, SQLAlchemy transport, worker subprocess)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from app.negotiation import HTML_HEADERS, prefers_html
from app.sweeps.pareto import dominates, non_dominated, sweep_frontier
from app.sweeps.schemas import MAX_POINTS, MAX_VARY_PATHS, Counts
from app.sweeps.service import grid, point_metrics, sweep_status
from tests.helpers import table_rows, upload_dir, wait_job

PRUNE = {"method": "prune.magnitude", "params": {"sparsity": 0.5}}
SPARSITY = "steps[0].params.sparsity"
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
AXIS_KEYS = {"size": "artifact_bytes", "latency": "latency_ms", "quality": "quality"}


# --- pareto, pure --------------------------------------------------------------------------------


def _pt(index, size=None, latency=None, quality=None, metric="perplexity", hib=False, status="succeeded", speedup=1.5):
    metrics = {
        "artifact_bytes": size,
        "latency_ms": latency,
        "quality": quality,
        "speedup": speedup if latency is not None else None,
        "quality_metric": metric if quality is not None else None,
        "higher_is_better": hib if quality is not None else None,
    }
    return {"index": index, "status": status, "metrics": metrics}


@pytest.mark.unit
def test_dominates_needs_no_worse_everywhere_and_better_somewhere():
    assert dominates([1, 1], [2, 2], [True, True])
    assert dominates([1, 2], [2, 2], [True, True])
    assert not dominates([2, 2], [2, 2], [True, True]), "a tie dominates nothing"
    assert not dominates([1, 3], [2, 2], [True, True]), "better on one axis, worse on another"
    assert dominates([1, 3], [1, 2], [True, False]), "higher is better on the second axis"
    assert not dominates([1, 2], [1, 3], [True, False])
    with pytest.raises(ValueError):
        dominates([1, 2], [1], [True, True])


@pytest.mark.unit
def test_non_dominated_basics():
    assert non_dominated([], [True]) == []
    assert non_dominated([[5.0]], [True]) == [0], "a single point is the frontier"
    assert non_dominated([[3], [1], [2]], [True]) == [1]
    assert non_dominated([[3], [1], [2]], [False]) == [0]
    # Trade-off between the axes: all three are on the frontier; the fourth is beaten by [2, 2].
    assert non_dominated([[1, 3], [2, 2], [3, 1], [3, 3]], [True, True]) == [0, 1, 2]
    with pytest.raises(ValueError):
        non_dominated([[1, 2], [1]], [True, True])


@pytest.mark.unit
def test_non_dominated_ties():
    # Identical points do not dominate each other: both stay.
    assert non_dominated([[1, 1], [1, 1], [2, 2]], [True, True]) == [0, 1]
    # A tie on one axis and better on the other dominates.
    assert non_dominated([[1, 1], [1, 2]], [True, True]) == [0]
    assert non_dominated([[1, 1], [1, 2]], [True, False]) == [1], "higher is better on the second axis"
    # Zero axes: nothing is better than anything.
    assert non_dominated([[], []], []) == [0, 1]


@pytest.mark.unit
def test_sweep_frontier_three_axes_and_direction():
    pts = [_pt(0, 100, 5.0, 50.0), _pt(1, 80, 5.0, 60.0), _pt(2, 80, 6.0, 70.0), _pt(3, 120, 4.0, 55.0)]
    f = sweep_frontier(pts)
    assert f.axes == {
        "size": "artifact_bytes (lower is better)",
        "latency": "latency_ms (lower is better)",
        "quality": "perplexity (lower is better)",
    }
    assert f.indices == [0, 1, 3], "2 is beaten by 1 (same size, faster, lower perplexity)"
    # The same numbers as accuracy (higher is better) turn the quality axis around.
    acc = [
        _pt(
            p["index"],
            p["metrics"]["artifact_bytes"],
            p["metrics"]["latency_ms"],
            p["metrics"]["quality"],
            metric="accuracy",
            hib=True,
        )
        for p in pts
    ]
    f = sweep_frontier(acc)
    assert f.axes["quality"] == "accuracy (higher is better)"
    assert f.indices == [1, 2, 3], "0 is beaten by 1 (smaller, as fast, more accurate)"


@pytest.mark.unit
def test_sweep_frontier_single_point_and_ties():
    f = sweep_frontier([_pt(7, 10, 1.0, 3.0)])
    assert f.indices == [7] and set(f.axes) == {"size", "latency", "quality"}
    f = sweep_frontier([_pt(0, 10, 1.0, 3.0), _pt(1, 10, 1.0, 3.0), _pt(2, 11, 1.0, 3.0)])
    assert f.indices == [0, 1]


@pytest.mark.unit
def test_sweep_frontier_leaves_out_points_without_metrics():
    pts = [
        _pt(0, 100, 5.0, 50.0),
        _pt(1, 90, 6.0, 50.0),
        {"index": 2, "status": "failed", "metrics": None},
        {"index": 3, "status": "running", "metrics": None},
    ]
    f = sweep_frontier(pts)
    assert f.indices == [0, 1]
    assert "2 (failed)" in f.note
    assert "3 (running)" in f.note
    # A succeeded point measured on none of the axes is left out, not allowed to drop them all.
    f = sweep_frontier([_pt(0, 100), _pt(1, 90), _pt(2)])
    assert f.indices == [1] and f.axes == {"size": "artifact_bytes (lower is better)"}
    assert "none of the axes: point 2" in f.note


@pytest.mark.unit
def test_sweep_frontier_missing_axes_are_dropped_and_said():
    # Point 1 has no latency: the frontier uses size and quality only.
    pts = [_pt(0, 100, 1.0, 50.0), _pt(1, 100, None, 40.0), _pt(2, 90, 9.0, 60.0)]
    f = sweep_frontier(pts)
    assert set(f.axes) == {"size", "quality"}
    assert f.indices == [1, 2], "without latency, 0 is beaten by 1 (same size, lower perplexity)"
    assert "The latency axis is left out: point 1 has no latency_ms." in f.note
    # No quality anywhere: size and latency.
    f = sweep_frontier([_pt(0, 100, 1.0), _pt(1, 90, 2.0), _pt(2, 95, 2.0)])
    assert set(f.axes) == {"size", "latency"} and f.indices == [0, 1]
    assert (
        "no point has a quality score" in f.note and "3 points compared on size, latency; 2 on the frontier" in f.note
    )


@pytest.mark.unit
def test_sweep_frontier_drops_latency_when_no_point_claims_a_speed_up():
    pts = [_pt(0, 100, 5.0, 10.0, speedup=None), _pt(1, 200, 4.0, 10.0, speedup=None)]
    f = sweep_frontier(pts)
    # On latency alone point 1 would stay; without a claimed speed-up that 1 ms is noise.
    assert set(f.axes) == {"size", "quality"} and f.indices == [0]
    assert "no point claims a speed-up" in f.note
    f = sweep_frontier([_pt(0, 100, 5.0, 10.0, speedup=None), _pt(1, 200, 4.0, 10.0, speedup=1.2)])
    assert set(f.axes) == {"size", "latency", "quality"} and f.indices == [0, 1]


@pytest.mark.unit
def test_sweep_frontier_quality_dropped_when_points_disagree():
    f = sweep_frontier([_pt(0, 100, 1.0, 50.0, metric="perplexity"), _pt(1, 90, 2.0, 0.9, metric="accuracy", hib=True)])
    assert "quality" not in f.axes and "different metrics" in f.note
    assert f.indices == [0, 1]
    f = sweep_frontier([_pt(0, 100, 1.0, 50.0, hib=False), _pt(1, 90, 2.0, 40.0, hib=None)])
    assert "quality" not in f.axes and "higher is better" in f.note


@pytest.mark.unit
def test_sweep_frontier_without_candidates_or_common_axis():
    f = sweep_frontier([{"index": 0, "status": "queued", "metrics": None}])
    assert f.indices == [] and f.axes == {} and "no frontier" in f.note
    f = sweep_frontier([_pt(0, 100), _pt(1, None, 3.0)])
    assert f.indices == [] and f.axes == {} and "No axis" in f.note
    # NaN and infinities are not numbers to compare.
    f = sweep_frontier([_pt(0, 100, float("nan")), _pt(1, 90, float("inf"))])
    assert f.axes == {"size": "artifact_bytes (lower is better)"} and f.indices == [1]


@pytest.mark.unit
def test_point_metrics_are_read_defensively():
    full = {
        "size": {"artifact_bytes": 500000, "compression_ratio": 2.0},
        "speed": {"compressed": {"median_ms": 5.0}, "original": {"median_ms": 7.0}, "speedup": 1.4},
        "quality": {"metric": "perplexity", "original": 40.0, "compressed": 50.0, "higher_is_better": False},
        "fidelity": {"kl_mean": 0.01, "top1_agreement": 0.98},
        "sparsity": {"sparsity": 0.3},
    }
    assert point_metrics(full).model_dump() == {
        "artifact_bytes": 500000,
        "compression_ratio": 2.0,
        "latency_ms": 5.0,
        "speedup": 1.4,
        "quality_metric": "perplexity",
        "quality": 50.0,
        "higher_is_better": False,
        "kl_mean": 0.01,
        "top1_agreement": 0.98,
        "sparsity": 0.3,
    }
    empty = dict.fromkeys(point_metrics(full).model_dump())
    assert point_metrics(None).model_dump() == empty
    assert point_metrics("nope").model_dump() == empty
    odd = {
        "size": {"artifact_bytes": "big"},
        "speed": {"available": False, "reason": "no torch"},
        "quality": {"available": False, "reason": "no tokenizer", "metric": "perplexity", "compressed": 3.0},
        "fidelity": [1, 2],
        "sparsity": {"sparsity": True},
    }
    assert point_metrics(odd).model_dump() == empty


@pytest.mark.unit
def test_sweep_status_rules():
    assert sweep_status(Counts(queued=3)) == "queued"
    assert sweep_status(Counts(queued=2, succeeded=1)) == "running"
    assert sweep_status(Counts(running=1, failed=2)) == "running"
    assert sweep_status(Counts(succeeded=3)) == "succeeded"
    assert sweep_status(Counts(failed=2, canceled=1)) == "failed"
    assert sweep_status(Counts(succeeded=1, failed=1)) == "partial"
    assert sweep_status(Counts(succeeded=1, canceled=1)) == "partial"
    assert sweep_status(Counts(canceled=3)) == "canceled"


@pytest.mark.unit
def test_grid_is_the_cartesian_product_in_order():
    assert grid({"a": [1, 2], "b": ["x", "y", "z"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 1, "b": "z"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
        {"a": 2, "b": "z"},
    ]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (None, False),
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("text/html", True),
        (BROWSER_ACCEPT, True),
        ("application/json, text/html", False),
        ("text/html, application/json;q=0.9", True),
        ("text/html;q=0.5, */*", False),
        ("text/html;q=0", False),
        ("text/html;q=bogus, application/json;q=0.2", False),
    ],
)
def test_accept_negotiation(accept, html):
    """The rule GET /v1/sweeps/{id} answers by (app.negotiation, shared with the job reports)."""
    assert prefers_html(accept) is html


# --- the API ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict:
    from tests.tokenizer_util import build_models

    # With their tokenizers: the reports have perplexity, so the frontier has all three axes.
    return build_models(tmp_path_factory.mktemp("sweep-models"))


def _uploaded(embedded, path, name: str) -> str:
    r = upload_dir(embedded.client(), path, name=name)
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture(scope="module")
def gpt2(embedded, tiny_models) -> str:
    return _uploaded(embedded, tiny_models["gpt2"], "tiny-gpt2")


def _sweep(model_id, vary, steps=None, **extra):
    return {"model_id": model_id, "steps": steps or [PRUNE], "vary": vary, **extra}


@pytest.mark.integration
@pytest.mark.parametrize(
    ("vary", "steps", "code", "loc"),
    [
        ({"steps[0].sparsity": [0.3]}, None, "invalid_vary", ["body", "vary", "steps[0].sparsity"]),
        ({"steps[00].params.sparsity": [0.3]}, None, "invalid_vary", ["body", "vary", "steps[00].params.sparsity"]),
        ({"steps[1].params.sparsity": [0.3]}, None, "invalid_vary", ["body", "vary", "steps[1].params.sparsity"]),
        ({SPARSITY: [0.3, 0.3]}, None, "invalid_vary", ["body", "vary", SPARSITY, 1]),
        # NaN is not JSON: the strict loader of request bodies (app/http_limits.py) refuses it first.
        ({SPARSITY: [0.3, float("nan")]}, None, "json_non_finite_number", ["body", "vary", SPARSITY, 1]),
        (
            {"steps[123456789].params.sparsity": [0.3]},
            None,
            "invalid_vary",
            ["body", "vary", "steps[123456789].params.sparsity"],
        ),
        ({SPARSITY: []}, None, "validation_error", ["body", "vary", SPARSITY]),
        ({}, None, "validation_error", ["body", "vary"]),
        (
            {f"steps[{i}].params.sparsity": [0.1] for i in range(MAX_VARY_PATHS + 1)},
            [PRUNE] * (MAX_VARY_PATHS + 1),
            "validation_error",
            ["body", "vary"],
        ),
        (
            {SPARSITY: [i / 100 for i in range(1, 9)], "steps[1].params.sparsity": [i / 100 for i in range(1, 10)]},
            [PRUNE, PRUNE],
            "too_many_points",
            ["body", "vary"],
        ),
    ],
)
def test_invalid_vary_is_a_422_and_records_nothing(embedded, gpt2, vary, steps, code, loc):
    c = embedded.client()
    before = table_rows(embedded, "sweeps"), table_rows(embedded, "jobs")
    # json.dumps, not httpx's encoder: it writes NaN the way some clients do.
    r = c.post(
        "/v1/sweeps", content=json.dumps(_sweep(gpt2, vary, steps)), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    body = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert body["code"] == code, body
    assert loc in [e["loc"] for e in body["errors"]], body
    assert (table_rows(embedded, "sweeps"), table_rows(embedded, "jobs")) == before


@pytest.mark.integration
def test_too_many_points_names_the_limit(embedded, gpt2):
    vary = {SPARSITY: [i / 100 for i in range(1, 9)], "steps[1].params.sparsity": [i / 100 for i in range(1, 10)]}
    r = embedded.client().post("/v1/sweeps", json=_sweep(gpt2, vary, [PRUNE, PRUNE]))
    assert "72 points" in r.json()["detail"] and str(MAX_POINTS) in r.json()["detail"]


@pytest.mark.integration
def test_one_invalid_point_refuses_the_whole_sweep(embedded, gpt2):
    c = embedded.client()
    before = table_rows(embedded, "sweeps"), table_rows(embedded, "jobs")
    r = c.post("/v1/sweeps", json=_sweep(gpt2, {SPARSITY: [0.3, 1.5, 0.7]}, name="bad"))
    assert r.status_code == 422, r.text
    body = r.json()
    assert "point 1" in body["detail"] and f"{SPARSITY}=1.5" in body["detail"], body["detail"]
    err = body["errors"][0]
    assert err["loc"] == ["body", "vary", SPARSITY, 1] and err["point"] == 1, err
    assert (table_rows(embedded, "sweeps"), table_rows(embedded, "jobs")) == before
    # A parameter the method does not know, on the second of two varied paths.
    r = c.post("/v1/sweeps", json=_sweep(gpt2, {SPARSITY: [0.3], "steps[0].params.bogus": [1, 2]}))
    assert r.status_code == 422 and "point 0" in r.json()["detail"], r.text
    assert r.json()["errors"][0]["loc"] == ["body", "vary", "steps[0].params.bogus", 0]
    # Not about a point: answered as for a job.
    r = c.post("/v1/sweeps", json=_sweep("0" * 36, {SPARSITY: [0.3]}))
    assert r.status_code == 422 and r.json()["code"] == "unknown_model"
    r = c.post("/v1/sweeps", json=_sweep(gpt2, {SPARSITY: [0.3]}, dataset_id="0" * 36))
    assert r.status_code == 422 and r.json()["code"] == "unknown_dataset" and "point" not in r.json()["detail"]
    assert (table_rows(embedded, "sweeps"), table_rows(embedded, "jobs")) == before


@pytest.mark.integration
def test_sweep_routes_are_in_openapi(embedded):
    paths = embedded.client().get("/openapi.json").json()["paths"]
    assert set(paths["/v1/sweeps"]) == {"get", "post"}
    assert "422" in paths["/v1/sweeps"]["post"]["responses"]
    assert "text/html" in paths["/v1/sweeps/{sweep_id}"]["get"]["responses"]["200"]["content"]
    assert "410" in paths["/v1/sweeps/{sweep_id}/view"]["get"]["responses"]
    assert "201" in paths["/v1/sweeps/{sweep_id}/link"]["post"]["responses"]


@pytest.fixture(scope="module")
def llama(embedded, tiny_models) -> str:
    return _uploaded(embedded, tiny_models["llama"], "tiny-llama")


@pytest.mark.integration
@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        ({"vary": {"recipe": ["w8"]}, "steps": [PRUNE]}, ["body", "steps"], "leave out steps"),
        ({"vary": {"recipe": ["w8"]}, "recipe": "w8"}, ["body", "recipe"], "leave out recipe"),
        ({"vary": {"recipe": ["w8"], SPARSITY: [0.5]}}, ["body", "vary", SPARSITY], "cannot also vary"),
        ({"vary": {"recipe": ["w8", "w9"]}}, ["body", "vary", "recipe", 1], "unknown recipe 'w9'"),
        ({"vary": {"recipe": ["w8", 8]}}, ["body", "vary", "recipe", 1], "named by a string"),
        ({"vary": {"recipe": ["w8", "w8"]}}, ["body", "vary", "recipe", 1], "listed twice"),
        ({"vary": {SPARSITY: [0.5]}}, ["body", "steps"], "give steps, a recipe, or vary the recipe"),
        ({"vary": {SPARSITY: [0.5]}, "steps": [PRUNE], "recipe": "w8"}, ["body", "steps"], "not both"),
        ({"vary": {SPARSITY: [0.5]}, "recipe": "nope"}, ["body", "recipe"], "unknown recipe 'nope'"),
        ({"vary": {"steps[1].params.bits": [4]}, "recipe": "w8"}, None, "recipe 'w8' has 1 step"),
    ],
)
def test_recipe_sweeps_refused_with_the_reason_and_nothing_recorded(embedded, llama, body, loc, words):
    c = embedded.client()
    before = table_rows(embedded, "sweeps"), table_rows(embedded, "jobs")
    r = c.post("/v1/sweeps", json={"model_id": llama, **body})
    assert r.status_code == 422, r.text
    problem = r.json()
    assert words in problem["detail"] + " ".join(e["msg"] for e in problem["errors"]), problem
    if loc is not None:
        assert loc in [e["loc"] for e in problem["errors"]], problem
    assert (table_rows(embedded, "sweeps"), table_rows(embedded, "jobs")) == before


@pytest.mark.integration
def test_a_sweep_compares_recipes_and_varies_a_recipes_steps(embedded, llama):
    from modelpress import Client

    c = embedded.client()
    off = {"enabled": False}
    # One point per recipe, each its recipe's job.
    with Client(embedded.service.url, embedded.key, timeout=60) as sdk:
        made = sdk.sweep(llama, vary={"recipe": ["w4-fast", "w8"]}, name="which", evaluation=off)
    sweep = c.get(f"/v1/sweeps/{made.id}").json()
    assert sweep["spec"]["steps"] == [] and sweep["spec"]["recipe"] is None
    assert [p["values"] for p in sweep["points"]] == [{"recipe": "w4-fast"}, {"recipe": "w8"}]
    for p in sweep["points"]:
        job = wait_job(c, p["job_id"])
        assert job["status"] == "succeeded", job
        assert (
            job["recipe"] == p["values"]["recipe"] and job["name"] == f'which [{p["index"]}] recipe="{job["recipe"]}"'
        )
        bits = {"w4-fast": 4, "w8": 8}[job["recipe"]]
        assert [(s["method"], s["params"]["bits"]) for s in job["steps"]] == [("quantize.weight_only", bits)]
    done = c.get(f"/v1/sweeps/{made.id}").json()
    assert done["status"] == "succeeded"
    a, b = (p["metrics"]["artifact_bytes"] for p in done["points"])
    assert a < b  # 4-bit is smaller than 8-bit

    # A fixed recipe whose steps a point changes: the points are given as steps.
    r = c.post(
        "/v1/sweeps",
        json={
            "model_id": llama,
            "recipe": "w4-fast",
            "vary": {"steps[0].params.group_size": [32, 64]},
            "evaluation": off,
        },
    )
    assert r.status_code == 202, r.text
    sweep = r.json()
    assert sweep["spec"]["recipe"] == "w4-fast" and sweep["spec"]["steps"][0]["method"] == "quantize.weight_only"
    for p in sweep["points"]:
        job = wait_job(c, p["job_id"])
        assert job["status"] == "succeeded", job
        assert job["recipe"] is None and job["name"].startswith(f"w4-fast [{p['index']}]")
        assert job["steps"][0]["params"]["group_size"] == p["values"]["steps[0].params.group_size"]
        assert job["steps"][0]["params"]["bits"] == 4


@pytest.fixture(scope="module")
def finished_sweep(embedded, gpt2) -> dict:
    """One sweep of prune.magnitude over three sparsities on the tiny GPT-2, run to the end."""
    c = embedded.client()
    evaluation = {"seq_len": 16, "runs": 1, "warmup": 0, "max_samples": 4}
    r = c.post("/v1/sweeps", json=_sweep(gpt2, {SPARSITY: [0.3, 0.5, 0.7]}, name="tiny", evaluation=evaluation))
    assert r.status_code == 202, r.text
    sweep = r.json()
    assert r.headers["location"] == f"/v1/sweeps/{sweep['id']}"
    assert sweep["status"] == "queued" and sweep["counts"]["queued"] == 3
    assert [p["values"] for p in sweep["points"]] == [{SPARSITY: v} for v in (0.3, 0.5, 0.7)]
    assert sweep["spec"]["vary"] == {SPARSITY: [0.3, 0.5, 0.7]} and sweep["spec"]["evaluation"]["seq_len"] == 16
    for p in sweep["points"]:
        job = c.get(f"/v1/jobs/{p['job_id']}").json()
        assert job["sweep_id"] == sweep["id"]
        assert job["steps"][0]["params"]["sparsity"] == p["values"][SPARSITY]
        assert job["name"] == f"tiny [{p['index']}] {SPARSITY}={p['values'][SPARSITY]}"
        assert job["evaluation"]["seq_len"] == 16
    for p in sweep["points"]:
        wait_job(c, p["job_id"])
    return c.get(f"/v1/sweeps/{sweep['id']}").json()


@pytest.mark.integration
def test_sweep_end_to_end(embedded, finished_sweep):
    s = finished_sweep
    assert s["status"] == "succeeded", s
    assert s["counts"] == {"queued": 0, "running": 0, "succeeded": 3, "failed": 0, "canceled": 0}
    assert [p["index"] for p in s["points"]] == [0, 1, 2]
    for p in s["points"]:
        assert p["status"] == "succeeded" and p["error"] is None
        assert p["metrics"]["sparsity"] == pytest.approx(p["values"][SPARSITY], abs=0.005)
    sizes = [p["metrics"]["artifact_bytes"] for p in s["points"]]
    # Weight files are stored, not deflated (docs/STREAMING.md): zeros in dense fp32 weights do
    # not shrink the artifact, so every point has the same size and quality decides the frontier.
    assert sizes[0] == sizes[1] == sizes[2], sizes

    # The frontier is what pareto computes over the axes the report names.
    # Unstructured pruning keeps the shapes: no speed-up is claimed, so latency is no axis.
    assert (
        s["frontier"]
        and set(s["frontier_axes"]) == {"size", "quality"}
        and "latency axis is left out" in s["frontier_note"]
    )
    assert all(p["metrics"]["speedup"] is None and p["metrics"]["latency_ms"] > 0 for p in s["points"])
    assert all(p["metrics"]["quality_metric"] == "perplexity" and p["metrics"]["kl_mean"] > 0 for p in s["points"])
    candidates = [p for p in s["points"] if p["metrics"]]
    keys = [AXIS_KEYS[a] for a in s["frontier_axes"]]
    minimize = [d.endswith("(lower is better)") for d in s["frontier_axes"].values()]
    expect = [
        candidates[i]["index"] for i in non_dominated([[p["metrics"][k] for k in keys] for p in candidates], minimize)
    ]
    assert s["frontier"] == expect
    assert [p["index"] for p in s["points"] if p["on_frontier"]] == s["frontier"]
    # The smallest artifact cannot be beaten on size: one of those that size is on the frontier.
    assert any(sizes[i] == min(sizes) for i in s["frontier"])

    listed = embedded.client().get("/v1/sweeps", params={"limit": 200}).json()
    mine = next(x for x in listed["items"] if x["id"] == s["id"])
    assert mine["status"] == "succeeded" and mine["points"] == 3 and mine["counts"]["succeeded"] == 3


@pytest.mark.integration
def test_sweep_delete_takes_its_jobs(embedded, gpt2):
    c = embedded.client()
    r = c.post("/v1/sweeps", json=_sweep(gpt2, {SPARSITY: [0.2, 0.4]}, evaluation={"enabled": False}))
    assert r.status_code == 202, r.text
    sweep = r.json()
    job_ids = [p["job_id"] for p in sweep["points"]]
    r = c.delete(f"/v1/jobs/{job_ids[0]}")  # a point goes only with its sweep
    assert r.status_code == 409 and r.json()["code"] == "job_in_sweep", r.text
    assert all(wait_job(c, j)["status"] == "succeeded" for j in job_ids)
    artifacts = [embedded.data_dir / "storage" / "artifacts" / j for j in job_ids]
    assert all(a.is_dir() for a in artifacts)
    assert embedded.client(embedded.other_key).delete(f"/v1/sweeps/{sweep['id']}").status_code == 404
    assert c.delete(f"/v1/sweeps/{sweep['id']}").status_code == 204
    assert c.get(f"/v1/sweeps/{sweep['id']}").status_code == 404
    assert all(c.get(f"/v1/jobs/{j}").status_code == 404 for j in job_ids)
    assert not any(a.exists() for a in artifacts)
    assert c.delete(f"/v1/sweeps/{sweep['id']}").status_code == 404


@pytest.mark.integration
def test_sweeps_list_pages_newest_first(embedded, gpt2):
    a, other = embedded.client(), embedded.client(embedded.other_key)
    ids = []
    for sparsity in (0.11, 0.12, 0.13):
        r = a.post("/v1/sweeps", json=_sweep(gpt2, {SPARSITY: [sparsity]}, evaluation={"enabled": False}))
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
        a.post(f"/v1/jobs/{r.json()['points'][0]['job_id']}/cancel")  # only the listing matters here
    first = a.get("/v1/sweeps", params={"limit": 2}).json()
    assert [x["id"] for x in first["items"]] == ids[::-1][:2] and first["next_cursor"]
    second = a.get("/v1/sweeps", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert second["items"][0]["id"] == ids[0]
    assert a.get("/v1/sweeps", params={"cursor": "!!"}).status_code == 422
    assert all(x["id"] not in ids for x in other.get("/v1/sweeps").json()["items"])


@pytest.mark.integration
def test_other_tenant_gets_404_like_a_missing_id(embedded, finished_sweep):
    a, b = embedded.client(), embedded.client(embedded.other_key)
    sid = finished_sweep["id"]
    for method, path in (("GET", f"/v1/sweeps/{sid}"), ("POST", f"/v1/sweeps/{sid}/link")):
        theirs = b.request(method, path)
        missing = a.request(method, path.replace(sid, "0" * 36))
        assert theirs.status_code == missing.status_code == 404, (path, theirs.text)
        assert theirs.json()["code"] == missing.json()["code"] == "not_found"
        assert theirs.json()["detail"].replace(sid, "0" * 36) == missing.json()["detail"]
    assert embedded.client(None).get(f"/v1/sweeps/{sid}").status_code == 401


@pytest.mark.integration
def test_json_unless_html_is_preferred(embedded, finished_sweep):
    c = embedded.client()
    for accept in ("*/*", "application/json", "application/json, text/html"):
        r = c.get(f"/v1/sweeps/{finished_sweep['id']}", headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json", accept
        assert r.json()["id"] == finished_sweep["id"] and "accept" in r.headers["vary"].lower()


def _link(client, sweep_id, **body):
    r = client.post(f"/v1/sweeps/{sweep_id}/link", json=body or None)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.integration
def test_link_ttl_and_tampering(embedded, finished_sweep):
    c, anon = embedded.client(), embedded.client(None)
    sid = finished_sweep["id"]
    link = _link(c, sid)
    url = urlsplit(link["url"])
    assert f"{url.scheme}://{url.netloc}" == embedded.service.url and url.path == f"/v1/sweeps/{sid}/view"
    q = {k: v[0] for k, v in parse_qs(url.query).items()}
    ttl = int(q["expires"]) - time.time()
    assert 880 < ttl <= 900, "the default MODELPRESS_REPORT_LINK_TTL_S"
    assert _link(c, sid, ttl_s=60)["url"] != link["url"]
    for bad in (0, 604801, "x"):
        assert c.post(f"/v1/sweeps/{sid}/link", json={"ttl_s": bad}).status_code == 422
    assert c.post(f"/v1/sweeps/{sid}/link", json={"nope": 1}).status_code == 422

    view = f"/v1/sweeps/{sid}/view"
    sig = q["signature"]
    tampered = ("0" if sig[0] != "0" else "1") + sig[1:]
    for params in (
        {"expires": q["expires"], "signature": tampered},
        {"expires": int(q["expires"]) + 1, "signature": sig},
        {"expires": q["expires"]},
        {},
    ):
        r = anon.get(view, params=params)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (params, r.text)
    # The signature of one sweep opens no other.
    assert anon.get(f"/v1/sweeps/{'0' * 36}/view", params=q).status_code == 404
    # A link that was really issued but has expired: 410, so the reader asks for a new one.
    key = (embedded.data_dir / "secret_key").read_text().strip().encode()
    past = int(time.time()) - 10
    old = hmac.new(key, f"sweep:{sid}:{past}".encode(), hashlib.sha256).hexdigest()
    r = anon.get(view, params={"expires": past, "signature": old})
    assert r.status_code == 410 and r.json()["code"] == "link_expired"


# These render through app.reports.html (the HTML report module).


@pytest.mark.integration
def test_html_page_for_a_browser(embedded, finished_sweep):
    r = embedded.client().get(f"/v1/sweeps/{finished_sweep['id']}", headers={"Accept": BROWSER_ACCEPT})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == HTML_HEADERS["Content-Security-Policy"]
    assert r.headers["cache-control"] == "no-store"
    assert "<html" in r.text.lower()


@pytest.mark.integration
def test_signed_link_opens_the_page_without_a_key(embedded, finished_sweep):
    link = _link(embedded.client(), finished_sweep["id"])
    import httpx

    r = httpx.get(link["url"], timeout=60)  # no Authorization header at all
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == HTML_HEADERS["Content-Security-Policy"]
    assert r.headers["cache-control"] == "no-store"


@pytest.mark.integration
def test_sweep_on_postgres_all_or_nothing(cluster, tiny):
    """The same contract on PostgreSQL: the points map back to their jobs, a bad point records nothing."""
    c = cluster.client()
    model = upload_dir(c, tiny["gpt2"]).json()["id"]
    before = table_rows(cluster, "sweeps"), table_rows(cluster, "jobs")
    vary = {SPARSITY: [0.1, 0.2], "steps[0].params.scope": ["global", "nope"]}
    r = c.post("/v1/sweeps", json=_sweep(model, vary))
    assert r.status_code == 422 and "point 1" in r.json()["detail"], r.text
    assert r.json()["errors"][0]["loc"] == ["body", "vary", "steps[0].params.scope", 1]
    assert (table_rows(cluster, "sweeps"), table_rows(cluster, "jobs")) == before

    vary = {SPARSITY: [0.1, 0.2], "steps[0].params.scope": ["global", "layer"]}
    r = c.post("/v1/sweeps", json=_sweep(model, vary, evaluation={"enabled": False}))
    assert r.status_code == 202, r.text
    got = c.get(f"/v1/sweeps/{r.json()['id']}").json()
    for p in got["points"]:
        c.post(f"/v1/jobs/{p['job_id']}/cancel")  # the listing below is all this test needs of them
    assert [p["values"] for p in got["points"]] == [
        {SPARSITY: 0.1, "steps[0].params.scope": "global"},
        {SPARSITY: 0.1, "steps[0].params.scope": "layer"},
        {SPARSITY: 0.2, "steps[0].params.scope": "global"},
        {SPARSITY: 0.2, "steps[0].params.scope": "layer"},
    ]
    assert len({p["job_id"] for p in got["points"]}) == 4 and None not in {p["job_id"] for p in got["points"]}
    for p in got["points"]:
        job = c.get(f"/v1/jobs/{p['job_id']}").json()
        assert job["steps"][0]["params"]["sparsity"] == p["values"][SPARSITY]
        assert job["steps"][0]["params"]["scope"] == p["values"]["steps[0].params.scope"]
    assert (table_rows(cluster, "sweeps"), table_rows(cluster, "jobs")) == (before[0] + 1, before[1] + 4)
    assert cluster.client(cluster.other_key).get(f"/v1/sweeps/{got['id']}").status_code == 404

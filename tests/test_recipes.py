"""Named recipes (issue 22 item 5): every recipe is a valid job, one recommended per target; a job
names one instead of steps through the API, the SDK and the CLI, and is refused as its steps
would be; GET /v1/recipes and GET /v1/methods list them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from core import recipes
from core.jobs.schemas import JobIn
from core.methods import load_all, validate_steps


@pytest.mark.unit
def test_every_recipe_is_a_valid_job_and_each_target_has_one_recommended() -> None:
    registry = load_all()
    for r in recipes.RECIPES.values():
        assert r.target in recipes.TARGETS, r
        steps = validate_steps(r.expand())
        assert [s["method"] for s in steps] == r.methods() and all(m in registry for m in r.methods())
    for target in recipes.TARGETS:
        assert [r.name for r in recipes.RECIPES.values() if r.target == target and r.recommended], target
        assert sum(r.recommended for r in recipes.RECIPES.values() if r.target == target) == 1, target
    assert recipes.get("w4-best") is not None and recipes.get("w4-best").recommended  # the example
    assert "w4-best" in recipes.recipes_of("quantize.gptq") and recipes.recipes_of("distill") == []


@pytest.mark.unit
def test_a_job_gives_a_recipe_or_steps() -> None:
    job = JobIn.model_validate({"model_id": "m", "recipe": "fp8"})
    assert job.steps == [] and job.raw_steps() == [{"method": "quantize.fp8", "params": {"scheme": "FP8_DYNAMIC"}}]
    # A copy each time: validation fills in defaults without touching the recipe.
    job.raw_steps()[0]["params"]["scheme"] = "x"
    assert recipes.get("fp8").steps[0]["params"]["scheme"] == "FP8_DYNAMIC"
    with pytest.raises(ValidationError) as e:
        JobIn.model_validate({"model_id": "m", "recipe": "fp8", "steps": [{"method": "quantize.cast"}]})
    assert e.value.errors()[0]["type"] == "recipe_and_steps"
    with pytest.raises(ValidationError) as e:
        JobIn.model_validate({"model_id": "m", "recipe": "w4-bestest"})
    errs = e.value.errors()
    assert [x["type"] for x in errs] == ["unknown_recipe"] and "w4-best" in errs[0]["msg"], errs
    with pytest.raises(ValidationError) as e:
        JobIn.model_validate({"model_id": "m"})
    assert "unless a recipe names them" in e.value.errors()[0]["msg"]
    given = JobIn.model_validate({"model_id": "m", "steps": [{"method": "quantize.cast"}]})
    assert given.recipe is None and given.raw_steps()[0]["method"] == "quantize.cast"


@pytest.mark.unit
def test_described_with_the_measured_figures_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "measured.json"
    path.write_text(
        json.dumps(
            {
                "model": "Gemma 3 270M",
                "measured_at": "2026-12-07T10:00:00Z",
                "recipes": {"fp8": {"perplexity_ratio": 1.004, "seconds": 12.0}, "w4-rotated": {"refused": "why"}},
            }
        )
    )
    monkeypatch.setattr(recipes, "MEASURED_PATH", path)
    recipes.measured.cache_clear()
    try:
        d = recipes.describe(recipes.RECIPES["fp8"])
        assert d["measured"] == {
            "model": "Gemma 3 270M",
            "measured_at": "2026-12-07T10:00:00Z",
            "perplexity_ratio": 1.004,
            "seconds": 12.0,
        }
        assert d["needs_data"] is False and d["recommended"] and d["target"] == "fp8"
        assert recipes.describe(recipes.RECIPES["w4-rotated"])["measured"]["refused"] == "why"
        assert recipes.describe(recipes.RECIPES["w8"])["measured"] is None
        assert recipes.describe(recipes.RECIPES["w4-best"])["needs_data"] is True
        monkeypatch.setattr(recipes, "MEASURED_PATH", tmp_path / "absent.json")
        recipes.measured.cache_clear()
        assert recipes.describe(recipes.RECIPES["fp8"])["measured"] is None
    finally:
        recipes.measured.cache_clear()


@pytest.mark.integration
def test_a_recipe_job_through_the_api_the_sdk_and_the_cli(
    embedded, tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from modelpress import Client, Unprocessable
    from modelpress._entry import main
    from tests.helpers import upload_dir, wait_job

    c = embedded.client()
    model_id = upload_dir(c, tiny["llama"]).json()["id"]
    off: dict[str, Any] = {"enabled": False}
    r = c.post("/v1/jobs", json={"model_id": model_id, "recipe": "w8", "evaluation": off})
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded" and job["recipe"] == "w8", job
    assert job["steps"] == validate_steps(recipes.get("w8").expand())
    assert job["metrics"]["steps"][0]["bits"] == 8
    # Refused as its steps would be: GPTQ needs a dataset.
    r = c.post("/v1/jobs", json={"model_id": model_id, "recipe": "w4-best"})
    assert r.status_code == 422 and r.json()["errors"][0]["type"] == "dataset_required", r.text
    r = c.post("/v1/jobs", json={"model_id": model_id, "recipe": "nope"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "recipe"], r.text
    est = c.post("/v1/jobs/estimate", json={"model_id": model_id, "recipe": "w4-fast", "evaluation": off})
    assert est.status_code == 200 and est.json()["artifact_bytes"] > 0, est.text

    listed = c.get("/v1/recipes").json()
    assert [x["name"] for x in listed][:2] == ["w8", "w4-best"] and {x["target"] for x in listed} == set(
        recipes.TARGETS
    )
    methods = {m["name"]: m for m in c.get("/v1/methods").json()}
    assert "w4-best" in methods["quantize.gptq"]["recipes"] and methods["distill"]["recipes"] == []

    with Client(embedded.service.url, embedded.key, timeout=60) as mp:
        sdk_job = mp.submit(model_id, recipe="fp8", evaluation=off)
        assert sdk_job.recipe == "fp8" and sdk_job.steps[0].method == "quantize.fp8"
        assert mp.wait(sdk_job.id, timeout=300).status == "succeeded"
        assert any(r.name == "w4-best" and r.recommended for r in mp.recipes())
        with pytest.raises(Unprocessable):
            mp.submit(model_id, [("quantize.cast", {})], recipe="fp8")

    monkeypatch.setenv("MODELPRESS_URL", embedded.service.url)
    monkeypatch.setenv("MODELPRESS_API_KEY", embedded.key)
    assert main(["compress", model_id, "--recipe", "w4-fast", "--no-eval", "--output", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recipe"] == "w4-fast" and out["steps"][0]["method"] == "quantize.weight_only"
    assert main(["jobs", "estimate", model_id, "--recipe", "fp8", "--no-eval", "--output", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["artifact_bytes"] > 0
    assert main(["compress", model_id, "--recipe", "fp8", "--step", "quantize.cast"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["methods", "recipes"]) == 0
    table = capsys.readouterr().out
    assert "w4-best *" in table and "sparse-2of4" in table

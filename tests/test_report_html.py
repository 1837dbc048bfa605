"""The report pages: what they say, what they escape, and that a real Chromium opens them without
a console error, a page error or a failed request (the pages carry their own CSP, so a violation
would show up as a console error)."""

from __future__ import annotations

import copy
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.reports import charts, units
from app.reports.html import PAGE_CSP, render_job_report, render_sweep
from tests.browser import open_in_chromium

EVIL = "<script>alert(1)</script>"

FULL_REPORT = {
    "job_id": "bf67f4fe-8c19-4e89-a2f5-99f4f6713dc0",
    "job_name": EVIL,
    "model_id": "24971735-1379-4eee-9619-e7a086abfb9c",
    "status": "succeeded",
    "created_at": "2026-11-29T16:00:00Z",
    "finished_at": "2026-11-29T16:00:02Z",
    "steps": [
        {
            "method": "prune.magnitude",
            "params": {"sparsity": 0.5, "note": "<img src=x onerror=alert(2)>"},
            "seconds": 0.12,
        }
    ],
    "size": {
        "original_bytes": 1000000,
        "artifact_bytes": 500000,
        "compression_ratio": 2.0,
        "original_weight_bytes": 900000,
        "artifact_weight_bytes": 450000,
        "weight_bytes_ratio": 0.5,
        "memory_bytes": 800000,
        "parameters": {"original": 225000, "total": 225000, "nonzero": 112500},
        "mean_bits_per_weight": 16.0,
    },
    "sparsity": {
        "overall": 0.5,
        "target_parameters": 200000,
        "target_zeros": 100000,
        "sparsity": 0.5,
        "per_layer": [
            {"name": "transformer.h.0.mlp.c_fc.weight", "parameters": 4096, "zeros": 2048, "sparsity": 0.5},
            {"name": "h.1.<b>$x^2$</b>", "parameters": 4096, "zeros": 1024, "sparsity": 0.25},
        ],
    },
    "speed": {
        "available": True,
        "reason": None,
        "device": "cpu",
        "threads": 2,
        "batch_size": 1,
        "seq_len": 128,
        "runs": 5,
        "warmup": 1,
        "runs_requested": 7,
        "warmup_requested": 2,
        "limited_by": "budget",
        "budget_note": None,
        "seconds": {"original": 0.06, "compressed": 0.03},
        "budget": {"budget_s": 30.0, "seconds": 0.9, "within_budget": True},
        "original": {"median_ms": 10.0, "min_ms": 9.5, "max_ms": 11.0, "samples_ms": [10.0, 9.5, 11.0, 10.2, 9.9]},
        "compressed": {"median_ms": 5.0, "min_ms": 4.9, "max_ms": 5.5, "samples_ms": [5.0, 4.9, 5.5, 5.1, 5.0]},
        "runs_as": "int8_kernels",
        "kernel": "torch._int_mm int8 x int8",
        "latency_ratio": 0.5,
        "speedup": 2.0,
        "note": "measured on 2 threads",
    },
    "memory": {"peak_rss_bytes": 123456789, "how": "ru_maxrss of the worker child", "peak_cuda_bytes": None},
    "quality": {
        "available": True,
        "reason": None,
        "metric": "perplexity",
        "higher_is_better": False,
        "dataset": {"source": "builtin", "id": None, "samples": 32, "tokens": 3000},
        "original": 50.1,
        "compressed": 52.3,
        "delta": 2.2,
        "ratio": 1.0439,
        "samples": 32,
        "samples_requested": 40,
        "samples_available": 40,
        "limited_by": "budget",
        "budget_note": "the minimum <4> ran anyway",
        "seconds": {"original": 0.4, "compressed": 0.45},
        "budget": {"budget_s": 30.0, "seconds": 0.9, "within_budget": True},
        "ci95": {"original": [41.25, 60.5], "compressed": [43.0, 63.1], "ratio": [1.01, 1.08]},
        "ci_method": "t-interval on the mean NLL per token",
    },
    "fidelity": {
        "available": True,
        "reason": None,
        "on": "logits",
        "samples": 32,
        "tokens": 3000,
        "kl_mean": 0.01,
        "top1_agreement": 0.98,
        "output_cosine": None,
        "samples_requested": 40,
        "samples_available": 40,
        "limited_by": "budget",
        "ci95": {"kl_mean": [0.0075, 0.0125], "top1_agreement": [0.97, 0.99], "output_cosine": None},
        "ci_method": "t-interval over samples",
        "reasons": {"output_cosine": "only for embedding models"},
    },
    "stage_seconds": {
        "load": 0.1,
        "evaluate_original": 0.5,
        "step1:prune.magnitude": 0.2,
        "save": 0.3,
        "evaluate_compressed": 0.5,
        "store": 0.01,
        "total": 1.7,
    },
    "notes": {"any": "</pre><script>alert(3)</script>"},
    "evaluation": {"enabled": True, "batch_size": 1, "seq_len": 128, "runs": 5, "warmup": 1, "max_samples": 32},
}

UNAVAILABLE_REPORT = {
    "job_id": "0c4a1b2e-0000-4000-8000-000000000001",
    "job_name": None,
    "model_id": "m-1",
    "status": "succeeded",
    "steps": [{"method": "quantize.int8_dynamic", "params": {}, "seconds": None}],
    "size": {"original_bytes": 548428, "artifact_bytes": None, "compression_ratio": None},
    "sparsity": {"overall": None, "per_layer": [{"name": "w", "parameters": 10, "zeros": None, "sparsity": None}]},
    "speed": {"available": False, "reason": "speed measurement <disabled> for this job"},
    "quality": {"available": False, "reason": "no evaluation dataset & the model has no LM head"},
    "fidelity": {"available": False, "reason": "fidelity needs the original model's logits"},
    "memory": None,
    "stage_seconds": {"total": float("nan")},
}

SWEEP = {
    "id": "5a0e9a7c-1111-4222-8333-444455556666",
    "name": EVIL,
    "model_id": "24971735-1379-4eee-9619-e7a086abfb9c",
    "created_at": "2026-11-29T16:00:00Z",
    "status": "partial",
    "spec": {
        "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
        "vary": {"steps[0].params.sparsity": [0.3, 0.5, 0.7]},
    },
    "counts": {"queued": 0, "running": 0, "succeeded": 2, "failed": 1, "canceled": 0},
    "points": [
        {
            "index": 0,
            "values": {"steps[0].params.sparsity": 0.3},
            "job_id": "job-0-5a0e9a7c-1111-4222-8333",
            "status": "succeeded",
            "metrics": {
                "artifact_bytes": 700000,
                "compression_ratio": 1.4286,
                "latency_ms": 7.25,
                "quality_metric": "perplexity",
                "quality": 50.0,
                "higher_is_better": False,
                "kl_mean": 0.01,
                "top1_agreement": 0.98,
                "sparsity": 0.3,
            },
            "error": None,
            "on_frontier": True,
        },
        {
            "index": 1,
            "values": {"steps[0].params.sparsity": 0.5},
            "job_id": "job-1",
            "status": "succeeded",
            "metrics": {
                "artifact_bytes": 500000,
                "compression_ratio": 2.0,
                "latency_ms": 5.5,
                "quality_metric": "perplexity",
                "quality": 61.5,
                "higher_is_better": False,
                "kl_mean": 0.2,
                "top1_agreement": 0.9,
                "sparsity": 0.5,
            },
            "error": None,
            "on_frontier": True,
        },
        {
            "index": 2,
            "values": {"steps[0].params.sparsity": 0.7},
            "job_id": "job-2",
            "status": "failed",
            "metrics": None,
            "error": {"code": "worker_error", "message": "out of memory <oom>"},
            "on_frontier": False,
        },
    ],
    "frontier": [0, 1],
    "frontier_axes": {
        "size": "artifact_bytes (lower is better)",
        "latency": "latency_ms (lower is better)",
        "quality": "perplexity (lower is better)",
    },
    "frontier_note": "frontier over points with all three metrics",
}


def _open(tmp_path: Path, name: str, html: str) -> dict:
    page = tmp_path / name
    page.write_text(html, encoding="utf-8")
    return open_in_chromium(page.as_uri())


def _assert_clean(res: dict, svg_count: int) -> None:
    assert res["console_errors"] == []
    assert res["page_errors"] == []
    assert res["failed_requests"] == []
    assert res["bad_responses"] == []
    assert res["dialogs"] == []
    assert res["svg_count"] == svg_count


def _assert_standalone(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in html
    assert '<link rel="icon" href="data:,">' in html
    assert "<?xml" not in html and "<!DOCTYPE svg" not in html
    assert "<script" not in html.lower()
    # No resource from anywhere else: no src=, no stylesheet link, no http(s) URL but the SVG namespaces.
    assert not re.search(r"<[a-zA-Z][^>]*\s(src|srcset|data)=", html)
    assert 'rel="stylesheet"' not in html and "@import" not in html and "url(http" not in html
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls


@pytest.mark.e2e
def test_full_job_report(tmp_path: Path) -> None:
    html = render_job_report(copy.deepcopy(FULL_REPORT))
    _assert_standalone(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "&lt;/pre&gt;&lt;script&gt;alert(3)&lt;/script&gt;" in html
    for text in (
        "1.0 MB",
        "1,000,000 bytes",
        "500.0 kB",
        "500,000 bytes",
        "0.5×",  # size ratio: compressed ÷ original (the JSON's compression_ratio is 2.0)
        "123.5 MB",
        "123,456,789 bytes",
        "50.1",
        "52.3",
        "+2.2 (worse)",
        "10.0 ms",
        "5.00 ms",
        "0.5× the original",  # latency ratio (the JSON's speedup is 2.0)
        "50.0 %",
        "25.0 %",
        "transformer.h.0.mlp.c_fc.weight",
        "only for embedding models",
        "1.70 s",
        "perplexity",
        # The evaluation budget: counts against caps, confidence intervals, the minimum's note.
        "32 of 40 requested",
        "limited by budget",
        "95 % CI 41.25 – 60.5",
        "95 % CI 0.0075 – 0.0125",
        "95 % CI 1.01 – 1.08",
        "of 7 (2) requested",
        "30.0 s",
        "The minimum &lt;4&gt; ran anyway.",
        "t-interval on the mean NLL per token",
    ):
        assert text in html, text

    res = _open(tmp_path, "job.html", html)
    _assert_clean(res, svg_count=4)  # size, sparsity per layer, latency, quality
    assert res["status"] in (200, None)
    assert res["title"] == f"Job report: {EVIL}"
    assert EVIL in res["text"]  # shown as text, not run
    assert "h.1.<b>$x^2$</b>" in res["text"]


@pytest.mark.e2e
def test_report_with_unavailable_sections(tmp_path: Path) -> None:
    html = render_job_report(copy.deepcopy(UNAVAILABLE_REPORT))
    _assert_standalone(html)
    for reason in (
        "speed measurement &lt;disabled&gt; for this job",
        "no evaluation dataset &amp; the model has no LM head",
        "fidelity needs the original model&#39;s logits",
    ):
        assert reason in html, reason
    assert "548.4 kB" in html and "548,428 bytes" in html

    res = _open(tmp_path, "job-partial.html", html)
    _assert_clean(res, svg_count=0)  # one side of the size is unknown, and no step pruned
    for reason in (
        "speed measurement <disabled> for this job",
        "no evaluation dataset & the model has no LM head",
        "fidelity needs the original model's logits",
        "Not reported for this job.",
    ):
        assert reason in res["text"], reason
    assert res["title"] == "Job report: 0c4a1b2e-0000-4000-8000-000000000001"


@pytest.mark.unit
def test_decompressed_speed_claims_no_speedup() -> None:
    report = copy.deepcopy(FULL_REPORT)
    report["speed"].update(
        runs_as="decompressed",
        speedup=None,
        latency_ratio=1.02,
        note="int4 weights are unpacked to float before matmul",
    )
    html = render_job_report(report)
    assert "as fast" not in html
    assert "No speed-up claimed" in html and "int4 weights are unpacked to float before matmul" in html
    assert "10.0 ms" in html and "5.00 ms" in html  # both latencies still shown


@pytest.mark.unit
def test_empty_and_garbage_input_do_not_crash() -> None:
    for report in (
        {},
        {
            "size": "oops",
            "steps": "x",
            "speed": {"available": True},
            "quality": {},
            "sparsity": {"per_layer": "no"},
            "fidelity": {"kl_mean": "NaN"},
        },
    ):
        html = render_job_report(report)
        assert html.startswith("<!DOCTYPE html>") and "</html>" in html
    for sweep in ({}, {"points": [None, {"index": 0, "metrics": {"artifact_bytes": None}}], "spec": {"vary": 3}}):
        html = render_sweep(sweep)
        assert html.startswith("<!DOCTYPE html>") and "</html>" in html


@pytest.mark.e2e
def test_sweep_page(tmp_path: Path) -> None:
    html = render_sweep(copy.deepcopy(SWEEP))
    _assert_standalone(html)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "out of memory &lt;oom&gt;" in html and "worker_error" in html
    for text in (
        "700.0 kB",
        "700,000 bytes",
        "0.7×",  # size ratio of a point whose compression_ratio (original ÷ artifact) is 1.4286
        "500,000 bytes",
        "7.25 ms",
        "61.5",
        "steps[0].params.sparsity",
        "perplexity (lower is better)",
        "Frontier over points with all three metrics.",
        "1 of 3 points are not plotted",
    ):
        assert text in html, text
    assert html.count('<tr class="frontier">') == 2
    assert 'title="job-0-5a0e9a7c-1111-4222-8333"' in html  # long job ids shortened, full on hover

    res = _open(tmp_path, "sweep.html", html)
    _assert_clean(res, svg_count=1)
    assert res["title"] == f"Sweep: {EVIL}"
    assert "out of memory <oom>" in res["text"]


@pytest.mark.e2e
def test_sweep_without_metrics_shows_reason(tmp_path: Path) -> None:
    sweep = copy.deepcopy(SWEEP)
    for p in sweep["points"]:
        p.update(metrics=None, status="queued", on_frontier=False)
    sweep.update(status="running", frontier=[])
    html = render_sweep(sweep)
    assert "No point has both an artifact size and a quality value yet." in html
    assert "still running" in html
    res = _open(tmp_path, "sweep-empty.html", html)
    _assert_clean(res, svg_count=0)


@pytest.mark.unit
def test_many_layers_chart_is_capped() -> None:
    layers = [(f"model.layers.{i}.mlp.up_proj.weight", (i % 13) / 13) for i in range(400)]
    svg = charts.layer_sparsity_bars(layers, overall=0.4, max_layers=40)
    assert "360 layers between these not shown" in svg
    height_pt = float(re.search(r'height="([\d.]+)pt"', svg).group(1))
    assert height_pt < 700
    report = copy.deepcopy(FULL_REPORT)
    report["sparsity"]["per_layer"] = [
        {"name": n, "parameters": 100, "zeros": int(s * 100), "sparsity": s} for n, s in layers
    ]
    html = render_job_report(report)
    assert "model.layers.399.mlp.up_proj.weight" in html  # the table has every layer
    assert "<details><summary>All 400 layers</summary>" in html


@pytest.mark.unit
def test_charts_are_deterministic_inline_svg_with_unique_ids() -> None:
    a = charts.before_after_bars("Size", [("file", 1_000_000, 500_000)], kind="bytes")
    b = charts.before_after_bars("Size", [("file", 1_000_000, 500_000)], kind="bytes")
    c = charts.before_after_bars("Latency", [("median", 10.0, 5.0)], kind="ms")
    assert a == b
    assert a.startswith("<svg ") and a.endswith("</svg>") and "<!--" not in a
    ids_a, ids_c = set(re.findall(r'id="([^"]+)"', a)), set(re.findall(r'id="([^"]+)"', c))
    assert ids_a and not ids_a & ids_c
    scatter = charts.sweep_scatter([{"index": 0, "artifact_bytes": 5, "quality": 1.0, "latency_ms": None}])
    for svg in (a, c, scatter):  # every url(#…) and href="#…" still points at an element of the same chart
        refs = set(re.findall(r'(?:url\(#|href="#)([^)"]+)', svg))
        assert refs and refs <= set(re.findall(r'id="([^"]+)"', svg))
    assert charts.format_value(1_234_567, "bytes") == "1.2 MB" and charts.format_value(13_830, "ms") == "13.8 s"


@pytest.mark.integration
def test_charts_same_bytes_in_another_process() -> None:
    point = {"index": 0, "artifact_bytes": 5, "quality": 1.0, "latency_ms": 2.0, "on_frontier": True}
    code = (
        "from app.reports import charts; import hashlib; "
        f"print(hashlib.sha256(charts.sweep_scatter([{point!r}]).encode()).hexdigest())"
    )
    here = hashlib.sha256(charts.sweep_scatter([point]).encode()).hexdigest()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == here


@pytest.mark.integration
def test_importing_the_reports_is_light() -> None:
    code = (
        "import sys; import app.reports.html, app.reports.charts; "
        "print(','.join(m for m in ('matplotlib', 'numpy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.unit
def test_page_csp_is_in_the_page() -> None:
    html = render_sweep({})
    assert 'http-equiv="Content-Security-Policy"' in html
    assert "default-src &#39;none&#39;" in html and "script-src" not in PAGE_CSP


# --- what people read: units, one ratio convention, charts that mean something, notes as sentences


def _text_outside_charts(html: str) -> str:
    """The page without its <style> and its SVGs: what the report itself writes."""
    html = re.sub(r"<style>.*?</style>", "", html, flags=re.S)
    return re.sub(r"<svg.*?</svg>", "", html, flags=re.S)


QUANTIZE_ONLY = {
    "job_id": "q-1",
    "job_name": "4-bit",
    "status": "succeeded",
    "steps": [{"method": "quantize.weight_only", "params": {"bits": 4, "group_size": 64}, "seconds": 1.2}],
    "size": {"original_bytes": 541_600_000, "artifact_bytes": 135_400_000, "compression_ratio": 4.0},
    # A quantizer leaves a few exact zeros: no result of the job, so no chart of them.
    "sparsity": {
        "overall": 0.0004,
        "sparsity": 0.0004,
        "per_layer": [{"name": "model.layers.0.mlp.up_proj", "parameters": 1000, "zeros": 1, "sparsity": 0.001}],
    },
    "speed": {
        "available": True,
        "runs_as": "decompressed",
        "speedup": None,
        "latency_ratio": 1.31,
        "original": {"median_ms": 13_830.0, "min_ms": 13_000.0, "max_ms": 14_000.0, "samples_ms": [13_830.0]},
        "compressed": {"median_ms": 18_117.3, "min_ms": 17_000.0, "max_ms": 19_000.0, "samples_ms": [18_117.3]},
        "notes": ["seq_len 128 cut to the model's 64 positions"],
    },
    "quality": {"available": False, "reason": "evaluation was turned off"},
    "fidelity": {"available": False, "reason": "evaluation was turned off"},
    "stage_seconds": {"load": 0.412, "step1:quantize.weight_only": 125.2, "total": 3_840.0},
    "notes": {
        "format": "compressed-tensors pack-quantized",
        "runs": "decompressed",
        "runs_detail": "transformers dequantizes the integer weights to bfloat16 on the first forward pass",
        "memory_bytes": 1_083_000_000,
        "memory_bytes_compressed": 270_000_000,
        "ignored_layers": ["lm_head"],
        "future_key": {"a": 1, "b": [2, 3]},
    },
    "engine": {"path": "stream", "note": "tensor by tensor from the input shards"},
}


@pytest.mark.unit
def test_units_people_read() -> None:
    assert [units.millis(ms) for ms in (0.41, 4.123, 41.23, 412.3, 13_830, 125_000, 3_840_000)] == [
        "0.41 ms",
        "4.12 ms",
        "41.2 ms",
        "412 ms",
        "13.8 s",
        "2 min 5 s",
        "1 h 4 min",
    ]
    assert units.size(541_600_000) == "541.6 MB" and units.size(999) == "999 B" and units.size(1_000) == "1.0 kB"
    assert units.count(1_234_567) == "1,234,567" and units.plain(13_830.2) == "13,830"
    assert units.plain(1.234e-7) == "0.0000001234" and units.ratio(0.25) == "0.25×"
    assert units.text(float("nan")) == units.DASH and units.percent(0.5) == "50.0 %"

    text = _text_outside_charts(render_job_report(copy.deepcopy(QUANTIZE_ONLY)))
    for shown in ("13.8 s", "18.1 s", "412 ms", "2 min 5 s", "1 h 4 min", "541.6 MB", "541,600,000 bytes"):
        assert shown in text, shown
    assert not re.search(r"\d[eE][+-]?\d", text), re.search(r".{40}\d[eE][+-]?\d.{20}", text)


@pytest.mark.unit
def test_one_ratio_convention_stated_in_the_header() -> None:
    html = render_job_report(copy.deepcopy(FULL_REPORT))
    header = html.split("<section>", 1)[0]
    assert units.RATIO_CONVENTION in header and "compressed ÷ original" in units.RATIO_CONVENTION
    text = _text_outside_charts(html).split("<section>", 1)[1]
    assert "original ÷" not in text and "as fast" not in text
    # Every ratio on the page is labelled with the one convention; the JSON's inverse fields
    # (compression_ratio 2.0, speedup 2.0) appear only as their inverses.
    labels = re.findall(r">([^<>]*[Rr]atio[^<>]*)<", text)
    assert labels and all("(compressed ÷ original)" in label for label in labels), labels
    assert "2×" not in text and text.count("0.5×") >= 4  # size and latency, card and table each
    sweep_text = _text_outside_charts(render_sweep(copy.deepcopy(SWEEP)))
    assert "Size ratio (compressed ÷ original)" in sweep_text and "0.5×" in sweep_text and "2×" not in sweep_text


@pytest.mark.unit
def test_sparsity_chart_only_when_a_step_pruned() -> None:
    html = render_job_report(copy.deepcopy(QUANTIZE_ONLY))
    assert 'aria-label="Sparsity per layer"' not in html
    assert "No step of this job pruned weights" in html and "Sparsity of the pruned layers" not in html
    # Decompressed: no speed-up claimed, the latencies still charted; quality is off: no chart.
    assert "No speed-up claimed" in html and html.count("<svg") == 2  # size, latency
    pruned = copy.deepcopy(QUANTIZE_ONLY)
    pruned["steps"].insert(0, {"method": "prune.magnitude", "params": {"sparsity": 0.5}})
    assert 'aria-label="Sparsity per layer"' in render_job_report(pruned)


@pytest.mark.unit
def test_notes_are_sentences() -> None:
    html = render_job_report(copy.deepcopy(QUANTIZE_ONLY))
    notes = html.split("<h2>Notes</h2>", 1)[1].split("</section>", 1)[0]
    items = re.findall(r"<li>(.*?)</li>", notes)
    assert items == [
        "The artifact is stored as compressed-tensors pack-quantized.",
        "It runs decompressed: transformers dequantizes the integer weights to bfloat16 on the first forward pass.",
        "Once loaded, it takes 1.1 GB in memory (270.0 MB before its weights are decompressed, or in an "
        "engine that keeps them packed).",
        "1 Linear layer was left in the original dtype: lm_head.",
        "Future key: a: 1; b: 2, 3.",
        "Built on the stream path: tensor by tensor from the input shards.",
    ]
    assert "{" not in notes and "&#34;" not in notes  # no JSON
    assert "seq_len 128 cut to the model&#39;s 64 positions." in html  # the evaluator's notes too


@pytest.mark.unit
def test_hostile_strings_are_escaped_by_the_templates() -> None:
    report = copy.deepcopy(QUANTIZE_ONLY)
    report["job_name"] = EVIL
    report["steps"][0]["method"] = EVIL
    report["notes"] = {EVIL: EVIL, "format": '"><script>alert(4)</script>'}
    report["speed"]["notes"] = [EVIL]
    html = render_job_report(report)
    assert "<script" not in html.lower()
    assert "<title>Job report: &lt;script&gt;alert(1)&lt;/script&gt;</title>" in html
    assert "<code>&lt;script&gt;alert(1)&lt;/script&gt;</code>" in html  # the step's method
    assert "&#34;&gt;&lt;script&gt;alert(4)&lt;/script&gt;" in html


@pytest.mark.unit
def test_group_size_fallbacks_are_listed_layer_by_layer() -> None:
    # Issue 22: a fallback is never silent; every layer is named with the group it got.
    report = copy.deepcopy(QUANTIZE_ONLY)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(8)]
    report["steps"] = [
        {
            "method": "quantize.weight_only",
            "params": {"bits": 4, "group_size": 128},
            "seconds": 1.0,
            "group_size": 128,
            "group_fallbacks": {**dict.fromkeys(names, 64), "model.layers.0.mlp.odd_proj": "channel"},
        }
    ]
    html = render_job_report(report)
    assert "8 layers in groups of 64 (group size 128 does not divide their input width): " + ", ".join(names) in html
    assert (
        "1 layer in per-channel scales (group size 128 does not divide its input width): model.layers.0.mlp.odd_proj"
        in html
    )
    report["steps"][0]["group_fallbacks"] = {}
    assert "does not divide" not in render_job_report(report)


@pytest.mark.unit
def test_export_section_names_the_onnx_weight_range():
    """An int8 ONNX export's reduce_range is a labelled row; a float32 export's (None) is left out."""
    from app.reports import job

    int8 = job.export({"export": {"format": "onnx", "quantize": "int8_dynamic", "reduce_range": True, "bytes": 10}})
    labels = [label for label, _ in int8.rows]
    assert "ONNX int8 weights in 7 bits" in labels and "reduce_range" not in labels
    fp32 = job.export({"export": {"format": "onnx", "quantize": None, "reduce_range": None, "bytes": 10}})
    assert not {"ONNX int8 weights in 7 bits", "reduce_range"} & {label for label, _ in fp32.rows}

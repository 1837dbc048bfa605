"""The README's quickstart, run as printed (issue 18): its ```` ```bash readme-test ```` blocks, in
order, as one bash script, in a folder laid out as a clone is after ``make run`` (``.venv``,
``var/api-key``) against the real embedded service. Two things differ from a reader's run, both
for time: ``model/`` is a tiny BERT with a tokenizer (the README downloads SmolLM2 or copies
MiniLM there, in blocks that are not marked), and the service's address is the fixture's (the
README's ``http://127.0.0.1:8000`` is replaced). Outputs are checked for their shape, not their
ids: every command ran, said what the README says it says, and the model it downloaded loads."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[1] / "README.md"
URL = "http://127.0.0.1:8000"  # what `make run` listens on, as the README prints it
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def readme_blocks() -> list[str]:
    return re.findall(r"^```bash readme-test\n(.*?)^```$", README.read_text(), re.M | re.S)


def _clone_like(root: Path, key: str, bert: Path) -> None:
    """What the README's commands find in a clone after `make run`: .venv (this interpreter's),
    var/api-key, and model/ as `hf download` leaves a folder: the session's tiny BERT (conftest's
    `tiny`, built once for many tests) with a tokenizer whose ids fit its vocabulary."""
    from tests.tokenizer_util import build_tokenizer, vocab

    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    (root / "var").mkdir()
    (root / "var" / "api-key").write_text(key + "\n")
    shutil.copytree(bert, root / "model")
    assert len(vocab()) <= json.loads((bert / "config.json").read_text())["vocab_size"]
    build_tokenizer().save_pretrained(root / "model")


def _run(blocks: list[str], root: Path, url: str) -> list[str]:
    """The blocks as one script (their exports carry over), each one's output (stdout and stderr
    in the order written) split out by a marker line."""
    # printf: curl's JSON ends without a newline, and each marker must start a line.
    marks = (f"printf '\\n::block {i} %s::\\n' $SECONDS\n{b}" for i, b in enumerate(blocks))
    script = "set -euo pipefail\n" + "".join(marks) + "printf '\\n::block end %s::\\n' $SECONDS\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_") and k != "COLUMNS"}
    env |= {"XDG_CACHE_HOME": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        ["bash", "-c", script.replace(URL, url)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stdout[-4000:]
    parts = re.split(r"^::block \w+ (\d+)::\n", res.stdout, flags=re.M)
    seconds = [int(t) for t in parts[1::2]]
    # Shown with -s or on a failure: where the test's time goes.
    print("seconds per block:", [b - a for a, b in itertools.pairwise(seconds)])
    return [out.strip("\n") + "\n" for out in parts[2:-1:2]]


def test_quickstart_runs_as_printed(embedded, tiny, tmp_path: Path) -> None:
    blocks = readme_blocks()
    assert len(blocks) == 9, "the checks below follow the README's readme-test blocks one by one"
    assert URL in blocks[0], "the set-up block names the service's address"
    _clone_like(tmp_path, embedded.key, tiny["bert"])
    setup, upload, compress, download, report, curl_upload, estimate, job, report_json = _run(
        blocks, tmp_path, embedded.service.url
    )

    assert re.fullmatch(r"modelpress \d+\.\d+\.\d+\S*\n", setup), setup
    assert re.search(rf"^model {UUID} uploaded: my-model, hf, BertModel, [\d,]+ parameters, ", upload, re.M), upload
    assert re.search(rf"^job {UUID} queued \(cpu queue\): quantize\.weight_only:bits=8", compress, re.M), compress
    assert re.search(r"^status +succeeded$", compress, re.M), compress
    assert re.search(r"^artifact +model\.zip, ", compress, re.M), compress
    assert re.search(r"^saved out/model\.zip \(.*verified\)$", download, re.M), download
    assert re.search(r"^torch\.Size\(\[1, \d+, 64\]\)$", download, re.M), download  # it loads, and runs
    for row in ("size", "speed", "quality", "fidelity"):
        assert re.search(rf"^{row}\b", report, re.M | re.I), report

    assert re.search(rf'"id": ?"{UUID}".*"architecture": ?"BertModel"', curl_upload), curl_upload
    assert re.search(r'"peak_memory_bytes": ?\d+', estimate), estimate
    assert re.search(r'"status": ?"succeeded"', job), job
    assert re.search(r'"size": ?\{"original_bytes": ?\d+', report_json), report_json
    assert re.search(r'"url": ?"http://127\.0\.0\.1:\d+/v1/jobs/[^"]+/report/view\?expires=', report_json), report_json

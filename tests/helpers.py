"""Test helpers: tiny models built from configs, and real service processes on this machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

BIN = Path(sys.executable).parent
MODELPRESS = str(BIN / "modelpress")
PG_ADMIN_URL = os.environ.get("MODELPRESS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELPRESS_TEST_REDIS", "redis://127.0.0.1:6379/0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct spare ports: all bound at once, then released. ``free_port()`` called n times
    may hand out the same port twice (each socket is closed before the next bind): a SeaweedFS
    master and filer were once both given 53061 and the filer could not start."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def build_tiny_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = {}
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500, n_positions=64))
    gpt2.save_pretrained(root / "gpt2")
    out["gpt2"] = root / "gpt2"
    bert = BertModel(
        BertConfig(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=2,
            intermediate_size=128,
            vocab_size=500,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(root / "bert")
    out["bert"] = root / "bert"
    llama = LlamaForCausalLM(
        LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=500,
            max_position_embeddings=64,
        )
    )
    llama.save_pretrained(root / "llama")
    out["llama"] = root / "llama"
    # Big enough that each pruning step takes a noticeable time (cancel-while-running test).
    big = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=256, n_head=4, vocab_size=500, n_positions=64))
    big.save_pretrained(root / "gpt2-big")
    out["gpt2-big"] = root / "gpt2-big"
    # A bare state dict: one safetensors file, no config.
    from safetensors.torch import save_file

    sd = {
        "encoder.layer.0.weight": torch.randn(64, 64),
        "encoder.layer.1.weight": torch.randn(32, 64),
        "encoder.layer.0.bias": torch.randn(64),
        "embed.weight": torch.randn(100, 64),
    }
    (root / "bare").mkdir()
    save_file(sd, str(root / "bare" / "weights.safetensors"))
    out["bare"] = root / "bare" / "weights.safetensors"
    return out


def safetensors_bytes(header: dict[str, Any], data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", header_len if header_len is not None else len(raw)) + raw + data


class Service:
    """Real processes: the API (``modelpress serve``) and, optionally, a Celery worker."""

    def __init__(self, env: dict[str, str], logdir: Path, worker: bool) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
        self.env = {**base, **env}
        if self.env.get("MODELPRESS_MODE") == "cluster":
            # Cluster mode refuses to start without the shared secret (one per test stack).
            self.env.setdefault("MODELPRESS_SECRET_KEY", "test-secret-" + uuid.uuid4().hex)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.logdir = logdir
        self.procs: list[subprocess.Popen] = []
        self.want_worker = worker

    def cli(self, *args: str) -> str:
        res = subprocess.run([MODELPRESS, *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = (self.logdir / f"{name}.log").open("ab")
        p = subprocess.Popen(
            [MODELPRESS, *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(p)
        return p

    def start(self) -> Service:
        self.api = self._spawn("api", "serve", "--port", str(self.port))
        if self.want_worker:
            self.start_worker()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.api.poll() is not None:
                raise RuntimeError(f"API exited: {(self.logdir / 'api.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("API did not become ready")

    def start_worker(self) -> subprocess.Popen:
        return self._spawn("worker", "worker", "--concurrency", "1")

    def stop(self) -> None:
        # SIGTERM to each main process only, as `docker stop` does: a Celery worker then shuts its
        # pool down itself. Signalling the whole group kills pool children mid-handshake, which
        # can leave billiard's main process waiting forever on a lock the dead child held.
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=60)
            # Whatever is left in the group (a stuck worker, a pool child) goes.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds (one process, not its group)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def upload_dir(client: httpx.Client, path: Path, name: str | None = None) -> httpx.Response:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(path.iterdir()) if p.is_file()]
    return client.post("/v1/models", files=files, data={"name": name} if name else None)


def table_rows(stack, table: str) -> int:
    """Rows in a table of the stack's database (SQLite or PostgreSQL)."""
    if stack.database_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(stack.database_url.removeprefix("sqlite:///")) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names
    import psycopg

    url = stack.database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608 - fixed names


def query(stack, sql: str, *args: object) -> list[tuple]:
    """Rows of a query on a PostgreSQL stack's database (``%s`` placeholders)."""
    import psycopg

    with psycopg.connect(stack.database_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return conn.execute(sql, args).fetchall()


def jobs_left(stack, job_ids: list[str]) -> int:
    """How many of these jobs are not finished yet."""
    return query(
        stack,
        "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status NOT IN ('succeeded', 'failed', 'canceled')",
        job_ids,
    )[0][0]


def stored_files(stack) -> list[Path]:
    """Every file under the stack's storage and temp folders."""
    return [p for p in (stack.data_dir / "storage").rglob("*") if p.is_file()] + [
        p for p in (stack.data_dir / "tmp").rglob("*") if p.is_file()
    ]


def wait_job(
    client: httpx.Client,
    job_id: str,
    timeout: float = 180,
    until: tuple[str, ...] = ("succeeded", "failed", "canceled"),
) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not reach {until}: {job}")

"""Load on the API in cluster mode: polling one job, and a burst of submissions.

    .venv/bin/python bench/bench_load.py                 # ~1.5 min on 2 cores
    .venv/bin/python bench/bench_load.py --duration 20 --submissions 200 --in-flight 50

Needs PostgreSQL and Redis as the tests use them (MODELPRESS_TEST_PG, default
postgresql://postgres@127.0.0.1:5432/test; MODELPRESS_TEST_REDIS, default
redis://127.0.0.1:6379/0), and wrk (Debian: ``apt-get install -y wrk``).

What it does, all on this machine (loopback only):

1. Creates a private database on the PostgreSQL server, migrates it, creates two API keys, and
   starts the real service in cluster mode: ``modelpress serve`` and one ``modelpress worker``,
   with a Redis key prefix of its own.
2. Uploads a tiny safetensors model and runs one job on it (prune.magnitude, evaluation off) to
   ``succeeded``: the job polled in step 3 is a finished one with its metrics, the largest answer
   a poll gets.
3. wrk, 10 connections, 2 threads, a warm-up then ``--duration`` seconds each, with the latency
   distribution: ``GET /v1/jobs/{id}`` with the ``Authorization`` header against the API, and
   ``GET /bare`` against bench/bare_app.py (FastAPI's hello world) served by the same function
   ``modelpress serve`` runs uvicorn through, one process each. The two runs alternate
   (``--rounds``); the table has the best round of each. Targets: job GET throughput >= 0.3x
   the bare endpoint's, p99 <= 15 ms, no errors (non-2xx answers, socket errors).
4. ``--submissions`` concurrent ``POST /v1/jobs`` from an httpx AsyncClient (``--in-flight`` at
   once) for a second tenant; then counts the jobs through the API's list and in the database
   (exactly as many as were answered 202, none lost, none doubled) and waits until every one has
   reached a terminal state.
5. Stops the processes, drops the database, deletes the Redis keys under its prefix.

Numbers are from this one run on this machine, side by side. A benchmark that prints its figures,
not a timed test: nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from tests.helpers import PG_ADMIN_URL, REDIS_URL, Service, free_port, stop_process  # noqa: E402

TERMINAL = ("succeeded", "failed", "canceled")


# --- wrk -----------------------------------------------------------------------------------------


def _seconds(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        raise ValueError(f"unreadable wrk time {value!r}")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]


def parse_wrk(out: str) -> dict:
    """Requests/s, latency percentiles (ms), request count, non-2xx/3xx and socket errors."""
    res: dict = {"raw": out}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk printed no Requests/sec:\n{out}")
    res["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
        res[f"p{pct}_ms"] = _seconds(m.group(1)) * 1000 if m else float("nan")
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    res["requests"] = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(g) for g in m.groups()) if m else 0
    res["errors"] = res["non2xx"] + res["socket_errors"]
    return res


def run_wrk(wrk: str, url: str, seconds: float, connections: int, threads: int, headers: dict[str, str]) -> dict:
    cmd = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--latency", "--timeout", "5s"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    res = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60)
    if res.returncode != 0:
        raise RuntimeError(f"wrk failed ({res.returncode}): {res.stderr}{res.stdout}")
    return parse_wrk(res.stdout)


# --- the service ---------------------------------------------------------------------------------


def tiny_safetensors() -> bytes:
    """A bare state dict of two 64x64 float32 matrices, written without torch."""
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(0)
    return save(
        {
            "encoder.layer.0.weight": rng.standard_normal((64, 64), dtype=np.float32),
            "encoder.layer.1.weight": rng.standard_normal((64, 64), dtype=np.float32),
        }
    )


def job_body(model_id: str, name: str) -> dict:
    return {
        "model_id": model_id,
        "name": name,
        "evaluation": {"enabled": False},
        "steps": [{"method": "prune.magnitude", "params": {"sparsity": 0.5}}],
    }


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited: {log.read_text()[-3000:]}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def db_scalar(db_url: str, query: str, *params: object) -> object:
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return conn.execute(query, params).fetchone()[0]


def tenant_id(db_url: str, name: str) -> str:
    return str(db_scalar(db_url, "SELECT id FROM tenants WHERE name = %s", name))


# --- the two parts -------------------------------------------------------------------------------


def fmt_row(name: str, r: dict) -> str:
    return (
        f"{name:<22} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} "
        f"{r['requests']:>9} {r['non2xx']:>7} {r['socket_errors']:>7}"
    )


def polling_part(args: argparse.Namespace, wrk: str, svc: Service, bare_url: str, key: str, job_id: str) -> bool:
    job_url = f"{svc.url}/v1/jobs/{job_id}"
    auth = {"Authorization": f"Bearer {key}"}
    body = httpx.get(job_url, headers=auth).content
    # The same job as FastAPI serializes it in the list: the fast path must not change the answer.
    listed = [j for j in httpx.get(f"{svc.url}/v1/jobs", headers=auth).json()["items"] if j["id"] == job_id]
    same = listed == [json.loads(body)]
    print(
        f"GET /v1/jobs/{{id}}: a succeeded job, {len(body)} bytes of JSON ({'the same' if same else 'NOT the same'} "
        f"as its item in GET /v1/jobs); GET /bare: {len(httpx.get(bare_url).content)} bytes",
        flush=True,
    )
    print(
        f"wrk: {args.connections} connections, {args.threads} threads, warm-up {args.warmup:g} s, "
        f"{args.rounds} round(s) of {args.duration:g} s per endpoint, alternating",
        flush=True,
    )
    run_wrk(wrk, bare_url, args.warmup, args.connections, args.threads, {})
    run_wrk(wrk, job_url, args.warmup, args.connections, args.threads, auth)
    bare_runs, job_runs = [], []
    for i in range(args.rounds):
        bare_runs.append(run_wrk(wrk, bare_url, args.duration, args.connections, args.threads, {}))
        job_runs.append(run_wrk(wrk, job_url, args.duration, args.connections, args.threads, auth))
        print(
            f"  round {i + 1}: bare {bare_runs[-1]['rps']:.0f} req/s, job GET {job_runs[-1]['rps']:.0f} req/s "
            f"(p99 {job_runs[-1]['p99_ms']:.2f} ms)",
            flush=True,
        )
    bare = max(bare_runs, key=lambda r: r["rps"])
    job = max(job_runs, key=lambda r: r["rps"])
    ratio = job["rps"] / bare["rps"]
    errors = sum(r["errors"] for r in job_runs + bare_runs)
    print()
    print(
        f"{'endpoint':<22} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'requests':>9} {'non-2xx':>7} "
        f"{'sockerr':>7}"
    )
    print(fmt_row("bare FastAPI", bare))
    print(fmt_row("GET /v1/jobs/{id}", job))
    print()
    checks = [
        (f"job GET / bare throughput = {ratio:.3f}", ratio >= 0.3, ">= 0.3"),
        (f"job GET p99 = {job['p99_ms']:.2f} ms", job["p99_ms"] <= 15.0, "<= 15 ms"),
        (f"errors (non-2xx + socket, every run) = {errors}", errors == 0, "== 0"),
        ("job GET body == its GET /v1/jobs item", same, "same"),
    ]
    for text, ok, target in checks:
        print(f"  {text:<48} target {target:<9} {'PASS' if ok else 'FAIL'}")
    if args.verbose:
        print("\n--- wrk, bare ---\n" + bare["raw"] + "\n--- wrk, job GET ---\n" + job["raw"])
    return all(ok for _, ok, _ in checks)


async def _submit_all(url: str, key: str, model_id: str, n: int, in_flight: int) -> tuple[list[int], list[str], float]:
    sem = asyncio.Semaphore(in_flight or n)
    limits = httpx.Limits(max_connections=in_flight or n, max_keepalive_connections=in_flight or n)
    statuses: list[int] = []
    ids: list[str] = []
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120, limits=limits
    ) as client:

        async def one(i: int) -> None:
            async with sem:
                try:
                    r = await client.post("/v1/jobs", json=job_body(model_id, f"load-{i}"))
                except httpx.HTTPError as e:
                    statuses.append(-1)
                    print(f"  submission {i}: {e.__class__.__name__}: {e}", flush=True)
                    return
                statuses.append(r.status_code)
                if r.status_code == 202:
                    ids.append(r.json()["id"])
                else:
                    print(f"  submission {i}: {r.status_code} {r.text[:200]}", flush=True)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return statuses, ids, time.perf_counter() - t0


def list_all(client: httpx.Client) -> list[dict]:
    items, cursor = [], None
    while True:
        r = client.get("/v1/jobs", params={"limit": 200, **({"cursor": cursor} if cursor else {})})
        r.raise_for_status()
        page = r.json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def submissions_part(args: argparse.Namespace, svc: Service, db_url: str, key: str, tenant: str, model_id: str) -> bool:
    n = args.submissions
    print(f"\n## {n} concurrent POST /v1/jobs ({args.in_flight or n} in flight), tenant {tenant!r}", flush=True)
    statuses, ids, took = asyncio.run(_submit_all(svc.url, key, model_id, n, args.in_flight))
    accepted = statuses.count(202)
    others = {s: statuses.count(s) for s in sorted(set(statuses)) if s != 202}
    print(
        f"  answered in {took:.2f} s ({n / took:.0f} submissions/s): {accepted} x 202"
        + (f", others {others}" if others else ""),
        flush=True,
    )
    tid = tenant_id(db_url, tenant)
    with svc.client(key) as client:
        listed = list_all(client)
    in_db = db_scalar(db_url, "SELECT count(*) FROM jobs WHERE tenant_id = %s", tid)
    listed_ids = {j["id"] for j in listed}
    print(
        f"  jobs of the tenant: {len(listed)} in GET /v1/jobs, {in_db} in the database; "
        f"{len(set(ids) - listed_ids)} accepted ids missing from the list",
        flush=True,
    )

    t0 = time.perf_counter()
    deadline = t0 + args.drain_timeout
    done = 0
    while time.perf_counter() < deadline:
        done = db_scalar(
            db_url, "SELECT count(*) FROM jobs WHERE tenant_id = %s AND status = ANY(%s)", tid, list(TERMINAL)
        )
        if done >= in_db:
            break
        time.sleep(0.5)
    drained = time.perf_counter() - t0
    with psycopg.connect(db_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        by_status = dict(
            conn.execute(
                "SELECT status, count(*) FROM jobs WHERE tenant_id = %s GROUP BY status ORDER BY status", (tid,)
            ).fetchall()
        )
    print(f"  terminal after {drained:.1f} s more: {done} of {in_db}; by status {by_status}", flush=True)
    checks = [
        (f"202 answers = {accepted}", accepted == n, f"== {n}"),
        (f"jobs listed by the API = {len(listed)}", len(listed) == n and listed_ids == set(ids), f"== {n}, same ids"),
        (f"jobs in the database = {in_db}", in_db == n, f"== {n}"),
        (f"terminal within {args.drain_timeout:g} s = {done}", done == n, f"== {n}"),
        (f"succeeded = {by_status.get('succeeded', 0)}", by_status.get("succeeded", 0) == n, f"== {n}"),
    ]
    for text, ok, target in checks:
        print(f"  {text:<48} target {target:<9} {'PASS' if ok else 'FAIL'}")
    return all(ok for _, ok, _ in checks)


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of each measured wrk run (default 10)")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of the wrk warm-up per endpoint (default 3)")
    ap.add_argument(
        "--rounds", type=int, default=2, help="measured runs per endpoint, alternating; the best counts (default 2)"
    )
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--submissions", type=int, default=200, help="concurrent POST /v1/jobs (0: skip that part)")
    ap.add_argument("--in-flight", type=int, default=50, help="submissions in flight at once (0: all at once)")
    ap.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for every submitted job to end")
    ap.add_argument("--worker-concurrency", type=int, default=2, help="processes of the Celery worker (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the data folder (logs) for a look afterwards")
    ap.add_argument("-v", "--verbose", action="store_true", help="print wrk's own output too")
    args = ap.parse_args()

    wrk = shutil.which("wrk")
    if wrk is None:
        print("bench_load: wrk is not installed. On Debian/Ubuntu: apt-get install -y wrk", file=sys.stderr)
        return 2

    name = f"mp_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"mpbench-{uuid.uuid4().hex[:8]}:"
    data = Path(tempfile.mkdtemp(prefix="mp-bench-load-"))
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    db_url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}".replace("postgresql://", "postgresql+psycopg://")
    env = {
        "MODELPRESS_MODE": "cluster",
        "MODELPRESS_DATABASE_URL": db_url,
        "MODELPRESS_BROKER_URL": REDIS_URL,
        "MODELPRESS_BROKER_KEY_PREFIX": prefix,
        "MODELPRESS_DATA_DIR": str(data),
    }
    svc = Service(env, data, worker=False)
    bare: subprocess.Popen | None = None
    ok = True
    try:
        svc.cli("migrate")
        key, submit_key = (
            svc.cli("keys", "create", "--tenant", "load-poll"),
            svc.cli("keys", "create", "--tenant", "load-submit"),
        )
        svc.start()
        svc._spawn("worker", "worker", "--concurrency", str(args.worker_concurrency))
        bare_port = free_port()
        bare_log = data / "bare.log"
        bare = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "bare_app.py"), "--port", str(bare_port)],
            env=svc.env,
            stdout=bare_log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        bare_url = f"http://127.0.0.1:{bare_port}/bare"
        wait_ready(bare_url, bare, bare_log)

        with svc.client(key) as client:
            r = client.post(
                "/v1/models", files=[("files", ("weights.safetensors", tiny_safetensors()))], data={"name": "tiny"}
            )
            r.raise_for_status()
            model_id = r.json()["id"]
            r = client.post("/v1/jobs", json=job_body(model_id, "polled"))
            r.raise_for_status()
            job_id = r.json()["id"]
            deadline = time.monotonic() + 120
            while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in TERMINAL:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the first job did not finish: {job}")
                time.sleep(0.2)
            if job["status"] != "succeeded":
                raise RuntimeError(f"the first job {job['status']}: {job.get('error')}")
        with svc.client(submit_key) as client:
            r = client.post(
                "/v1/models", files=[("files", ("weights.safetensors", tiny_safetensors()))], data={"name": "tiny"}
            )
            r.raise_for_status()
            submit_model = r.json()["id"]

        print(
            f"## GET /v1/jobs/{{id}} vs a bare FastAPI endpoint (cluster mode, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f} before)",
            flush=True,
        )
        ok &= polling_part(args, wrk, svc, bare_url, key, job_id)
        if args.submissions:
            ok &= submissions_part(args, svc, db_url, submit_key, "load-submit", submit_model)
    finally:
        if bare is not None:
            stop_process(bare)
        svc.stop()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        try:
            import redis

            r = redis.Redis.from_url(REDIS_URL)
            keys = list(r.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                r.delete(*keys)
        except Exception as e:  # noqa: BLE001 - cleanup: say it, do not hide the result
            print(f"bench_load: could not delete the Redis keys under {prefix!r}: {e}", file=sys.stderr)
        if args.keep:
            print(f"data and logs kept in {data}")
        else:
            shutil.rmtree(data, ignore_errors=True)
    print(f"\n{'ALL PASS' if ok else 'SOME FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

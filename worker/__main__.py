"""``python -m worker``: a Celery worker. ``modelpress worker`` checks the configuration and then
becomes this (app/cli.py); started directly, it trusts its arguments.

    python -m worker --queues cpu|gpu|cpu,gpu --concurrency N --pool prefork|solo|threads [--allow-no-gpu]
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m worker")
    p.add_argument("--queues", default="cpu")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    p.add_argument("--allow-no-gpu", action="store_true")
    args = p.parse_args(argv)

    from core.config import get_settings
    from core.logs import configure_logging

    s = get_settings()
    configure_logging(s)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()]
    if "gpu" in queues:
        from worker.registry import device

        if device().type != "cuda" and not args.allow_no_gpu:
            print("modelpress worker: no CUDA device: a gpu-queue worker needs one", file=sys.stderr)
            return 1
    from worker.celery_app import celery_app

    celery_app.worker_main(
        [
            "worker",
            "--queues",
            ",".join(queues),
            "--concurrency",
            str(args.concurrency),
            "--pool",
            args.pool,
            "--loglevel",
            s.log_level,
            "--hostname",
            f"modelpress-{'-'.join(queues)}-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

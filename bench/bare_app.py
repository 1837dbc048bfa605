"""A bare FastAPI endpoint, the yardstick of bench/bench_load.py.

    .venv/bin/python bench/bare_app.py --port 8123      # GET /bare -> {"status": "ok"}

No middleware, no database, no auth: FastAPI's hello world (an ``async def`` that returns a small
dict). It is served by ``app.cli.run_uvicorn``, the function ``modelpress serve`` runs uvicorn
through, so both sides of the comparison have the same server, loop, HTTP parser, logging set-up
and process count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastapi import FastAPI  # noqa: E402

app = FastAPI()


@app.get("/bare")
async def bare() -> dict[str, str]:
    return {"status": "ok"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8123)
    args = p.parse_args()
    from app.cli import run_uvicorn
    from core.config import get_settings
    from core.logs import configure_logging

    configure_logging(get_settings())  # as `modelpress serve` (app.cli.main) does
    run_uvicorn(app, args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())

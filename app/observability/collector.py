"""Job and worker metrics, read from the database at each scrape (the database, not the broker, is
the truth for both brokers). A database error leaves them out of that scrape: never a 500."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import get_args

from prometheus_client import Counter
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

log = logging.getLogger("modelpress.observability")

_JOB_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0)


class DatabaseCollector:
    """Families read from the database at each scrape: three short queries (jobs by state and
    queue; start and finish times of jobs finished in the window; live workers), all or nothing."""

    def __init__(self, scrape_errors: Counter, window_s: int) -> None:
        self.scrape_errors = scrape_errors
        self.window_s = window_s

    def _families(self) -> dict[str, GaugeMetricFamily | GaugeHistogramMetricFamily]:
        hours = f"{self.window_s / 3600:g} h"
        return {
            "jobs": GaugeMetricFamily(
                "modelpress_jobs", "Jobs in the database by state (every state, 0 included).", labels=["state"]
            ),
            "queue": GaugeMetricFamily(
                "modelpress_queue_depth",
                "Jobs queued (waiting for a worker) per queue, from the database.",
                labels=["queue"],
            ),
            "duration": GaugeHistogramMetricFamily(
                "modelpress_job_duration_seconds",
                "Run time (finished_at - started_at of the last attempt) of the jobs that finished "
                f"in the last {hours}, "
                "by the job's first step method and its final state. A sliding window, not a counter: "
                "use histogram_quantile on the buckets directly, without rate().",
                labels=["method", "state"],
            ),
            "workers": GaugeMetricFamily(
                "modelpress_workers",
                "Live workers (registry rows renewed in the last three reconcile intervals) per queue they consume.",
                labels=["queue"],
            ),
        }

    def describe(self) -> Iterator[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        yield from self._families().values()

    def collect(self) -> Iterator[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        try:
            families = self._read()
        except Exception as e:  # the database is down or not migrated: the rest of the scrape still answers
            self.scrape_errors.inc()
            log.warning(
                "metrics: could not read the database (%s); job and worker metrics left out of this scrape",
                e.__class__.__name__,
            )
            return
        yield from families.values()

    def _read(self) -> dict[str, GaugeMetricFamily | GaugeHistogramMetricFamily]:
        from core import workers as registry
        from core.db import get_sessionmaker
        from core.jobs.schemas import JobStatus
        from core.queue import QUEUES
        from core.tables import Job, Worker

        since = datetime.now(UTC) - timedelta(seconds=self.window_s)
        with get_sessionmaker()() as s:
            counts = s.execute(select(Job.status, Job.queue, func.count()).group_by(Job.status, Job.queue)).all()
            finished = s.execute(
                select(Job.steps, Job.status, Job.started_at, Job.finished_at).where(
                    Job.finished_at >= since, Job.started_at.is_not(None)
                )
            ).all()
            worker_queues = s.scalars(select(Worker.queues).where(Worker.last_seen_at >= registry.live_since())).all()

        fam = self._families()
        by_state = dict.fromkeys(get_args(JobStatus), 0)
        depth = dict.fromkeys(QUEUES, 0)
        for status, queue, n in counts:
            by_state[status] = by_state.get(status, 0) + n
            if status == "queued":
                depth[queue] = depth.get(queue, 0) + n
        for state, n in sorted(by_state.items()):
            fam["jobs"].add_metric([state], n)
        for queue, n in sorted(depth.items()):
            fam["queue"].add_metric([queue], n)

        durations: dict[tuple[str, str], list[float]] = {}
        for steps, status, started_at, finished_at in finished:
            method = steps[0].get("method", "unknown") if steps and isinstance(steps[0], dict) else "unknown"
            durations.setdefault((method, status), []).append(max(0.0, (finished_at - started_at).total_seconds()))
        for (method, state), values in sorted(durations.items()):
            buckets = [(f"{b:g}", sum(v <= b for v in values)) for b in _JOB_BUCKETS] + [("+Inf", len(values))]
            fam["duration"].add_metric([method, state], buckets, sum(values))

        live = dict.fromkeys(QUEUES, 0)
        for queues in worker_queues:
            for q in queues:
                live[q] = live.get(q, 0) + 1
        for queue, n in sorted(live.items()):
            fam["workers"].add_metric([queue], n)
        return fam

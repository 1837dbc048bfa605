"""The webhook dispatcher: sends the deliveries that ended jobs left in the ``webhook_deliveries``
outbox (core/webhooks/repository.py). Every worker runs it in a thread of its main process (so the
embedded mode's worker subprocess does too); ``dispatch_once`` is one pass.

A pass takes due tries one at a time (a compare-and-set, so of several workers exactly one sends a
given try) and for each:

1. checks the URL again (core/webhooks/ssrf.py) and connects to the address that check returned,
   not to a new resolution of the name (DNS rebinding); a refused target fails the delivery at
   once, with the reason in ``last_error``; a name that does not resolve is retried;
2. POSTs the payload with ``Content-Type: application/json``, ``X-Modelpress-Event``,
   ``X-Modelpress-Delivery`` (the delivery id: the same on every retry, for de-duplication),
   ``X-Modelpress-Timestamp`` (unix seconds) and ``X-Modelpress-Signature: sha256=<hex>``
   (core/webhooks/signature.py), within ``MODELPRESS_WEBHOOK_TIMEOUT_S`` per network
   operation, without following redirects or using proxies from the environment;
3. records the outcome: a 2xx answer is ``delivered``; anything else (another status, a redirect,
   a timeout, a refused connection) is tried again after ``MODELPRESS_WEBHOOK_BACKOFF_S`` doubled
   per try (at most ``MODELPRESS_WEBHOOK_BACKOFF_MAX_S``), and after
   ``MODELPRESS_WEBHOOK_MAX_ATTEMPTS`` tries the delivery is ``failed``.

Delivery is at least once: a dispatcher that dies after the receiver got the request but before
it recorded the answer leaves the try to be repeated when its lease ends.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import httpx
from sqlalchemy.orm import Session

from core.config import Settings, get_settings
from core.db import get_sessionmaker
from core.webhooks import repository as repo
from core.webhooks import signature, ssrf

log = logging.getLogger("modelpress.webhooks")

USER_AGENT = "modelpress-webhooks"
# A try holds its row for this long past its start: longer than connect + write + read timeouts
# and name resolution together, so a live try is never taken by a second dispatcher.
_LEASE_MARGIN_S = 30.0


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    status_code: int | None = None
    error: str | None = None
    final: bool = False  # no point in trying again (a refused target)


def backoff_s(settings: Settings, attempt: int) -> float:
    """The wait after failed try number ``attempt`` (1-based): base, doubled per try, capped."""
    return min(settings.webhook_backoff_s * 2 ** (attempt - 1), settings.webhook_backoff_max_s)


def lease_s(settings: Settings) -> float:
    return 3 * settings.webhook_timeout_s + _LEASE_MARGIN_S


def _request(client: httpx.Client, target: ssrf.Target, body: bytes, headers: dict[str, str]) -> httpx.Request:
    """A POST to ``target.address`` that still names the URL's host: in the Host header and, for
    https, as the TLS server name (certificate checked against the host, not the address)."""
    url = httpx.URL(target.url)
    extensions = {}
    if target.scheme == "https" and target.host != target.address:
        extensions["sni_hostname"] = target.host
    return client.build_request(
        "POST",
        url.copy_with(host=target.address),
        content=body,
        headers={**headers, "Host": url.netloc.decode("ascii")},
        extensions=extensions,
    )


def send(client: httpx.Client, claim: repo.Claim, settings: Settings) -> Outcome:
    """One try of a claimed delivery."""
    try:
        target = ssrf.check(claim.url, settings.webhook_allow_networks)
    except ssrf.TargetRefused as e:
        return Outcome(False, error=f"refused: {e.reason}", final=True)
    except ssrf.TargetUnresolvable as e:
        return Outcome(False, error=str(e))
    except ValueError as e:
        return Outcome(False, error=f"refused: {e}", final=True)
    body = json.dumps(claim.payload, separators=(",", ":"), ensure_ascii=False).encode()
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Modelpress-Event": claim.event,
        "X-Modelpress-Delivery": claim.id,
        "X-Modelpress-Timestamp": timestamp,
        "X-Modelpress-Signature": signature.signature(signature.secret_for(claim.tenant_id), timestamp, body),
    }
    try:
        response = client.send(_request(client, target, body, headers), stream=True)
        response.close()  # the status is the answer; the body is not read
    except httpx.TimeoutException as e:
        return Outcome(False, error=f"timed out after {settings.webhook_timeout_s} s ({e.__class__.__name__})")
    except httpx.HTTPError as e:
        return Outcome(False, error=f"{e.__class__.__name__}: {e}"[:500])
    if 200 <= response.status_code < 300:
        return Outcome(True, status_code=response.status_code)
    error = f"HTTP {response.status_code}"
    if response.is_redirect:
        error += f" (redirect to {response.headers.get('location', '?')[:200]}; redirects are not followed)"
    return Outcome(False, status_code=response.status_code, error=error)


def dispatch_once(settings: Settings | None = None, limit: int = 100) -> int:
    """Send up to ``limit`` due tries; return how many were made."""
    settings = settings or get_settings()
    done = 0
    client: httpx.Client | None = None  # made on the first claim: most passes find nothing due
    try:
        with get_sessionmaker()() as s:
            while done < limit:
                claim = repo.claim_next(s, settings.webhook_max_attempts, lease_s(settings))
                if claim is None:
                    break
                done += 1
                if client is None:
                    client = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False)
                _try(s, client, claim, settings)
    finally:
        if client is not None:
            client.close()
    return done


def _try(s: Session, client: httpx.Client, claim: repo.Claim, settings: Settings) -> None:
    """Send one claimed try and record how it went."""
    outcome = send(client, claim, settings)
    final = outcome.final or claim.attempt >= settings.webhook_max_attempts
    wait = backoff_s(settings, claim.attempt)
    kept = repo.record(
        s,
        claim,
        delivered=outcome.delivered,
        final=final,
        status_code=outcome.status_code,
        error=outcome.error,
        retry_in_s=wait,
    )
    if outcome.delivered:
        log.info(
            "webhook %s of job %s: delivered (try %d, HTTP %s)",
            claim.id,
            claim.job_id,
            claim.attempt,
            outcome.status_code,
        )
    elif final:
        log.warning(
            "webhook %s of job %s: failed after try %d: %s", claim.id, claim.job_id, claim.attempt, outcome.error
        )
    else:
        log.info(
            "webhook %s of job %s: try %d failed (%s); next in %.1f s",
            claim.id,
            claim.job_id,
            claim.attempt,
            outcome.error,
            wait,
        )
    if not kept:
        log.warning("webhook %s: try %d outlived its lease; its outcome was not recorded", claim.id, claim.attempt)


def start_background(stop: threading.Event) -> threading.Thread:
    """Start the dispatcher thread (a worker's main process, once it is ready).

    The service key is checked first: a worker that would sign with a key of its own signs
    deliveries no receiver can verify. `modelpress worker` refuses to start without it already;
    this also stops a worker started some other way (``celery -A worker.celery_app worker``)."""
    from core.signing import MissingSecretKey, secret_key

    try:
        secret_key()
    except MissingSecretKey as e:
        log.critical("refusing to run: %s", e)
        # A worker_ready handler cannot stop Celery by raising (signal errors are only logged), and
        # nothing is in flight yet: leave at once, non-zero, so a supervisor sees the failure.
        os._exit(78)  # EX_CONFIG
    interval = get_settings().webhook_poll_interval_s

    def loop() -> None:
        while not stop.wait(interval):
            try:
                dispatch_once()
            except Exception:  # a database outage: try again next round
                log.exception("webhook dispatch pass failed")

    t = threading.Thread(target=loop, name="modelpress-webhooks", daemon=True)
    t.start()
    return t

"""Open a page in the machine's real Chromium (through Playwright) and report what went wrong.

``open_in_chromium(url)`` raises when Playwright or a ``chromium`` executable is missing: a test
that needs a browser fails loudly instead of being skipped.
"""

from __future__ import annotations

import shutil
from typing import Any

NAV_TIMEOUT_MS = 30_000


def open_in_chromium(url: str) -> dict[str, Any]:
    """Load ``url`` headless and return ``{"status", "title", "console_errors", "page_errors",
    "failed_requests", "bad_responses", "dialogs", "text", "svg_count"}``.

    ``console_errors`` holds console messages of type error or warning (``"type: text"``),
    ``page_errors`` uncaught exceptions, ``failed_requests`` requests that got no response,
    ``bad_responses`` responses with status >= 400 and ``dialogs`` any alert/confirm/prompt the
    page opened (dismissed). ``status`` is the main response's status (None when the browser gives
    none)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # pragma: no cover - the environment is broken, say so
        raise RuntimeError("playwright is not installed: pip install playwright") from exc
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise RuntimeError("no chromium executable on PATH (Debian: apt-get install chromium)")

    console: list[str] = []
    page_errors: list[str] = []
    failed: list[str] = []
    bad: list[str] = []
    dialogs: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on(
                "console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
            )
            page.on("pageerror", lambda e: page_errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
            page.on("response", lambda r: bad.append(f"{r.status} {r.url}") if r.status >= 400 else None)

            def on_dialog(d) -> None:  # noqa: ANN001
                dialogs.append(f"{d.type}: {d.message}")
                d.dismiss()

            page.on("dialog", on_dialog)
            response = page.goto(url, wait_until="load", timeout=NAV_TIMEOUT_MS)
            # Let late console messages and subresource failures arrive.
            page.wait_for_load_state("networkidle", timeout=NAV_TIMEOUT_MS)
            result = {
                "status": response.status if response is not None else None,
                "title": page.title(),
                "text": page.inner_text("body"),
                "svg_count": page.locator("svg").count(),
            }
        finally:
            browser.close()
    return {
        **result,
        "console_errors": console,
        "page_errors": page_errors,
        "failed_requests": failed,
        "bad_responses": bad,
        "dialogs": dialogs,
    }

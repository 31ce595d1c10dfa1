"""Headless Chromium for tests that check a page after its script ran (skipped without a browser)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars"]


def chromium() -> str | None:
    """The Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def require_chromium() -> str:
    browser = chromium()
    if browser is None:
        pytest.skip("chromium not installed: no `chromium` on PATH or /usr/bin/chromium (apt-get install chromium); "
                    "the page was not rendered")
    return browser


def dump_dom(page: Path, profile: Path, *, query: str = "", budget_ms: int = 5000) -> str:
    """The page's DOM after its scripts ran and its images loaded (``--dump-dom``), opened from disk
    with ``?q=query`` appended when given."""
    url = page.resolve().as_uri() + (f"?q={query}" if query else "")
    cmd = [require_chromium(), *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
           "--dump-dom", url]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"headless chromium did not finish {page.name} within 90 s")
    assert proc.returncode == 0 and "<body" in proc.stdout, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


def screenshot(page: Path, out: Path, profile: Path, *, size: str = "1200,1600") -> Path:
    """A PNG screenshot of the page opened from disk."""
    cmd = [require_chromium(), *FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={size}",
           page.resolve().as_uri()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"headless chromium did not finish rendering {page.name} within 90 s")
    assert out.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return out

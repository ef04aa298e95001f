"""A real headless Chromium for tests of pages (Debian's ``chromium``).

Without it the browser tests are skipped and the run ends with a notice, unless ``CI`` is set:
then they fail (``.ci/run`` installs it when it is missing).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import pytest
from databases import in_ci

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


@dataclass
class BrowserState:
    skipped: int = 0


browser_state = BrowserState()


def chromium() -> str:
    """The browser's path; skips (fails in CI) without one."""
    for name in CANDIDATES:
        path = shutil.which(name)
        if path is not None:
            return path
    if in_ci():
        pytest.fail(
            f"CI is set and no headless Chromium is installed ({', '.join(CANDIDATES)})", pytrace=False
        )
    browser_state.skipped += 1
    pytest.skip("no Chromium installed (apt-get install chromium)")


def dump_dom(url: str, wait_ms: int = 20000, timeout_s: float = 180.0) -> str:
    """The page's DOM after its scripts ran, as Chromium serialises it.

    Every host but the loopback address is unresolvable, so a page that needs the internet (a CDN)
    renders as it would on a machine without one.
    """
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",  # tests run as root in containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--virtual-time-budget={wait_ms}",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout

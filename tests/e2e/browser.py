"""Headless Chromium for the dashboard's end-to-end tests and lag measurement: Debian's
`chromium` driven by Playwright (never a browser that Playwright downloads)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
VENDOR = ROOT / "dashboards" / "web" / "vendor"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--autoplay-policy=no-user-gesture-required",
]


def chromium_path() -> str | None:
    """Debian's Chromium, or the one named by COLDCHAIN_CHROMIUM."""
    configured = os.environ.get("COLDCHAIN_CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if chromium_path() is None:
        return "Debian's chromium is not installed (apt-get install -y chromium)"
    if not (VENDOR / "uPlot.esm.js").is_file():
        return "the dashboard's front-end libraries are missing (npm ci --prefix dashboards)"
    return None

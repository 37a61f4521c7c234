"""Render a page in a real headless Chromium (Debian's ``chromium``) and read back what the browser saw."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

# runs after the page (and every image in it) has loaded; writes what the browser measured into the DOM,
# which --dump-dom then prints
PROBE = """<script>window.addEventListener('load', () => {
  const b = document.body, im = [...document.images];
  b.dataset.images = im.length;
  b.dataset.loaded = im.filter(i => i.complete && i.naturalWidth > 0).length;
  b.dataset.wider = im.filter(i => i.getBoundingClientRect().width > b.clientWidth + 1).length;
  b.dataset.backslashes = (b.innerText.match(/\\\\/g) || []).length;
  b.dataset.stars = (b.innerText.match(/\\*\\*/g) || []).length;
  b.dataset.headings = [...document.querySelectorAll('h2')].map(h => h.id + '=' + h.textContent).join('|');
  b.dataset.links = [...document.querySelectorAll('nav a')].filter(a => document.getElementById(a.getAttribute('href').slice(1))).length;
});</script>"""

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--virtual-time-budget=10000", "--window-size=1280,900"]


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def render(page: Path, work: Path) -> dict:
    """Load ``page`` (a copy with the probe added) in headless Chromium; the probe's measurements, as a dict."""
    exe = chromium()
    if exe is None:
        import pytest

        pytest.skip("no Chromium on this machine (make test installs Debian's chromium; here it could not)")
    copy = work / "probe.html"
    text = page.read_text(encoding="utf-8")
    copy.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    out = subprocess.run([exe, *FLAGS, f"--user-data-dir={work / 'profile'}", "--dump-dom", copy.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r"<body([^>]*)>", out.stdout)
    assert m, f"Chromium printed no page (exit {out.returncode}): {out.stderr[-500:]}"
    return {k: v for k, v in re.findall(r'data-([a-z]+)="([^"]*)"', m.group(1))}

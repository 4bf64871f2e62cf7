"""The HTML page in a real headless browser: it loads, renders the coloured tokens, logs nothing.

Skipped where no ``chromium`` is on the PATH (``make test-deps`` installs Debian's package when it
can).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mambalrp import visualize

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")


def render(page: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """Load ``page`` in headless chromium; return the screenshot, the rendered DOM and the log."""
    shot = tmp_path / f"{page.stem}.png"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
        f"--screenshot={shot}", "--dump-dom", "--window-size=1000,700", page.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return shot, done.stdout, done.stderr


def console_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_page_renders_in_chromium_without_console_messages(tmp_path):
    tokens = ["\u0120the", "\u0120plot", "\u0120is", "\u0120dull", "<script>alert(1)</script>", "\u010a", "\u0120end"]
    values = [[0.1, 0.3, -0.05, 0.9, -0.7, 0.0, 0.2]]
    page = tmp_path / "page.html"
    page.write_text(visualize.html_document([tokens], values, row_labels=["row"], title="browser check"), encoding="utf-8")
    shot, dom, log = render(page, tmp_path)
    assert console_lines(log) == []
    # The DOM holds the tokens as text: the script token was not turned into an element.
    assert " dull" in dom and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and "<script>" not in dom
    assert "normalisation: <strong>row</strong>" in dom
    # The screenshot is not blank: it has the strong red of "dull" and the blue of the script token.
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (700, 1000) and pixels.std() > 0.02
    red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.35) & (pixels[..., 2] < 0.35)
    blue = (pixels[..., 2] > 0.9) & (pixels[..., 0] < 0.5) & (pixels[..., 1] < 0.5)
    assert red.sum() > 50 and blue.sum() > 50


def test_console_check_sees_script_errors(tmp_path):
    """The check above would notice a page that logs an error (a control, so it cannot pass vacuously)."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>missing();</script></body></html>")
    _, _, log = render(page, tmp_path)
    assert any("Uncaught ReferenceError" in line for line in console_lines(log))


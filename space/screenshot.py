"""Drive the Space in a real headless Chromium: upload a radiograph, wait for the findings bars, save a screenshot.

    python space/screenshot.py --model outputs/demo/final --image outputs/demo/phantoms/images/test/test-000002.png \\
        --out docs/images/space_demo.png

Uses the system Chromium (Debian: `apt-get install chromium`; or CHROMIUM_PATH) through Playwright's Python client;
no browser is downloaded. The tests use the same helpers. Not part of the Space itself (push_to_hub leaves it out).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any


if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BAR_SELECTOR = "#bars svg .mark-rect path"
FILE_INPUT = "#upload input[type=file]"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str:
    """The Chromium executable: CHROMIUM_PATH, else the first of chromium / chromium-browser / google-chrome."""
    configured = os.environ.get("CHROMIUM_PATH")
    if configured:
        if not Path(configured).is_file():
            raise FileNotFoundError(f"CHROMIUM_PATH={configured}: no such file.")
        return configured
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError(
        "no Chromium found (looked for CHROMIUM_PATH and " + ", ".join(CHROMIUM_NAMES) + "); on Debian or Ubuntu "
        "install it with `apt-get install -y chromium`."
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_browser(playwright: Any) -> Any:
    """Headless system Chromium (no sandbox: CI containers run as root)."""
    return playwright.chromium.launch(executable_path=find_chromium(), headless=True, args=["--no-sandbox"])


def open_app(browser: Any, url: str, timeout_ms: int = 60_000) -> Any:
    """A page showing the app, ready for an upload."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
    page.wait_for_selector(FILE_INPUT, state="attached", timeout=timeout_ms)
    return page


def upload(page: Any, path: str | os.PathLike, timeout_ms: int = 30_000) -> None:
    """Upload one file through the file picker, clearing an earlier upload first."""
    clear = page.locator("#upload button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.wait_for_selector(FILE_INPUT, state="attached", timeout=timeout_ms)
    page.set_input_files(FILE_INPUT, os.fspath(path))


def wait_for_bars(page: Any, count: int, timeout_ms: int = 60_000) -> int:
    """Wait until the bar plot shows `count` bars; returns the number drawn."""
    page.wait_for_function(
        "([selector, count]) => document.querySelectorAll(selector).length === count",
        arg=[BAR_SELECTOR, count],
        timeout=timeout_ms,
    )
    return page.locator(BAR_SELECTOR).count()


def wait_for_error(page: Any, text: str, timeout_ms: int = 30_000) -> str:
    """Wait for an error toast containing `text`; returns the toast's text."""
    toast = page.locator(".toast-body.error", has_text=text)
    toast.first.wait_for(state="visible", timeout=timeout_ms)
    return toast.first.inner_text()


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="CheXficient folder (default: CHEXFICIENT_MODEL or the demo).")
    parser.add_argument("--llava-model", default=None, help="Optional LLaVA-Rad folder (adds the report tab).")
    parser.add_argument("--image", required=True, help="Radiograph to upload (PNG, JPEG or DICOM).")
    parser.add_argument("--out", default="docs/images/space_demo.png", help="Screenshot file.")
    args = parser.parse_args(argv)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from playwright.sync_api import sync_playwright

    from space.app import CheXficientSpace, build_demo, launch

    demo = build_demo(args.model, args.llava_model)
    launch(demo, server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = launch_browser(playwright)
            page = open_app(browser, demo.local_url)
            upload(page, args.image)
            bars = wait_for_bars(page, len(CheXficientSpace(args.model).default_findings))
            page.wait_for_timeout(500)  # let the bar animation settle
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        demo.close()
    print(f"{bars} bars drawn; wrote {out}")
    return out


if __name__ == "__main__":
    main()

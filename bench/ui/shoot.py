"""Take screenshots of Prefect UI pages with Playwright and a headless Chromium.

Runs in its own virtual environment (Playwright is not a merit dependency); called by
bench/ui/screenshots.py as ``PW_PYTHON bench/ui/shoot.py SPEC.json``. SPEC is

    {"chromium": "/usr/lib/chromium/chromium", "width": 1400, "height": 900,
     "shots": [{"url": ..., "path": "out.png", "wait_for": ["text", ...],
                "click": ["tab text", ...], "wait_after_click": ["text", ...],
                "scroll_to": "exact text", "scroll_to_selector": "css", "check_images": "css",
                "settle_ms": 1500, "refuse": ["Something went wrong", ...]}]}

For each shot: open the URL, wait until the page's network is idle and every `wait_for`
text is visible, click each `click` text (a tab, say) and wait again, scroll to
`scroll_to` (text) or `scroll_to_selector` (CSS; the heading of its section) if given
(it goes to the top of the view), count the `check_images` images that loaded (a line ``IMAGES path loaded/all``),
and save a viewport-sized PNG. A shot fails (exit code 1, the
page's visible text printed) when a `refuse` text shows or a `wait_for` text does not
within the timeout. Prints one line per shot: path, bytes, seconds.
"""

from __future__ import annotations

import json
import os
import sys
import time

from playwright.sync_api import TimeoutError as PWTimeout
from playwright.sync_api import sync_playwright

TIMEOUT_MS = 60_000
SCROLL_TO_SECTION = """e => {
  let node = e.closest('p') || e;
  for (let s = node.previousElementSibling; s; s = s.previousElementSibling) {
    if (/^H[1-4]$/.test(s.tagName)) { node = s; break; }
  }
  node.scrollIntoView({block: 'start'});
}"""


def _visible(page, text: str):
    return page.get_by_text(text, exact=False).first


def shoot(page, shot: dict) -> None:
    t0 = time.monotonic()
    page.goto(shot["url"], wait_until="networkidle", timeout=TIMEOUT_MS)
    try:
        for text in shot.get("wait_for", []):
            _visible(page, text).wait_for(state="visible", timeout=TIMEOUT_MS)
        for text in shot.get("click", []):
            target = page.get_by_role("tab", name=text)
            if target.count() == 0:
                target = _visible(page, text)
            target.first.click(timeout=TIMEOUT_MS)
            page.wait_for_load_state("networkidle", timeout=TIMEOUT_MS)
        for text in shot.get("wait_after_click", []):
            _visible(page, text).wait_for(state="visible", timeout=TIMEOUT_MS)
    except PWTimeout as e:
        body = page.inner_text("body")[:3000]
        raise SystemExit(f"{shot['path']}: {e.message.splitlines()[0]}\n--- page text ---\n{body}") from None
    page.wait_for_timeout(shot.get("settle_ms", 1500))  # charts and graphs animate in
    for text in shot.get("refuse", []):
        if page.get_by_text(text, exact=False).count():
            body = page.inner_text("body")[:3000]
            raise SystemExit(f"{shot['path']}: the page shows {text!r}\n--- page text ---\n{body}")
    if shot.get("scroll_to"):  # that text (an exact match, else the first containing it) at the top
        target = page.get_by_text(shot["scroll_to"], exact=True)
        if target.count() == 0:
            target = page.get_by_text(shot["scroll_to"], exact=False)
        target.first.evaluate("e => e.scrollIntoView({block: 'start'})")
        page.wait_for_timeout(800)
    if shot.get("scroll_to_selector"):  # the heading of the section holding the first match, else the match
        target = page.locator(shot["scroll_to_selector"])
        if target.count():
            target.first.evaluate(SCROLL_TO_SECTION)
            page.wait_for_timeout(800)
    if shot.get("check_images"):  # <img> in the page that loaded (naturalWidth > 0) / all
        sizes = page.locator(shot["check_images"]).evaluate_all("els => els.map(e => e.naturalWidth)")
        print(f"IMAGES {shot['path']} {sum(1 for w in sizes if w > 0)}/{len(sizes)}", flush=True)
    if shot.get("dump_text"):
        print(page.inner_text("body"))
    page.screenshot(path=shot["path"], full_page=False)
    print(f"{shot['path']}: {os.path.getsize(shot['path'])} bytes, {time.monotonic() - t0:.1f} s", flush=True)


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=spec["chromium"], headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        context = browser.new_context(viewport={"width": spec.get("width", 1400), "height": spec.get("height", 900)},
                                      color_scheme="light")
        page = context.new_page()
        try:
            for shot in spec["shots"]:
                shoot(page, shot)
        finally:
            browser.close()


if __name__ == "__main__":
    main()

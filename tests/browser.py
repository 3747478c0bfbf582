"""Headless Chromium for the browser tests: Playwright (PyPI) driving the system Chromium.

No browser download: Playwright's Python package launches the Chromium that `apt-get install chromium` put on
the machine (`executable_path`; .ci/run installs it). Each session gets a fresh profile and collects the
page's uncaught exceptions and console errors, so tests can assert that the pack's own files raised none.

    with chromium_page(width=1600, height=1100) as session:
        page = session.page                           # a playwright.sync_api.Page
        page.goto(server.url)
        wait_for(page, "!!window.app?.graph", timeout=90)
        page.get_by_test_id("queue-button").click()
        page.screenshot(path="shot.png")

Waits are on page states (`wait_for`, Playwright's auto-waiting locators), never on fixed sleeps.
"""
import contextlib
import os
import shutil

# Without the background-networking flags Chromium keeps trying to reach Google services and floods the log
# with refused connections on a machine that only reaches package registries.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
                 "--disable-dev-shm-usage"]


def find_chromium():
    """The Chromium binary: $DOPSD_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("DOPSD_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Session:
    """The page plus what it reported: `errors()` lists uncaught exceptions and console errors, in order."""

    def __init__(self, page):
        self.page = page
        self.exceptions = []
        self.console_errors = []
        self.dialogs = []
        page.on("pageerror", lambda exc: self.exceptions.append(f"{exc.name}: {exc.message}\n{exc.stack or ''}"))
        page.on("console", self._on_console)
        page.on("dialog", self._on_dialog)

    def _on_console(self, msg):
        if msg.type == "error":
            loc = msg.location or {}
            self.console_errors.append(f"{msg.text} ({loc.get('url', '')})")

    def _on_dialog(self, dialog):
        # e.g. the frontend's "leave with unsaved changes?" on reload: accept, as a user clicking through would
        self.dialogs.append(dialog.message)
        dialog.accept()

    def errors(self):
        return self.exceptions + self.console_errors


@contextlib.contextmanager
def chromium_page(width=1600, height=1100, binary=None):
    """A Session on a fresh headless Chromium page; closes everything on exit."""
    from playwright.sync_api import sync_playwright

    binary = binary or find_chromium()
    if not binary:
        raise RuntimeError("no Chromium on this machine (apt-get install chromium)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=binary, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
            yield Session(context.new_page())
        finally:
            browser.close()


def wait_for(page, expression, timeout=60.0, message="", polling=250):
    """Waits until the JS expression is truthy in the page and returns its JSON value. The expression may use
    `await` values only through promises it returns. Raises TimeoutError that names `message` and the last value."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        handle = page.wait_for_function(f"() => ({expression})", timeout=timeout * 1000, polling=polling)
    except PlaywrightTimeout:
        try:
            last = page.evaluate(f"() => ({expression})")
        except Exception as e:  # noqa: BLE001  (for the message only)
            last = f"JS error: {e}"
        raise TimeoutError(f"{message or 'condition'} not met within {timeout:.0f} s: {expression[:200]}"
                           f" (last value: {str(last)[:500]})") from None
    return handle.json_value()

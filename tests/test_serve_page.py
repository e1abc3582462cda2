"""The page at GET /, in a real headless Chromium against a real `gitcap serve`.

Needs Debian's chromium and chromium-driver (`.ci/run` installs them); skipped with a
reason where they are missing. Every run saves its screenshots into tmp_path. The README's
picture comes from the same test on the trained demo model:

    GITCAP_PAGE_CHECKPOINT=gitcap-demo GITCAP_PAGE_SCREENSHOT=docs/serve-page.png \
        pytest tests/test_serve_page.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)"),
]
webdriver = pytest.importorskip("selenium.webdriver")
httpx = pytest.importorskip("httpx")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from support.serve_fixtures import running_server  # noqa: E402

API_KEY = "page-test-key"
QUESTION = "what color is the circle?"
PHONE_WIDTH = 390


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,1100", "--hide-scrollbars"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def _api(server_url: str):
    return httpx.Client(base_url=server_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)


def _upload(driver, path: Path) -> None:
    driver.find_element(By.ID, "file-input").send_keys(str(path))


def _text(driver, css: str) -> str:
    """An element's exact text (Selenium's .text trims and collapses whitespace)."""
    return driver.find_element(By.CSS_SELECTOR, css).get_attribute("textContent")


def _no_horizontal_overflow(driver) -> None:
    widths = driver.execute_script(
        "const d = document.documentElement;"
        "const wide = [...document.querySelectorAll('body *')].filter(e => {"
        "  const r = e.getBoundingClientRect(); return r.width > 0 && (r.right > d.clientWidth + 0.5 || r.left < -0.5);"
        "}).map(e => e.id || e.className || e.tagName);"
        "return {scroll: d.scrollWidth, client: d.clientWidth, inner: window.innerWidth, wide: wide};")
    assert widths["inner"] == PHONE_WIDTH, widths
    assert widths["scroll"] <= widths["client"], f"the page scrolls sideways at {PHONE_WIDTH} px: {widths}"
    assert not widths["wide"], f"elements stick out at {PHONE_WIDTH} px: {widths['wide']}"


def _set_viewport_width(driver, width: int, height: int = 844) -> None:
    # The CSS viewport exactly `width` px wide, as on a phone (a window size would include chrome).
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": True})


@pytest.fixture
def keyed_server(tiny_captioner):
    """The tiny captioner (or GITCAP_PAGE_CHECKPOINT) behind a real server that wants an API key."""
    captioner, options = tiny_captioner, {}
    if os.environ.get("GITCAP_PAGE_CHECKPOINT"):
        from gitcli.model.checkpoint import load_checkpoint

        checkpoint = Path(os.environ["GITCAP_PAGE_CHECKPOINT"]).resolve()
        captioner, options["model_id"] = load_checkpoint(checkpoint).eval(), checkpoint.name
    with running_server(captioner, api_key=API_KEY, **options) as server:
        yield server


def test_page_captions_and_answers_like_the_api(keyed_server, browser, tmp_path):
    from gitcli.data.synthetic import make_scene

    url = keyed_server.url
    scene = tmp_path / "scene.png"
    make_scene(0, 4).image.save(scene)  # three shapes, one a circle
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these bytes are no picture\n" * 20)
    with _api(url) as api:
        image = scene.read_bytes()
        caption = api.post("/v1/caption", files={"image": ("scene.png", image, "image/png")}).json()["caption"]
        answer = api.post("/v1/ask", files={"image": ("scene.png", image, "image/png")},
                          data={"question": QUESTION}).json()["answer"]
        refused = api.post("/v1/caption", files={"image": ("notes.png", not_an_image.read_bytes(), "image/png")})
        assert refused.status_code == 400
        refusal = refused.json()["error"]["message"]
    assert caption and answer

    wait = WebDriverWait(browser, 30)
    browser.get(url + "/")
    # Without a key the server answers 401: the page asks for one, then retries the call.
    _upload(browser, scene)
    wait.until(lambda d: d.find_element(By.ID, "key-card").is_displayed())
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "key-button").click()
    wait.until(lambda d: d.find_element(By.ID, "caption").get_attribute("data-done"))
    assert _text(browser, "#caption") == caption
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert not browser.find_element(By.ID, "key-card").is_displayed()
    assert browser.execute_script("return document.getElementById('preview').naturalWidth") == 64

    browser.find_element(By.ID, "question").send_keys(QUESTION)
    browser.find_element(By.ID, "ask-button").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answers li[data-done='1']"))
    assert _text(browser, "#answers li .q") == QUESTION
    assert _text(browser, "#answers li .a") == answer
    browser.save_screenshot(str(tmp_path / "serve-page.png"))
    if os.environ.get("GITCAP_PAGE_SCREENSHOT"):
        shutil.copyfile(tmp_path / "serve-page.png", os.environ["GITCAP_PAGE_SCREENSHOT"])

    _set_viewport_width(browser, PHONE_WIDTH)
    _no_horizontal_overflow(browser)
    browser.save_screenshot(str(tmp_path / "serve-page-phone.png"))

    # A file the server refuses: its own message, shown as it is; no question about it.
    _upload(browser, not_an_image)
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert _text(browser, "#error") == refusal
    assert not browser.find_elements(By.CSS_SELECTOR, "#answers li")
    assert not browser.find_element(By.ID, "ask-button").is_enabled()
    _no_horizontal_overflow(browser)


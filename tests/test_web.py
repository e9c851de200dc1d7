"""The web page in a real browser (Debian's Chromium, headless, driven by Playwright) against the tiny app.

The app is mounted under a route prefix, as a reverse proxy would mount it, so the page must use
relative URLs throughout.
"""

import os
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import deploy, tiny_args
from pipeline.params import DEFAULT_NEGATIVE_PROMPT

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium (apt-get install chromium)"
)

SCREENSHOT = Path(__file__).resolve().parent.parent / "test-artifacts" / "web.png"
HOSTILE_PROMPT = "<img src=x onerror=alert(1)>"
PINNED_NOTE = "由服务器命令行参数固定（界面参数的优先级低于命令行参数）"

# Resolves once the <video> knows its duration; rejects on a media error instead of hanging.
VIDEO_METADATA = """video => new Promise((resolve, reject) => {
  const report = () => resolve({duration: video.duration, readyState: video.readyState});
  const fail = () => reject(new Error(`video error ${video.error?.code}: ${video.error?.message}`));
  if (video.error) fail();
  if (video.readyState >= 1) report();
  video.addEventListener("loadedmetadata", report, {once: true});
  video.addEventListener("error", fail, {once: true});
  setTimeout(() => reject(new Error("no video metadata after 30 s")), 30000);
})"""

# Keeps every text the progress line shows, so the test can see what flashed by during the run.
RECORD_PROGRESS = """() => {
  window.progressTexts = [];
  const line = document.querySelector("#progress-text");
  new MutationObserver(() => window.progressTexts.push(line.textContent))
    .observe(line, {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def web_app(serve_instance, tmp_path_factory):
    from ray import serve

    app = deploy(serve_instance, "webtest", tiny_args(tmp_path_factory.mktemp("web-outputs"), pins={"sample_shift": 5.0}))
    yield app
    serve.delete(app.name)


@pytest.fixture(scope="module")
def browser():
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        yield browser
        browser.close()


@contextmanager
def watched_page(browser, url: str):
    """A fresh browser context (so no remembered language) on the page at `url`; fails on any dialog or JS error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = []
    page.on("dialog", lambda dialog: (problems.append(f"dialog fired: {dialog.message}"), dialog.dismiss()))
    page.on("pageerror", lambda error: problems.append(f"uncaught error: {error}"))
    try:
        page.goto(f"{url}/")
        expect(page.locator("#sample_steps")).to_be_visible(timeout=30_000)  # config read, form built
        yield page
    finally:
        context.close()
    assert not problems


@pytest.fixture
def page(browser, web_app):
    with watched_page(browser, web_app.url) as page:
        yield page


def generate(page, prompt: str, steps: int) -> list[str]:
    """The cheapest video from the form, waited for; returns every text the progress line showed."""
    page.fill("#prompt", prompt)
    page.fill("#sample_steps", str(steps))
    page.fill("#frame_num", "5")
    page.select_option("#size", "624*624")
    page.evaluate(RECORD_PROGRESS)
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text("已完成", timeout=120_000)
    return page.evaluate("window.progressTexts")


def test_generates_plays_and_lists_a_video_with_a_hostile_prompt_shown_as_text(page, web_app):
    seen = generate(page, HOSTILE_PROMPT, 3)
    assert page.locator("#progress").evaluate("bar => bar.value") == 100
    assert any(re.search(r"去噪 · 第 \d/3 步", text) for text in seen), seen
    assert any("约剩" in text for text in seen), seen

    media = page.locator("#video").evaluate(VIDEO_METADATA)
    assert media["duration"] > 0 and media["readyState"] >= 1, media
    href = page.locator("#download").get_attribute("href")
    job_id = re.fullmatch(r"v1/videos/(video_[0-9a-f]{24})/content", href).group(1)

    expect(page.locator("#job-prompt")).to_have_text(HOSTILE_PROMPT)
    item = page.locator(f'#history [data-job-id="{job_id}"]')
    expect(item.locator(".prompt-text")).to_have_text(HOSTILE_PROMPT)
    expect(item.locator(".badge")).to_have_text("已完成")
    expect(item).to_contain_text("624*624 · 5 帧 · 3 步")
    expect(item.locator("img")).to_have_js_property("complete", True)
    assert item.locator("img").evaluate("img => img.naturalWidth") > 0
    assert page.locator("img[src='x']").count() == 0  # the prompt never became an element

    page.fill("#prompt", "")
    page.fill("#sample_steps", "50")
    item.get_by_role("button", name="用这些设置再次生成").click()
    expect(page.locator("#prompt")).to_have_value(HOSTILE_PROMPT)
    expect(page.locator("#sample_steps")).to_have_value("3")
    with web_app.client() as client:
        seed = client.get(f"/v1/videos/{job_id}").json()["seed"]
    expect(page.locator("#seed")).to_have_value(str(seed))  # up to 2^63-1: kept digit for digit

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)


def test_pinned_control_is_locked_at_the_server_value(page):
    shift = page.locator("#sample_shift")
    expect(shift).to_be_disabled()
    expect(shift).to_have_value("5")
    expect(page.locator('[data-note="sample_shift"]')).to_have_text(PINNED_NOTE)
    expect(page.locator("#sample_guide_scale")).to_be_enabled()
    expect(page.locator("#sample_guide_scale")).to_have_value("6")
    expect(page.locator("#negative_prompt")).to_have_attribute("placeholder", DEFAULT_NEGATIVE_PROMPT)
    expect(page.locator("#lora-fields")).to_be_hidden()  # this server serves no LoRA adapters


def test_field_error_from_the_api_is_shown_next_to_its_field(page):
    page.fill("#prompt", "a red fox in snow")
    page.fill("#frame_num", "7")
    page.click("#generate")
    error = page.locator('[data-field="frame_num"] [data-field-error="frame_num"]')
    expect(error).to_be_visible()
    expect(error).to_contain_text("4n+1")
    expect(page.locator("#form-error")).to_be_hidden()
    page.fill("#frame_num", "9")
    expect(error).to_be_hidden()


def test_english_toggle_switches_labels_and_is_remembered(page):
    label = page.locator("label[for=sample_steps]")
    expect(label).to_have_text("扩散步数")
    page.click("#lang-toggle")
    expect(label).to_have_text("Sampling steps")
    expect(page.locator("#generate")).to_have_text("Generate video")
    expect(page.locator('[data-note="sample_shift"]')).to_contain_text("command-line")
    expect(page.locator("html")).to_have_attribute("lang", "en")
    page.reload()
    expect(label).to_have_text("Sampling steps")


def test_demo_banner_shows_and_the_prefix_works_without_a_trailing_slash(page, web_app):
    page.goto(web_app.url)
    banner = page.locator("#demo-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("演示模型：随机权重，并非 Wan2.1")


KEYS_ENV = "WAN_T2V_TEST_WEB_KEYS"
KEY = "page-key-0123456789"


@pytest.fixture(scope="module")
def keyed_app(serve_instance, tmp_path_factory):
    from ray import serve

    os.environ[KEYS_ENV] = KEY
    try:
        app = deploy(serve_instance, "webkeyed", tiny_args(tmp_path_factory.mktemp("web-keyed"), auth={"api_keys_env": KEYS_ENV}))
    finally:
        del os.environ[KEYS_ENV]
    yield app
    serve.delete(app.name)


def test_with_api_keys_the_page_asks_for_one_then_streams_plays_and_lists_with_it(browser, keyed_app):
    """Every request of the page carries the key: the config, the job, its event stream, the video, thumbnails, cancel."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems = []
    page.on("pageerror", lambda error: problems.append(f"uncaught error: {error}"))
    page.goto(f"{keyed_app.url}/")
    expect(page.locator("#form-error")).to_contain_text("需要 API 密钥")
    expect(page.locator("#generate")).to_be_disabled()

    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")  # change: stored, page reloaded with it
    expect(page.locator("#sample_steps")).to_be_visible(timeout=30_000)
    assert page.evaluate("localStorage.getItem('wan-t2v.api_key')") == KEY
    seen = generate(page, "a keyed fox", 2)
    assert any(re.search(r"去噪 · 第 \d/2 步", text) for text in seen), seen
    media = page.locator("#video").evaluate(VIDEO_METADATA)
    assert media["duration"] > 0, media
    assert page.locator("#download").get_attribute("href").startswith("blob:")
    thumbnail = page.locator("#history img").first
    expect(thumbnail).to_have_attribute("src", re.compile("^blob:"))
    assert thumbnail.evaluate("img => img.decode().then(() => img.naturalWidth)") > 0

    page.fill("#sample_steps", "100")
    page.click("#generate")
    expect(page.locator("#progress-text")).to_contain_text("去噪", timeout=60_000)
    with page.expect_response(lambda response: response.url.endswith("/cancel")) as cancel:
        page.click("#cancel")  # the race-free endpoint, never DELETE, and with the key
    assert (cancel.value.request.method, cancel.value.status) == ("POST", 200)
    expect(page.locator("#progress-text")).to_have_text("已取消")
    context.close()
    assert not problems

"""The demo page at `/`, driven in headless Chromium (Debian's chromium and chromium-driver): it streams a completion
equal to the API's and draws every step. Its screenshot is the one README.md shows: CAST_SCREENSHOT=PATH writes
it there (docs/demo-page.png), else to the test's temporary directory."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import openai
import pytest
from PIL import Image

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""'
MAX_TOKENS = 48
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,860")

pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def test_the_page_streams_the_apis_completion_and_draws_each_step(stack_factory, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url = stack_factory("reference").spec.http_url  # a trained pair: real code, and drafts that get accepted
    browser.get(f"{url}/")
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#policy option"))
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    # eagle2 drafts every step (cast may judge plain decoding faster on a busy CPU, and draw only bonus tokens)
    Select(browser.find_element(By.ID, "policy")).select_by_value("eagle2")
    for field, value in (("max-tokens", MAX_TOKENS), ("temperature", 0)):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(str(value))
    browser.find_element(By.ID, "generate").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 120).until(lambda b: status.text.startswith("done") or status.get_attribute("class"))
    assert status.text.startswith("done"), status.text

    shown = browser.execute_script("return document.getElementById('completion').textContent")
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        model = client.models.list().data[0].id
        expected = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                             extra_body={"cast": {"policy": "eagle2"}})
    assert shown == expected.choices[0].text
    steps = expected.model_extra["cast"]["stats"]["steps"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#steps .step svg")) == steps
    drafted = browser.find_elements(By.CSS_SELECTOR, "#completion .draft")
    bonus = browser.find_elements(By.CSS_SELECTOR, "#completion .bonus")
    assert len(drafted) + len(bonus) == expected.usage.completion_tokens
    assert drafted, "the reference pair's drafts should be accepted"
    assert browser.find_element(By.ID, "tokens").text == str(expected.usage.completion_tokens)

    path = Path(os.environ.get("CAST_SCREENSHOT", tmp_path / "demo-page.png"))
    screenshot = Image.open(io.BytesIO(browser.get_screenshot_as_png()))
    screenshot.convert("RGB").quantize(colors=64).save(path, optimize=True)  # small enough to commit
    assert path.stat().st_size > 0

"""The server's web page in a real headless browser (Debian's chromium + chromedriver through selenium): pick an
example video, ask, watch the answer stream in, ask a follow-up; upload a video and ask about it. Saves a
screenshot to tests/artifacts/serve_page.png. Skips, saying why, when selenium or the browser is missing."""

import importlib.util
import os

import pytest

from tests.test_serve import running_server, shared_assets

pytestmark = pytest.mark.xdist_group("serve")

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "artifacts")
WAIT_S = 120  # first answers compile the engine's programs on a loaded CPU


def _missing() -> str | None:
  if importlib.util.find_spec("selenium") is None:
    return "selenium is not installed (test extra)"
  for path in (CHROMIUM, CHROMEDRIVER):
    if not os.access(path, os.X_OK):
      return f"{path} is not installed (Debian packages chromium and chromium-driver)"
  return None


@pytest.fixture(scope="module")
def browser():
  reason = _missing()
  if reason:
    print(f"skipping the browser test: {reason}")
    pytest.skip(reason)
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service as DriverService

  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for flag in (
      "--headless=new",
      "--no-sandbox",
      "--disable-dev-shm-usage",
      "--disable-gpu",
      "--window-size=1200,800",
      "--no-first-run",
      "--disable-extensions",
      "--disable-background-networking",
  ):
    opts.add_argument(flag)
  driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=opts)
  yield driver
  driver.quit()


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
  assets = shared_assets(tmp_path_factory)
  with running_server(assets) as (url, service):
    yield dict(url=url, service=service, assets=assets)


def _ask(driver, question: str) -> str:
  """Types a question, waits for its streamed answer to finish; returns the answer bubble's text."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support import expected_conditions as ec
  from selenium.webdriver.support.ui import WebDriverWait

  before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
  box = driver.find_element(By.ID, "question")
  box.clear()
  box.send_keys(question)
  driver.find_element(By.ID, "ask").click()
  WebDriverWait(driver, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > before)
  WebDriverWait(driver, WAIT_S).until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
  errors = driver.find_elements(By.CSS_SELECTOR, ".msg.error")
  assert not errors, errors[0].text
  return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text


def test_page_pick_ask_follow_up_and_upload(browser, page_server):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import Select, WebDriverWait

  assets, service = page_server["assets"], page_server["service"]
  browser.get(page_server["url"] + "/")
  WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == "tiny-kangaroo")
  select = Select(browser.find_element(By.ID, "video-select"))
  assert [o.text for o in select.options] == ["(none)", "clip.mp4", "photo.png"]
  select.select_by_visible_text("clip.mp4")
  assert "clip.mp4" in browser.find_element(By.ID, "video-name").text
  browser.find_element(By.CSS_SELECTOR, "details summary").click()  # the settings
  for field, value in (("temperature", "0"), ("max-tokens", "6")):  # greedy: comparable with the chat API
    box = browser.find_element(By.ID, field)
    box.clear()
    box.send_keys(value)

  calls = service.batcher.stats.generate_calls
  first = _ask(browser, "What happens in the video?")
  expected, history = assets["chat"].chat(
      assets["video"], "What happens in the video?", num_frames=4, max_new_tokens=6, do_sample=False
  )
  assert service.batcher.stats.generate_calls == calls + 1
  assert first.strip() and first == expected.strip()  # the bubble's text, as the browser renders it
  follow_up = _ask(browser, "And then?")
  expected, _ = assets["chat"].chat(
      assets["video"], "And then?", list(history), num_frames=4, max_new_tokens=6, do_sample=False
  )
  assert follow_up.strip() and follow_up == expected.strip()  # the page sent the whole conversation
  assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
  pieces = [int(b.get_attribute("data-pieces")) for b in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")]
  assert min(pieces) >= 2, pieces  # the answers arrived as a stream of pieces, not in one response
  os.makedirs(ARTIFACTS, exist_ok=True)
  shot = os.path.join(ARTIFACTS, "serve_page.png")
  assert browser.save_screenshot(shot) and os.path.getsize(shot) > 1000

  # Upload: a new conversation about the uploaded file.
  browser.find_element(By.ID, "video-file").send_keys(assets["video"])
  WebDriverWait(browser, 30).until(lambda d: "uploaded" in d.find_element(By.ID, "status").text)
  assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
  assert _ask(browser, "What is in the uploaded clip?").strip()
  assert len(os.listdir(service.upload_dir)) == 1

"""The dashboard end to end in headless Chromium, against the test stack: every page renders without a
browser console error on an empty system, with every service down, and with a production model served by
Ray Serve (the predict form answers; the monitoring page shows that prediction without a reload).

Screenshots land in ``artifacts/screenshots/`` (not committed).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from jobs import classify as classify_job
from lib.data.rakuten import PRDTYPECODES
from lib.settings import PROJECT_ROOT

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)  # fmt: skip
SCREENSHOTS = PROJECT_ROOT / "artifacts" / "screenshots"
PAGES = {"predict": "/", "catalogue": "/catalogue", "training": "/training", "monitoring": "/monitoring"}
# The containers each page fills from its data callbacks: the page is ready when all have content.
FILLED = {
    "predict": ["#predict-result"],
    "catalogue": ["#catalogue-summary", "#catalogue-grid", "#classified-summary"],
    "training": ["#training-summary", "#training-run-details"],
    "monitoring": ["#monitoring-content"],
}
# Fast caches and refreshes, so a prediction shows up on the monitoring page within seconds.
FAST_DASHBOARD = {"RAKUTEN_DASH_CACHE_TTL_S": "1", "RAKUTEN_DASH_REFRESH_S": "2"}
START_TIMEOUT_S = 60
MAX_SHOT_HEIGHT = 6000
PAGE_TIMEOUT_S = 60
SERVE_READY = importlib.util.find_spec("serve.deploy") is not None


@pytest.fixture(autouse=True, scope="module")
def browser_installed() -> None:
    """A missing browser fails the suite (``make install`` installs it): a skip would hide the UI tests."""
    if not (CHROMEDRIVER.exists() and Path(CHROMIUM).exists()):
        pytest.fail(
            "Chromium and chromedriver are missing: `make install` (scripts/system_deps.sh) installs them"
        )


# Rendered when no request is pending, no component is loading and every graph has drawn.
RENDERED_JS = """
const filled = arguments[0].every(sel => {
  const el = document.querySelector(sel);
  return el && el.children.length > 0;
});
const loading = document.querySelectorAll('[data-dash-is-loading="true"]').length;
const graphs = [...document.querySelectorAll('.dash-graph')];
return filled && loading === 0 && graphs.every(g => g.querySelector('.main-svg'));
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def dashboard(overrides: dict[str, str], log: Path) -> Iterator[str]:
    """``python -m dash_app`` as a subprocess with the test stack's environment plus ``overrides``."""
    env = {**os.environ, **FAST_DASHBOARD, **overrides}
    env["PYTHONPATH"] = f"{PROJECT_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    url = f"http://{env.get('RAKUTEN_HOST', '127.0.0.1')}:{env['RAKUTEN_DASH_PORT']}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dash_app"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dashboard did not start at {url}:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}")
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver) -> list[dict]:
    """SEVERE browser console entries since the last call (reading the log empties it)."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_rendered(driver, page: str, timeout_s: float = PAGE_TIMEOUT_S) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(
        lambda d: d.execute_script(RENDERED_JS, FILLED[page])
    )


def wait_for_element(driver, selector: str, timeout_s: float = PAGE_TIMEOUT_S) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, selector)
    )


def screenshot(driver, name: str) -> Path:
    """The whole page (the window grows to the page's height for the shot)."""
    width = driver.get_window_size()["width"]
    height = driver.execute_script(
        "return Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)"
    )
    driver.set_window_size(width, min(height + 120, MAX_SHOT_HEIGHT))
    time.sleep(0.3)  # let plotly re-layout at the new size
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(width, 1000)
    return path


def visit(driver, base_url: str, page: str, shot: str) -> str:
    """Open a page, wait until it has rendered, check the console, save a screenshot; the page text."""
    console_errors(driver)  # drop entries from earlier pages
    driver.get(base_url + PAGES[page])
    wait_rendered(driver, page)
    errors = console_errors(driver)
    assert not errors, f"{page}: browser console errors {errors}"
    screenshot(driver, shot)
    return driver.find_element("tag name", "body").text


# --- an empty system and a stopped one ------------------------------------------------------------
def test_every_page_explains_an_empty_system(stack, s3, browser, tmp_path):
    from lib.data.storage import delete_prefix, ensure_buckets

    empty_bucket = "dash-empty-lake"
    ensure_buckets(s3, [empty_bucket])
    delete_prefix(s3, empty_bucket, "")
    namespace = f"dash-empty-{uuid.uuid4().hex[:8]}"
    overrides = {
        "RAKUTEN_DASH_PORT": str(free_port()),
        "RAKUTEN_BUCKET_LAKE": empty_bucket,
        "RAKUTEN_MLFLOW_EXPERIMENT": namespace,
        "RAKUTEN_REGISTERED_MODEL_NAME": namespace,
        "RAKUTEN_SERVE_PORT": str(free_port()),
    }
    expected = {
        "predict": "Fill in a title",
        "catalogue": "No products yet",
        "training": "No production model yet",
        "monitoring": "No prediction logged",
    }
    with dashboard(overrides, tmp_path / "dash.log") as url:
        for page, message in expected.items():
            assert message in visit(browser, url, page, f"empty-{page}")
        # Serve is not deployed: the form says so instead of failing.
        visit(browser, url, "predict", "empty-predict")
        text = submit_prediction(browser, "Chaise de jardin", None)
        assert "prediction service (Ray Serve) is not reachable" in text
        assert not console_errors(browser)
        screenshot(browser, "empty-predict-submitted")


def test_every_page_explains_services_that_are_down(browser, tmp_path):
    overrides = {f"RAKUTEN_{name}_PORT": str(free_port()) for name in ("DASH", "S3", "MLFLOW", "SERVE")}
    with dashboard(overrides, tmp_path / "dash.log") as url:
        for page in ("catalogue", "training", "monitoring"):
            assert "is not reachable" in visit(browser, url, page, f"down-{page}")
        visit(browser, url, "predict", "down-predict")


# --- a production model behind Ray Serve ----------------------------------------------------------
def submit_prediction(driver, designation: str, image: Path | None) -> str:
    """Fill the predict form, submit, wait for the answer; the result area's text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    field = driver.find_element(By.ID, "predict-designation")
    field.clear()
    field.send_keys(designation)
    if image is not None:
        driver.find_element(By.CSS_SELECTOR, "#predict-image input[type=file]").send_keys(str(image))
        WebDriverWait(driver, PAGE_TIMEOUT_S).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, "#predict-preview img")
        )
    driver.find_element(By.ID, "predict-submit").click()
    WebDriverWait(driver, PAGE_TIMEOUT_S, poll_frequency=0.2).until(
        lambda d: (
            "Fill in a title" not in d.find_element(By.ID, "predict-result").text
            and d.find_elements(By.CSS_SELECTOR, "#predict-result > div > *")
        )
    )
    wait_rendered(driver, "predict")
    return driver.find_element(By.ID, "predict-result").text


@pytest.fixture(scope="module")
def served(production_model, stack) -> Iterator:
    """Ray Serve deployed on the test stack with the production model (prediction log flushed often)."""
    if not SERVE_READY:
        pytest.skip("serve/deploy.py is not there yet: the Serve app is needed for predict/monitoring")
    from serve.deploy import deploy, undeploy

    settings = stack.model_copy(update={"predlog_flush_s": 1.0})
    assert deploy(settings, echo=lambda *_: None), "Serve is up but serves no model"
    try:
        yield settings
    finally:
        undeploy(settings, echo=lambda *_: None)


@pytest.fixture(scope="module")
def live_dashboard(stack, tmp_path_factory) -> Iterator[str]:
    """The dashboard on the test stack itself (its own port from the test settings)."""
    log = tmp_path_factory.mktemp("dash") / "dash.log"
    with dashboard({"RAKUTEN_DASH_PORT": str(stack.dash_port)}, log) as url:
        yield url


@pytest.fixture(scope="module")
def sample_product(production_model, stack, tmp_path_factory) -> dict:
    """A catalogue product with its image saved to a local file (for the upload field)."""
    from lib.data import lake
    from lib.data.storage import get_bytes, s3_client

    client = s3_client(stack)
    products = lake.current_products(client, stack, ["designation_clean", "image_key", "has_image"])
    row = products[products["has_image"]].iloc[0]
    path = tmp_path_factory.mktemp("upload") / "product.jpg"
    path.write_bytes(get_bytes(client, stack.bucket_lake, row["image_key"]))
    return {"designation": row["designation_clean"], "image": path}


@pytest.fixture(scope="module")
def prediction(served, live_dashboard, browser, sample_product) -> dict:
    """A catalogue product submitted through the predict form: the page's text and answer."""
    from selenium.webdriver.common.by import By

    visit(browser, live_dashboard, "predict", "predict-form")
    text = submit_prediction(browser, sample_product["designation"], sample_product["image"])
    code = browser.find_element(By.CSS_SELECTOR, "#predict-class .code").text
    version = httpx.get(f"{served.serve_url}/health", timeout=5).json()["model_version"]
    return {"text": text, "code": code, "version": str(version)}


def test_predict_form_returns_a_class_and_similar_products(prediction, served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert int(prediction["code"]) in PRDTYPECODES, prediction["text"]
    assert f"v{prediction['version']}" in prediction["text"]
    # Similar products come from a second callback (the query is encoded in the dashboard process).
    WebDriverWait(browser, PAGE_TIMEOUT_S).until(
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "#predict-similar .tile")) == served.dash_similar_products
        )
    )
    wait_rendered(browser, "predict")
    assert not console_errors(browser)
    screenshot(browser, "predict")


def test_monitoring_shows_the_prediction_just_made(prediction, live_dashboard, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    console_errors(browser)
    browser.get(live_dashboard + PAGES["monitoring"])
    # No reload: the page's interval refreshes it once the log is flushed to the lake.
    WebDriverWait(browser, PAGE_TIMEOUT_S, poll_frequency=0.5).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#recent-predictions tbody tr")
    )
    wait_rendered(browser, "monitoring")
    newest = browser.find_element(By.CSS_SELECTOR, "#recent-predictions tbody tr").text
    assert prediction["code"] in newest and f"v{prediction['version']}" in newest
    assert not console_errors(browser)
    screenshot(browser, "monitoring")


def test_catalogue_and_training_pages_show_the_model(production_model, live_dashboard, browser, stack):
    # The training batch classified in bulk too: the catalogue page lists it with its submission file.
    classified = classify_job.run(stack, batch_id=production_model["manifest"].batch_id)
    catalogue = visit(browser, live_dashboard, "catalogue", "catalogue")
    assert f"{production_model['manifest'].accepted:,}" in catalogue
    assert browser.find_elements("css selector", "#catalogue-grid .tile img")
    summary = browser.find_element("css selector", "#classified-summary").text
    assert classified.batch_id in summary and f"v{classified.model_version}" in summary
    wait_for_element(browser, "#classified-detail .js-plotly-plot")
    training = visit(browser, live_dashboard, "training", "training")
    assert f"v{production_model['train'].version}" in training
    assert browser.find_elements("css selector", "#training-run-details img.confusion")

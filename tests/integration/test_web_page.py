"""The run's web page in a real headless Chromium against the real Serve app (hf engine, API key) on a
small finished run: sign-in, overview with curves, samples, side by side with a blind vote, and a
round that lands while the page is open. One app and one browser for the module; screenshots of
each view go to $IMM_PAGE_SCREENSHOTS when set (the README's: IMM_PAGE_SCREENSHOTS=docs/img)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import ray
from ray import serve
from test_serve_app import free_port, wait_healthy
from tiny_run import write_finished_round

from imm_ray.serve.deploy import start_serving
from imm_ray.serve.settings import LimitSettings, ServeSettings
from tiny_model import TINY_PROBLEMS

pytestmark = pytest.mark.slow
KEY = "page-key-7"
SCREENSHOTS = os.environ.get("IMM_PAGE_SCREENSHOTS")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
if not (CHROMIUM and DRIVER):
    pytest.skip("no chromium and chromedriver on PATH: `apt-get install chromium chromium-driver` "
                "(scripts/setup.sh does it as root) to run the page tests", allow_module_level=True)

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def page_run(tiny_model_dir, tmp_path_factory):
    """A finished run (baseline and one imm round) served by the Serve app with an API key."""
    run = tmp_path_factory.mktemp("page") / "tinyweb"
    run.mkdir()
    write_finished_round(run, "base", 0, tiny_model_dir, wrong_eval=2)
    write_finished_round(run, "imm", 1, tiny_model_dir, wrong_eval=1)
    port = free_port()
    os.environ["IMM_API_KEYS"] = KEY
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace="serve")
    try:
        start_serving(run, ServeSettings(engine="hf", dtype="float32", port=port, poll_interval_s=0.5,
                                         resident_models=3, spare_engines=0, limits=LimitSettings(max_tokens=32)))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, lambda: "see the Ray Serve logs")
        yield run, url
    finally:
        os.environ.pop("IMM_API_KEYS", None)
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def browser(page_run):
    """One headless Chromium for the module, on the page, not signed in."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.get(page_run[1] + "/")
    yield driver
    driver.quit()


def by_id(driver, name: str):
    return driver.find_elements(By.CSS_SELECTOR, f'[data-testid="{name}"]')


def wait(driver, until, timeout: float = 30.0):
    """Wait for ``until(driver)``; elements the page re-rendered meanwhile count as not yet."""
    return WebDriverWait(driver, timeout, poll_frequency=0.2,
                         ignored_exceptions=[StaleElementReferenceException]).until(until)


def shot(driver, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(Path(SCREENSHOTS) / f"page-{name}.png"))


def rounds_shown(driver) -> set[tuple[str, str]]:
    return {(r.get_attribute("data-arm"), r.get_attribute("data-round")) for r in by_id(driver, "round-row")}


def test_without_a_key_there_is_only_the_sign_in_box(browser):
    wait(browser, lambda d: by_id(d, "signin")[0].is_displayed())
    assert not by_id(browser, "app")[0].is_displayed() and not by_id(browser, "round-row")
    by_id(browser, "signin-key")[0].send_keys("wrong-key")
    by_id(browser, "signin-submit")[0].click()
    wait(browser, lambda d: "refused" in by_id(d, "signin-error")[0].text)
    assert not by_id(browser, "round-row")


def test_sign_in_shows_every_arm_and_round_and_curves(browser):
    key = by_id(browser, "signin-key")[0]
    key.clear()
    key.send_keys(KEY)
    by_id(browser, "signin-submit")[0].click()
    wait(browser, lambda d: rounds_shown(d) == {("base", "0"), ("imm", "1")})
    assert "tinyweb" in by_id(browser, "run-name")[0].text
    row = browser.find_element(By.CSS_SELECTOR, '[data-testid="round-row"][data-arm="imm"]')
    assert [c.get_attribute("data-status") for c in row.find_elements(By.CSS_SELECTOR, "[data-stage]")] == ["done"] * 5
    assert "lam=0.5" in row.text
    [chart] = by_id(browser, "chart-accuracy")
    assert len(chart.find_elements(By.CSS_SELECTOR, '[data-testid="chart-point"]')) == 2  # baseline + round 1
    assert chart.find_elements(By.CSS_SELECTOR, '[data-testid="chart-line"]')
    assert by_id(browser, "chart-diversity")[0].get_attribute("data-points") == "1"


def test_samples_of_a_round_accepted_and_rejected(browser):
    row = '[data-testid="round-row"][data-arm="imm"]'
    browser.find_element(By.CSS_SELECTOR, f'{row} [data-testid="open-samples"]').click()
    wait(browser, lambda d: len(by_id(d, "sample-question")) == len(TINY_PROBLEMS))
    verdicts = {s.get_attribute("data-accepted") for s in by_id(browser, "sample")}
    assert verdicts == {"true", "false"}
    shot(browser, "samples")
    Select(by_id(browser, "samples-filter")[0]).select_by_value("rejected")
    wait(browser, lambda d: {s.get_attribute("data-accepted") for s in by_id(d, "sample")} == {"false"})
    Select(by_id(browser, "samples-kind")[0]).select_by_value("eval")
    Select(by_id(browser, "samples-filter")[0]).select_by_value("gained")
    wait(browser, lambda d: [a.get_attribute("data-change") for a in by_id(d, "eval-answer")] == ["gained"])
    assert "gained 1 (test-1)" in by_id(browser, "eval-change")[0].text


def test_one_prompt_to_two_rounds_and_a_blind_vote(browser, page_run):
    run, _ = page_run
    by_id(browser, "tab-compare")[0].click()
    wait(browser, lambda d: len(by_id(d, "compare-model")) == 3)  # round-0, round-1, latest
    for box in by_id(browser, "compare-model"):
        if box.is_selected() != (box.get_attribute("value") in ("tinyweb/round-0", "tinyweb/round-1")):
            box.click()
    question, _, gold = TINY_PROBLEMS[0]
    by_id(browser, "compare-prompt")[0].send_keys(question)
    by_id(browser, "compare-send")[0].click()
    wait(browser, lambda d: [c.get_attribute("data-done") for c in by_id(d, "compare-column")] == ["true"] * 2,
         timeout=120)
    answers = [a.text for a in by_id(browser, "compare-answer")]
    assert len(answers) == 2 and all(answers)
    assert {h.text for h in by_id(browser, "compare-heading")} == {"Answer A", "Answer B"}  # blind
    shot(browser, "side-by-side")
    by_id(browser, "vote-button")[0].click()
    wait(browser, lambda d: "Vote saved" in by_id(d, "vote-status")[0].text)
    [vote] = [json.loads(line) for line in (run / "votes.jsonl").read_text().splitlines()]
    assert sorted(vote["models"]) == ["tinyweb/round-0", "tinyweb/round-1"] and vote["blind"]
    assert vote["winner"] in vote["models"] and vote["prompt"] == question and len(vote["answers"]) == 2
    by_id(browser, "tab-overview")[0].click()
    wait(browser, lambda d: by_id(d, "votes-summary")[0].text.startswith("1 vote"))


def test_a_new_round_appears_without_a_reload(browser, page_run, scrambled_model):
    run, _ = page_run
    by_id(browser, "tab-overview")[0].click()
    write_finished_round(run, "imm", 2, scrambled_model, wrong_eval=3)
    wait(browser, lambda d: ("imm", "2") in rounds_shown(d), timeout=10)
    wait(browser, lambda d: len(d.find_elements(
        By.CSS_SELECTOR, '[data-testid="chart-accuracy"] [data-testid="chart-point"]')) == 3, timeout=10)
    shot(browser, "overview")

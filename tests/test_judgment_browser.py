"""The judgment app in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
selenium answers by click and by key, reloads mid-session, and the stored answers and score are checked."""
import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from brainrecon.cli import app
from brainrecon.evaluate.judgment import make_trials, read_answers, run_images, score_answers
from brainrecon.evaluate.judgment_app import JudgmentSession, make_server

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def _save(array, path):
    Image.fromarray((array.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)


@pytest.fixture
def run_dir(tmp_path):
    """A finished run in miniature: 5 + 3 blocky stimuli (24 px) and noisy 12 px reconstructions."""
    rng = np.random.default_rng(0)
    images, run = tmp_path / "stimuli", tmp_path / "run"
    images.mkdir()
    for name, n in (("natural", 5), ("letters", 3)):
        (run / "recon" / name).mkdir(parents=True)
        for i in range(n):
            stim = np.kron(rng.random((3, 6, 6)), np.ones((1, 4, 4)))
            _save(stim, images / f"{name}_{i}.png")
            _save(np.clip(stim[:, ::2, ::2] + rng.normal(0, 0.2, (3, 12, 12)), 0, 1), run / "recon" / name / f"{name}_{i}.png")
    (run / "run.json").write_text(json.dumps({"images": str(images)}))
    (run / "metrics.json").write_text(json.dumps({"natural": {"pixel_identification": 0.5}}))
    return run


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Chromium and chromium-driver are not installed (make install-test installs them with apt-get)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    except WebDriverException as e:
        pytest.skip(f"Chromium could not be started: {e.msg}")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _count(driver) -> tuple[int, int]:
    text = driver.find_element(By.ID, "count").text           # "3 / 26 judged"
    done, total = text.split(" judged")[0].split(" / ")
    return int(done), int(total)


def _wait_done(driver, done: int):
    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "count").text.startswith(f"{done} / "))
    if _count(driver)[0] < _count(driver)[1]:
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "trial").is_displayed() and
                                        d.execute_script("return document.getElementById('left').complete"))


def test_a_rater_judges_in_chromium_by_click_and_key_and_resumes_after_a_reload(run_dir, browser):
    imgs = run_images(run_dir)
    trials = make_trials(imgs.labels)
    answers = run_dir / "judgments" / "answers.jsonl"
    session = JudgmentSession(imgs, trials, answers)
    server = make_server(session, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    expected = {}                                              # trial id -> whether the pick is the stimulus
    try:
        browser.get(url)
        browser.find_element(By.ID, "rater").send_keys("ann")
        browser.find_element(By.ID, "start").click()           # enter a name, start
        _wait_done(browser, 0)
        total = _count(browser)[1]
        assert total == len(trials) == 5 * 4 + 3 * 2
        for step in range(total):
            if step == 7:                                      # reload mid-session: the page resumes
                browser.get(url + "?rater=ann")
                _wait_done(browser, 7)
                assert _count(browser) == (7, total)
            number = {k: int(browser.find_element(By.ID, k).get_attribute("src").rsplit("/", 1)[1][:-4])
                      for k in ("recon", "left", "right")}
            kind, test_set, label = session.bank.by_number[number["recon"]][:3]
            assert kind == "recon"
            stimulus_left = session.bank.by_number[number["left"]][:3] == ("stimulus", test_set, label)
            right_answer = step % 3 != 2                       # every third pick wrong, on purpose
            side = "left" if stimulus_left == right_answer else "right"
            other = session.bank.by_number[number["right" if stimulus_left else "left"]]
            expected[f"{test_set}/{label}/{other[2]}"] = right_answer
            if step % 2 == 0:                                  # by click ...
                browser.find_element(By.ID, "candL" if side == "left" else "candR").click()
            else:                                              # ... and by key
                browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT if side == "left" else Keys.ARROW_RIGHT)
            _wait_done(browser, step + 1)
        assert "All done" in browser.find_element(By.ID, "msg").text
        assert not browser.find_element(By.ID, "trial").is_displayed()
    finally:
        server.shutdown()
        server.server_close()
    records = read_answers(answers)
    assert len(records) == total and {r["rater"] for r in records} == {"ann"}
    assert {r["trial"]: r["correct"] for r in records} == expected
    assert all(isinstance(r["rt_ms"], int) and r["rt_ms"] >= 0 for r in records)
    scores = score_answers(trials, records)
    for name in ("natural", "letters"):
        mine = [v for k, v in expected.items() if k.startswith(name + "/")]
        assert scores[name]["human_identification"] == pytest.approx(np.mean(mine))
    result = CliRunner().invoke(app, ["judge", "score", str(run_dir)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["natural"]["human_identification"] == pytest.approx(scores["natural"]["human_identification"])
    assert metrics["natural"]["human_n_judgments"] == 20 and metrics["letters"]["human_n_judgments"] == 6

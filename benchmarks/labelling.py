"""How much typing the labelling page saves: a scripted person labels N captchas in headless Chromium.

The captchas are rendered from streams of their own (split name `labelling`), so no image is one
the model trained or was tested on. The script accepts the pre-filled reading with Enter where it is
right and types the truth where it is wrong, counting keystrokes and seconds; then it measures
--accept-above on the same images: how many readings it labels without a person, and how many of
those are right. Writes reports/bench/labelling.json.

    python -m benchmarks.labelling [--model models/model.pt] [--n 200] [--accept-above 0.99] [--folder site]
"""
from __future__ import annotations

import json
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import click

from pipeline.data.captcha_style import Renderer
from pipeline.data.label_log import read_answers
from pipeline.data.seeds import derive_seed
from pipeline.files import write_json
from pipeline.params import load_params
from pipeline.system_files import CHROMEDRIVER, CHROMIUM
from pipeline.tools.label import create_app, open_session

BROWSER_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


def find_browser() -> tuple[str | None, str | None]:
    """Debian's Chromium and its driver (setup/debian.sh installs both), or None where absent."""
    return tuple(path if Path(path).is_file() else None for path in (CHROMIUM, CHROMEDRIVER))


def headless_chromium():
    """Selenium driving the system's Chromium (Debian: chromium, chromium-driver); nothing downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def render_folder(folder: Path, n: int, params) -> dict[str, str]:
    """N captchas of the data params' style, named without their labels; returns {file: label}."""
    data = params.data
    renderer = Renderer.from_params(data)
    truth = {}
    for i in range(n):
        rng = random.Random(derive_seed(data.seed, "labelling", i, "label"))
        label = "".join(rng.choice(data.charset) for _ in range(rng.randint(data.min_length, data.max_length)))
        name = f"{i:05d}.png"
        (folder / name).write_bytes(renderer.png(label, derive_seed(data.seed, "labelling", i, "render")))
        truth[name] = label
    return truth


def scripted_session(folder: Path, model: Path, truth: dict[str, str]) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(open_session(folder, model, None, who="script")), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = headless_chromium()
    keystrokes, seconds, right = [], [], []
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/")
        box = driver.find_element(By.ID, "text")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: box.get_attribute("data-path"))
        for _ in truth:
            started = time.perf_counter()
            path, shown = box.get_attribute("data-path"), box.get_attribute("value")
            if shown == truth[path]:
                box.send_keys(Keys.ENTER)
                keystrokes.append(1)
            else:
                box.send_keys(truth[path] + Keys.ENTER)  # the reading is selected: typing replaces it
                keystrokes.append(len(truth[path]) + 1)
            right.append(shown == truth[path])
            wait.until(lambda d: box.get_attribute("data-path") != path or not box.is_enabled())
            seconds.append(time.perf_counter() - started)
    finally:
        driver.quit()
        server.shutdown()
    saved = {p: a.label for p, a in read_answers(folder / "labels.csv").items()}
    assert saved == truth, "the CSV does not hold what was typed"
    misread = [k for k, ok in zip(keystrokes, right) if not ok]
    return {"captchas": len(truth), "model_right": sum(right), "keystrokes": sum(keystrokes),
            "keystrokes_per_captcha": sum(keystrokes) / len(truth),
            "keystrokes_per_misread": statistics.mean(misread) if misread else None,
            "seconds_per_captcha_median": statistics.median(seconds)}


def auto_labels(folder: Path, model: Path, truth: dict[str, str], threshold: float) -> dict:
    csv_path = Path(tempfile.mkdtemp()) / "auto-labels.csv"  # apart from the folder's labels.csv
    session = open_session(folder, model, csv_path)
    count = session.accept_above(threshold)
    auto = {p: a.label for p, a in session.answers.items() if a.status == "auto"}
    correct = sum(truth[p] == label for p, label in auto.items())
    return {"threshold": threshold, "auto_labelled": count, "coverage": count / len(truth),
            "auto_correct": correct, "auto_accuracy": correct / count if count else None,
            "left_for_a_person": len(truth) - count}


@click.command(help=__doc__)
@click.option("--model", type=click.Path(path_type=Path), default=Path("models/model.pt"), show_default=True)
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="the data style to render")
@click.option("--n", default=200, show_default=True)
@click.option("--accept-above", default=0.99, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/bench/labelling.json"), show_default=True)
@click.option("--folder", type=click.Path(path_type=Path), default=None,
              help="render into this (new) folder and keep it, labels.csv included")
def main(model, params_path, n, accept_above, out, folder) -> None:
    params = load_params(params_path)
    keep = folder is not None
    if keep:
        folder.mkdir(parents=True)  # a new folder: nothing in it but these captchas
    folder = folder or Path(tempfile.mkdtemp())
    truth = render_folder(folder, n, params)
    report = {"date": time.strftime("%Y-%m-%d"), "model": str(model),
              "browser": scripted_session(folder, model, truth),
              "accept_above": auto_labels(folder, model, truth, accept_above)}
    if not keep:
        shutil.rmtree(folder)
    write_json(out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""The labelling page: its app with Flask's test client, a killed server, and a real headless browser."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from benchmarks.labelling import find_browser, headless_chromium
from pipeline.data.captcha_style import Renderer
from pipeline.data.label_log import COLUMNS, read_answers
from pipeline.data.labelled_folders import read_labels_file
from pipeline.errors import PipelineError
from pipeline.tools.label import create_app, open_session
from tests.conftest import REPO
from tests.helpers import answers, free_port, wait_for

LABELS = ["AB12", "CD34", "EF56", "GH78", "JK90", "LM12", "NP34", "QR56"]


@pytest.fixture
def folder(tmp_path):
    renderer = Renderer(128, 64)
    folder = tmp_path / "site"
    folder.mkdir()
    for i, label in enumerate(LABELS):
        renderer.image(label, 100 + i).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


@pytest.fixture
def model(tiny_dataset):
    return tiny_dataset / "models/model.pt"


def with_readings(session):
    """Give the tiny test model's readings known values: the truth, except for img1 (a misreading)."""
    for item in session.items:
        i = int(item.path[3:-4])
        item.text = LABELS[i] if i != 1 else "XXXX"
    return session


def rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def post(client, path, label="", status="labelled"):
    return client.post("/api/answer", json={"path": path, "label": label, "status": status})


def test_answers_are_saved_at_once_and_the_page_resumes(folder, model):
    session = open_session(folder, model, None, who="ann")
    client = create_app(session).test_client()
    state = client.get("/api/state").json
    assert state["progress"]["total"] == len(LABELS) and [b["path"] for b in state["bad"]] == ["broken.png"]
    confidences = [q["confidence"] for q in state["queue"]]
    assert confidences == sorted(confidences)  # least confident first
    first, second = state["queue"][0], state["queue"][1]
    assert post(client, first["path"], "AB12").status_code == 200
    r = post(client, second["path"], "zz12")  # lower case typed: the charset has upper case only
    assert r.status_code == 200 and r.json["saved"]["label"] == "ZZ12"
    saved = rows(folder / "labels.csv")
    assert [r["path"] for r in saved] == [first["path"], second["path"]]
    assert saved[1]["model_text"] == second["text"] and saved[1]["who"] == "ann" and saved[1]["status"] == "labelled"
    assert client.get(f"/image/{first['index']}").data == (folder / first["path"]).read_bytes()
    assert client.get("/image/999").status_code == 404

    again = create_app(open_session(folder, model, None, who="ann")).test_client().get("/api/state").json
    assert again["progress"]["answered"] == 2 and again["progress"]["remaining"] == len(LABELS) - 2
    assert {q["path"] for q in again["queue"]}.isdisjoint({first["path"], second["path"]})
    assert again["progress"]["human"] == 2
    assert again["progress"]["agreement"] == (("AB12" == first["text"]) + ("ZZ12" == second["text"])) / 2


@pytest.mark.parametrize("label, reason", [("AB#1", "not in the charset: '#'"), ("  ", "empty label")])
def test_labels_outside_the_charset_are_refused_with_the_reason(folder, model, label, reason):
    session = open_session(folder, model, None)
    client = create_app(session).test_client()
    r = post(client, "img0.png", label)
    assert r.status_code == 400 and reason in r.json["error"]
    assert rows(folder / "labels.csv") == []
    assert post(client, "img0.png", "", status="unreadable").status_code == 200
    assert post(client, "../params.yaml", "AB12").status_code == 404


def test_accept_above_writes_confident_readings_marked_auto(folder, model):
    session = with_readings(open_session(folder, model, None))
    for k, item in enumerate(session.items):
        item.confidence = k / 10
    count = session.accept_above(0.5)
    expected = {it.path: it.text for it in session.items if it.confidence >= 0.5}
    assert count == len(expected) == 3
    saved = rows(folder / "labels.csv")
    assert {r["path"]: r["label"] for r in saved} == expected
    assert {r["status"] for r in saved} == {"auto"} and {r["who"] for r in saved} == {"model"}
    assert session.accept_above(0.5) == 0  # not twice
    assert set(open_session(folder, model, None).answers) == set(expected)  # and still there after a restart


def test_concurrent_answers_are_neither_lost_nor_duplicated(folder, model):
    session = open_session(folder, model, None)
    client = create_app(session).test_client()
    statuses, barrier = [], threading.Barrier(12)

    def answer(path, label):
        barrier.wait()
        statuses.append((path, post(client, path, label).status_code))

    jobs = [("img0.png", "AB12")] * 4 + [(f"img{i}.png", LABELS[i]) for i in range(1, 8) if i != 3] + [("img3.png", "GH78")] * 2
    threads = [threading.Thread(target=answer, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(s for p, s in statuses if p == "img0.png") == [200, 409, 409, 409]
    saved = rows(folder / "labels.csv")
    assert sorted(r["path"] for r in saved) == [f"img{i}.png" for i in range(8)]  # one row each
    assert all(len(r) == len(COLUMNS) and None not in r.values() for r in saved)


def test_a_torn_last_row_is_ignored_and_ingest_reads_the_csv(folder, model):
    session = open_session(folder, model, None)
    client = create_app(session).test_client()
    assert post(client, "img0.png", "AB12").status_code == 200
    assert post(client, "img1.png", "", status="unreadable").status_code == 200
    with open(folder / "labels.csv", "a") as f:
        f.write("img2.png,EF5")  # a row cut short by a kill
    assert set(read_answers(folder / "labels.csv")) == {"img0.png", "img1.png"}
    client = create_app(open_session(folder, model, None)).test_client()
    assert post(client, "img2.png", "EF56").status_code == 200
    table = read_labels_file(folder / "labels.csv")
    assert table.labels == {"img0.png": "AB12", "img2.png": "EF56"} and table.left_out == {"img1.png"}


def test_killing_the_server_loses_no_saved_answer(folder, model):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen([sys.executable, "-m", "pipeline", "label", str(folder), "--model", str(model),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: answers(f"{url}/api/state"), 60)
        for i in range(5):
            body = json.dumps({"path": f"img{i}.png", "label": LABELS[i], "status": "labelled"}).encode()
            request = urllib.request.Request(f"{url}/api/answer", data=body, headers={"Content-Type": "application/json"})
            assert urllib.request.urlopen(request, timeout=10).status == 200
        server.send_signal(signal.SIGKILL)
        server.wait(10)
    finally:
        server.kill()
    assert {p: a.label for p, a in read_answers(folder / "labels.csv").items()} == dict(
        (f"img{i}.png", LABELS[i]) for i in range(5))


@pytest.mark.skipif(not all(find_browser()), reason="no chromium + chromedriver: setup/debian.sh (make install) installs them")
def test_in_a_browser_accept_one_reading_correct_another_reload(folder, model):
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    session = with_readings(open_session(folder, model, None, who="browser"))
    server = make_server("127.0.0.1", 0, create_app(session), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    driver = headless_chromium()
    try:
        driver.get(url)
        box = driver.find_element(By.ID, "text")
        wait = WebDriverWait(driver, 20)

        def current() -> tuple[str, str]:
            wait.until(lambda d: box.get_attribute("data-path"))
            return box.get_attribute("data-path"), box.get_attribute("value")

        first, reading = current()
        box.send_keys(Keys.ENTER)  # accept the model's reading: one keystroke
        wait.until(lambda d: box.get_attribute("data-path") != first)
        second, _ = current()
        box.send_keys("xy99" + Keys.ENTER)  # the reading is selected: typing replaces it
        wait.until(lambda d: box.get_attribute("data-path") != second)
        driver.refresh()
        box = driver.find_element(By.ID, "text")
        wait.until(lambda d: "2 of" in d.find_element(By.ID, "stats").text)
        third, _ = current()
        assert third not in (first, second)
    finally:
        driver.quit()
        server.shutdown()
    answers = read_answers(folder / "labels.csv")
    assert {p: (a.label, a.status, a.who) for p, a in answers.items()} == {
        first: (reading, "labelled", "browser"), second: ("XY99", "labelled", "browser")}


def test_huge_labels_string_flags_and_foreign_csvs_are_refused(folder, model):
    session = open_session(folder, model, None, who="t")
    client = create_app(session).test_client()
    big = post(client, "img0.png", "A" * 10_000_000)
    assert big.status_code == 400 and "at most 64" in big.get_json()["error"]
    assert post(client, "img0.png", "AB12").status_code == 200
    again = client.post("/api/answer", json={"path": "img0.png", "label": "CD34", "overwrite": "false"})
    assert again.status_code == 409  # the string "false" is no permission to overwrite
    assert post(client, "nowhere.png", "AB12").status_code == 404
    assert read_answers(folder / "labels.csv")["img0.png"].label == "AB12"
    (folder / "latin1.csv").write_bytes("path,label\nimg0.png,\xc4B12\n".encode("latin-1"))
    with pytest.raises(PipelineError, match="not UTF-8"):
        read_answers(folder / "latin1.csv")
    with pytest.raises(PipelineError, match="not UTF-8"):
        read_labels_file(folder / "latin1.csv")


def test_the_page_answers_only_to_the_host_it_listens_on(folder, model):
    session = open_session(folder, model, None, who="t")
    client = create_app(session, hosts={"127.0.0.1:8001", "localhost:8001"}).test_client()
    assert client.get("/api/state", headers={"Host": "127.0.0.1:8001"}).status_code == 200
    refused = client.get("/api/state", headers={"Host": "attacker.example:8001"})
    assert refused.status_code == 403 and "answers only to" in refused.get_json()["error"]
    assert post(client, "img0.png", "AB12").status_code == 403  # the test client's Host is "localhost"


def test_a_busy_port_is_one_line_and_leaves_no_labels_csv(folder, model):

    from click.testing import CliRunner

    from pipeline.__main__ import cli

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = CliRunner().invoke(cli, ["label", str(folder), "--model", str(model), "--port", str(port)])
    assert result.exit_code == 2 and result.output.startswith("error: cannot listen on 127.0.0.1")
    assert not (folder / "labels.csv").exists()

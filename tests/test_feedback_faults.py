"""The feedback loop under faults (hostile input, round 3): a worker killed holding the kept folder's
lock, verdicts on a full disk or cut short by a kill, bodies nested past the recursion limit, tokens
that guard nothing, captchas larger than the whole budget, files the budget drops under the label
page, SIGHUP at any moment, and an upload refused while the client is still sending it."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline.data import label_log
from pipeline.data.label_log import AnswerLog, read_answers
from pipeline.errors import PipelineError
from pipeline.serving.app import check_feedback_token, create_app
from pipeline.serving.feedback import Keeper, KeepLimits
from pipeline.tools.label import create_app as label_app
from pipeline.tools.label import open_session
from tests.conftest import REPO
from tests.helpers import TOKEN, EchoRecognizer, captcha_png, feedback, free_port, start_serve, wait_healthy


@pytest.fixture(scope="module")
def echo(tiny_dataset):
    from pipeline.read.recognizer import Recognizer

    return EchoRecognizer(Recognizer(tiny_dataset / "models/model.pt", onnx=False).preprocess)


def client_of(echo, kept, **limits):
    keeper = Keeper(kept, KeepLimits(**limits))
    keeper.recount()
    return create_app(echo, keeper=keeper, feedback_token=TOKEN).test_client(), keeper


def read_one(client, seed: int = 0) -> dict:
    return client.post("/predict", data=captcha_png("AB12", seed), content_type="image/png").json


def test_a_worker_killed_holding_the_budget_lock_blocks_no_one(echo, tmp_path):
    """The lock is the kernel's (flock): it dies with its holder, where a shared semaphore stayed taken."""
    client, keeper = client_of(echo, tmp_path / "kept", max_captchas=5)
    read_one(client)
    holder = os.fork()
    if holder == 0:  # a worker pruning the folder when the out-of-memory killer comes
        with keeper.budget.locked():
            time.sleep(60)
        os._exit(0)
    time.sleep(0.5)
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    answers = []
    thread = threading.Thread(target=lambda: answers.extend(read_one(client, s) for s in range(1, 9)), daemon=True)
    thread.start()
    thread.join(20)
    assert len(answers) == 8 and all("id" in a for a in answers)
    assert client.get("/healthz").json["kept"]["captchas"] <= 5


def test_one_budget_over_every_serve_process_on_the_folder(echo, tmp_path):
    first, _ = client_of(echo, tmp_path / "kept", max_captchas=10)
    second, _ = client_of(echo, tmp_path / "kept", max_captchas=10)  # another serve on the same folder
    for seed in range(12):
        read_one(first if seed % 2 else second, seed)
    kept = [p for p in (tmp_path / "kept").glob("*.json")]
    assert len(kept) <= 10


def test_a_captcha_larger_than_the_whole_budget_gets_no_id(echo, tmp_path):
    client, _ = client_of(echo, tmp_path / "kept", max_bytes=2_000)
    big = captcha_png("AB12", 1)
    assert len(big) > 2_000
    answer = client.post("/predict", data=big, content_type="image/png").json
    assert "id" not in answer and answer["text"]
    assert not list((tmp_path / "kept").glob("*.png"))


def failing_writes(monkeypatch, after_bytes: int | None = 0):
    """os.write in the labels log fails with ENOSPC (after writing `after_bytes` of the row)."""
    real = os.write

    def write(fd, data):
        if after_bytes:
            real(fd, bytes(data[:after_bytes]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(label_log.os, "write", write)
    return lambda: monkeypatch.setattr(label_log.os, "write", real)


@pytest.mark.parametrize("after_bytes", [0, 7])
def test_a_verdict_on_a_full_disk_is_refused_and_can_be_sent_again(echo, tmp_path, monkeypatch, after_bytes):
    client, _ = client_of(echo, tmp_path / "kept")
    first, second = read_one(client, 1), read_one(client, 2)
    restore = failing_writes(monkeypatch, after_bytes)
    refused = feedback(client, first["id"], True)
    assert refused.status_code == 503 and "send it again" in refused.json["error"]
    restore()
    assert (tmp_path / "kept/labels.csv").read_bytes().endswith(b"\n")  # no torn row left behind
    assert feedback(client, first["id"], True).status_code == 200
    assert feedback(client, second["id"], False).status_code == 200
    assert feedback(client, first["id"], True).status_code == 409
    rows = (tmp_path / "kept/labels.csv").read_text().splitlines()
    assert len(rows) == 3 and all(len(row.split(",")) == 7 for row in rows)
    answers = read_answers(tmp_path / "kept/labels.csv")
    assert [a.status for a in answers.values()] == ["site-accepted", "site-rejected"]


def test_a_verdict_cut_short_by_a_kill_is_taken_over(echo, tmp_path):
    """A claim left pending (serve killed between claim and row) does not lock the id out; one left
    pending after its row was written is settled from the row, without a second row."""
    client, keeper = client_of(echo, tmp_path / "kept")
    lost, written = read_one(client, 1)["id"], read_one(client, 2)["id"]
    (tmp_path / "kept" / f"{lost}.verdict").write_bytes(b"pending")
    assert feedback(client, lost, True).status_code == 200
    record = json.loads((tmp_path / "kept" / f"{written}.json").read_text())
    keeper.labels.append(record["image"], record["text"], "site-accepted", "site", record["text"], 0.5)
    (tmp_path / "kept" / f"{written}.verdict").write_bytes(b"pending")
    assert feedback(client, written, True).status_code == 409
    rows = (tmp_path / "kept/labels.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and json.loads((tmp_path / "kept" / f"{written}.verdict").read_text())["correct"] is True


def test_a_row_torn_by_a_killed_writer_never_swallows_the_next(tmp_path):
    log = AnswerLog(tmp_path / "labels.csv")
    log.append("a.png", "AB12", "labelled", "ann", "AB12", 0.9)
    with open(tmp_path / "labels.csv", "ab") as f:
        f.write(b"b.png,CD3")  # a kill mid-row, while the log stays open elsewhere
    log.append("c.png", "EF56", "labelled", "ann", "EF56", 0.9)
    answers = read_answers(tmp_path / "labels.csv")
    assert {p: a.label for p, a in answers.items()} == {"a.png": "AB12", "c.png": "EF56"}


@pytest.mark.parametrize("body", [b"[" * 1500 + b"]" * 1500, b"{" * 5000, b'{"id": "\xff"}'])
def test_bodies_nested_past_the_recursion_limit_are_400(echo, tmp_path, body, tiny_dataset):
    client, _ = client_of(echo, tmp_path / "kept")
    response = client.post("/feedback", data=body, content_type="application/json",
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400 and "expected JSON" in response.json["error"]
    (tmp_path / "site").mkdir()
    (tmp_path / "site/a.png").write_bytes(captcha_png("AB12", 1))
    page = label_app(open_session(tmp_path / "site", tiny_dataset / "models/model.pt", None, who="t")).test_client()
    response = page.post("/api/answer", data=body, content_type="application/json")
    assert response.status_code == 400 and "expected JSON" in response.json["error"]


@pytest.mark.parametrize("token, message", [
    ("", "set but empty"), ("ä-token-of-at-least-16", "visible ASCII"), ("token with spaces in it", "visible ASCII"),
    ("short", "at least 16")])
def test_tokens_that_guard_nothing_or_never_match_are_refused_at_start_up(token, message):
    with pytest.raises(PipelineError, match=message):
        check_feedback_token(token)


def test_an_empty_token_variable_stops_serve_in_one_line(tiny_dataset, tmp_path):
    env = {**os.environ, "CAPTCHA_CRNN_FEEDBACK_TOKEN": ""}
    result = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--model", str(tiny_dataset / "models/model.pt"),
                             "--keep", str(tmp_path / "kept"), "--port", str(free_port())],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "set but empty" in result.stderr


def test_the_bearer_scheme_in_any_case(echo, tmp_path):
    client, _ = client_of(echo, tmp_path / "kept")
    captcha_id = read_one(client)["id"]
    response = client.post("/feedback", json={"id": captcha_id, "correct": True},
                           headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200


def test_the_label_page_and_ingest_survive_files_the_budget_drops(echo, tmp_path, tiny_dataset, monkeypatch):
    """A person labels a rejected captcha, then serve's budget drops it: the page skips what is gone
    (410, not 500) and ingest counts the labelled row as dropped instead of stopping."""
    from pipeline.params import load_params
    from pipeline.stages.ingest import ingest
    from tests.conftest import write_params

    client, _ = client_of(echo, tmp_path / "kept")
    ids = [read_one(client, seed)["id"] for seed in range(4)]
    for captcha_id in ids:
        assert feedback(client, captcha_id, False).status_code == 200
    session = open_session(tmp_path / "kept", tiny_dataset / "models/model.pt", None, who="ann")
    page = label_app(session).test_client()
    queue = page.get("/api/state").json["queue"]
    assert len(queue) == 4
    assert page.post("/api/answer", json={"path": f"{ids[0]}.png", "label": "AB12"}).status_code == 200
    for name in (f"{ids[0]}.png", f"{ids[1]}.png"):  # the budget drops the two oldest
        (tmp_path / "kept" / name).unlink()
    index = next(q["index"] for q in queue if q["path"] == f"{ids[1]}.png")
    assert page.get(f"/image/{index}").status_code == 410
    assert page.post("/api/answer", json={"path": f"{ids[1]}.png", "label": "AB12"}).status_code == 410
    assert {q["path"] for q in page.get("/api/state").json["queue"]} == {f"{ids[2]}.png", f"{ids[3]}.png"}
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"ingest": {"source": "kept", "labels": "kept/labels.csv", "unlabelled": True}})
    params = load_params("params.yaml")
    report = ingest(params.data, params.ingest)
    assert report["dropped"] == [f"{ids[0]}.png"] and report["per_split"].get("unlabelled") == 2


def test_sighup_at_any_moment_of_start_up_is_harmless(tiny_dataset, tmp_path):
    for delay, workers in ((0.05, 1), (0.3, 1), (0.6, 2), (1.0, 2)):
        port = free_port()
        proc = start_serve(tiny_dataset / "models/model.pt", port, "--workers", str(workers), "--torch")
        try:
            time.sleep(delay)
            proc.send_signal(signal.SIGHUP)
            wait_healthy(port, proc)
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert proc.poll() is None, (delay, workers)
        finally:
            proc.kill()
            proc.wait()


def test_an_upload_refused_on_its_length_gets_a_readable_413(server_url):
    """The client sends its whole 30 MB body before reading, as most clients do; the server has
    refused it on the headers and lingers reading it, so the send completes and the 413 can be read,
    instead of the send failing with a connection reset."""
    body = b"x" * (30 * 2**20)
    sock = socket.create_connection(("127.0.0.1", int(server_url.rsplit(":", 1)[1])), timeout=10)
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)  # BrokenPipeError or ConnectionResetError without the linger
    response = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            raise AssertionError(f"connection reset; read so far: {response[:200]!r}") from None
        if not chunk:
            break
        response += chunk
    sock.close()
    assert response.startswith(b"HTTP/1.1 413") and b'"error"' in response

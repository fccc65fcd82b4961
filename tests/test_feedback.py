"""The feedback loop: serve --keep keeps what it read, POST /feedback takes the site's verdict once
per id, ingest and the label page read the verdicts, and SIGHUP swaps the model under load."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from pipeline.data.label_log import read_answers
from pipeline.model import checkpoint
from pipeline.params import IngestParams, load_params
from pipeline.read.recognizer import Recognizer
from pipeline.serving.app import Limits, create_app
from pipeline.serving.feedback import Keeper, KeepLimits
from pipeline.serving.http import make_server
from pipeline.serving.live_model import LiveModel
from pipeline.stages.ingest import ingest
from pipeline.tools.label import open_session
from tests.helpers import TOKEN, EchoRecognizer, captcha_png, feedback, free_port, start_serve, wait_for, wait_healthy


def keeper(folder, max_captchas=100_000, max_bytes=2**30) -> Keeper:
    k = Keeper(folder, KeepLimits(max_captchas, max_bytes))
    k.recount()
    return k


def test_feedback_once_per_id_only_for_issued_ids_and_only_with_the_token(recognizer, tmp_path):
    kept = tmp_path / "kept"
    recognizer = EchoRecognizer(recognizer.preprocess)  # reads every image as some text: the tiny model reads ""
    client = create_app(recognizer, keeper=keeper(kept), feedback_token=TOKEN).test_client()
    first = client.post("/predict", data=captcha_png("AB12", 1), content_type="image/png").json
    second = client.post("/predict", data=captcha_png("CD34", 2), content_type="image/png").json
    assert len({first["id"], second["id"]}) == 2 and all(len(r["id"]) == 32 for r in (first, second))
    assert (kept / f"{first['id']}.png").read_bytes() == captcha_png("AB12", 1)  # the upload as it came
    record = json.loads((kept / f"{first['id']}.json").read_text())
    assert record["text"] == first["text"] and record["model_sha256"] == recognizer.model_sha256

    assert feedback(client, first["id"], True, token=None).status_code == 401
    assert feedback(client, first["id"], True, token="wrong-token-of-16-chars").status_code == 401
    assert feedback(client, first["id"], True).json == {"id": first["id"], "status": "site-accepted"}
    assert feedback(client, first["id"], True).status_code == 409  # once per id
    assert feedback(client, first["id"], False).status_code == 409
    assert feedback(client, second["id"], False).json["status"] == "site-rejected"
    for bad_id in ("0" * 32, "../" * 10 + "labels", first["id"][:31], first["id"].upper()):
        assert feedback(client, bad_id, True).status_code == 404
    for body in ({"id": first["id"]}, {"id": first["id"], "correct": "yes"}, [first["id"]], {"correct": True}):
        assert client.post("/feedback", json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 400

    answers = read_answers(kept / "labels.csv")
    assert answers[f"{first['id']}.png"].status == "site-accepted"
    assert answers[f"{first['id']}.png"].label == first["text"]
    assert answers[f"{second['id']}.png"].status == "site-rejected"
    assert answers[f"{second['id']}.png"].label == ""
    assert answers[f"{second['id']}.png"].model_text == second["text"]
    assert len(list(csv.reader(open(kept / "labels.csv")))) == 3  # the header and two verdicts


def test_without_keep_there_is_no_feedback_and_no_id(recognizer):
    client = create_app(recognizer).test_client()
    assert "id" not in client.post("/predict", data=captcha_png("AB12", 1), content_type="image/png").json
    assert client.post("/feedback", json={"id": "0" * 32, "correct": True}).status_code == 404


def test_the_kept_folder_is_bounded_oldest_dropped_and_healthz_says_so(recognizer, tmp_path):
    kept = tmp_path / "kept"
    client = create_app(recognizer, keeper=keeper(kept, max_captchas=10)).test_client()
    ids = [client.post("/predict", data=captcha_png("AB12", i), content_type="image/png").json["id"] for i in range(25)]
    on_disk = {p.name.split(".")[0] for p in kept.iterdir() if not p.name.startswith(("labels", "."))}
    assert len(on_disk) <= 10 and ids[-1] in on_disk and ids[0] not in on_disk
    assert on_disk == set(ids[-len(on_disk):])  # the newest survive
    stats = client.get("/healthz").json["kept"]
    assert stats["captchas"] == len(on_disk) and stats["dropped"] == 25 - len(on_disk)
    assert client.post("/feedback", json={"id": ids[0], "correct": True}).status_code == 404  # dropped

    # a byte budget too, counted over restarts: a new server finds the folder as it was left
    size = sum(p.stat().st_size for p in kept.iterdir() if not p.name.startswith(("labels", ".")))
    smaller = keeper(kept, max_bytes=size // 2)
    assert smaller.budget.stats()["bytes"] <= size // 2 and smaller.budget.stats()["dropped"] > 0
    assert sum(p.stat().st_size for p in kept.iterdir() if not p.name.startswith(("labels", "."))) <= size // 2


def test_ingest_and_the_label_page_read_the_verdicts(tiny_dataset, tmp_path, monkeypatch):
    kept = tmp_path / "kept"
    k = keeper(kept, max_captchas=1000)
    texts = ["AB12", "CD34", "EF56", "GH78", "JK90"]
    ids = [k.keep(captcha_png(t, i), "PNG", t if i != 2 else "EE56", 0.5, "sha") for i, t in enumerate(texts)]
    for captcha_id, correct in zip(ids, [True, True, False]):
        k.verdict(captcha_id, correct)
    with pytest.raises(ValueError, match="empty reading"):
        k.verdict(k.keep(captcha_png("AB12", 9), "PNG", "", 0.1, "sha"), True)
    for suffix in (".png", ".json", ".verdict"):  # a judged captcha dropped by the budget since
        (kept / f"{ids[1]}{suffix}").unlink()

    monkeypatch.chdir(tmp_path)
    params = load_params(tiny_dataset / "params.yaml")
    ip = IngestParams(**{**params.ingest.__dict__, "source": str(kept), "labels": str(kept / "labels.csv"),
                         "unlabelled": True, "fractions": {"train": 1.0, "val": 0.0, "test": 0.0},
                         "out": str(tmp_path / "ingested")})
    report = ingest(params.data, ip)
    assert report["per_split"] == {"train": 1, "val": 0, "test": 0, "unlabelled": 4}
    assert report["dropped"] == [f"{ids[1]}.png"] and report["invalid"] == []

    session = open_session(kept, tiny_dataset / "models/model.pt", None)
    queue = session.queue(10, set())
    assert queue[0]["path"] == f"{ids[2]}.png"  # the rejected one first, its reading not offered
    assert queue[0]["text"] == "" and queue[0]["rejected"] == "EE56"
    assert f"{ids[0]}.png" not in {q["path"] for q in queue}  # the accepted one is labelled already
    session.by_path[f"{ids[2]}.png"].text = "EE56"  # as if the model read it so again
    session.by_path[f"{ids[3]}.png"].text = "GH78"
    session.accept_above(0.0)  # not even at any confidence is a rejected reading taken
    assert f"{ids[2]}.png" not in session.answers and session.answers[f"{ids[3]}.png"].label == "GH78"


def perturbed_copy(source, dest):
    """Another model of the same shape: other weights, another sha256."""
    ckpt = checkpoint.read(source)
    ckpt["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, dest)


def test_a_reload_under_load_fails_no_request_and_a_bad_file_leaves_the_old_model(tiny_dataset, tmp_path):
    served = tmp_path / "model.pt"
    shutil.copy(tiny_dataset / "models/model.pt", served)
    other = tmp_path / "other.pt"
    perturbed_copy(served, other)
    originals = {"a": served.read_bytes(), "b": other.read_bytes()}
    live = LiveModel(Recognizer(served, onnx=False), lambda: Recognizer(served, onnx=False))
    limits = Limits(max_connections=100, max_connections_per_client=100)
    sock = socket.create_server(("127.0.0.1", 0))
    server = make_server(create_app(live, limits), sock, 8, limits)
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    statuses, stop = [], threading.Event()
    image = captcha_png("AB12", 7)

    def client():
        while not stop.is_set():
            request = urllib.request.Request(f"{url}/predict", data=image, headers={"Content-Type": "image/png"})
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    statuses.append(r.status)
            except urllib.error.HTTPError as e:
                statuses.append(e.code)
            except OSError as e:
                statuses.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        shas = []
        for name in ["b", "a", "b"]:
            time.sleep(0.3)
            (tmp_path / "next.pt").write_bytes(originals[name])
            os.replace(tmp_path / "next.pt", served)  # as checkpoint.save writes: a whole file, renamed
            assert live.reload()
            with urllib.request.urlopen(f"{url}/model", timeout=10) as r:
                shas.append(json.loads(r.read())["model_sha256"])
        served.write_bytes(b"half-written")
        assert not live.reload()
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.task_dispatcher.shutdown(timeout=1)
    assert len(statuses) > 20 and set(statuses) == {200}, [s for s in statuses if s != 200][:3]
    assert shas[0] == shas[2] != shas[1]
    assert live.current.model_sha256 == shas[2]  # the bad file left the last good model serving
    assert live.health()["reload_error"]


def test_sighup_reloads_the_model_in_every_worker(tiny_dataset, tmp_path):
    served, port = tmp_path / "model.pt", free_port()
    shutil.copy(tiny_dataset / "models/model.pt", served)
    proc = start_serve(served, port, "--workers", "2", "--torch")
    try:
        wait_healthy(port, proc)
        before = checkpoint_sha(served)
        perturbed_copy(tiny_dataset / "models/model.pt", tmp_path / "next.pt")
        os.replace(tmp_path / "next.pt", served)
        after = checkpoint_sha(served)
        time.sleep(1)  # both workers up (they load after the fork)
        proc.send_signal(signal.SIGHUP)

        def all_after() -> bool:  # each connection may land on either worker
            return all(health(port)["model_sha256"] == after for _ in range(10))

        assert before != after and wait_for(all_after, 60)
        assert health(port)["reloads"] == 1 and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def checkpoint_sha(path) -> str:
    from pipeline.files import file_sha256

    return file_sha256(path)


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return json.loads(r.read())

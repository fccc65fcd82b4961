"""The HTTP server against clients that misbehave: idle and trickling connections, bodies that
are too large, requests that ask for too much work, and the supervised worker processes."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import numpy as np
import psutil
import pytest
from PIL import Image

from pipeline.data.captcha_style import Renderer
from pipeline.serving import app as serve_module
from pipeline.serving.app import Limits, create_app
from tests.conftest import SERVE_LIMITS
from tests.helpers import free_port, start_serve, wait_for, wait_healthy

LIMITS = Limits(**SERVE_LIMITS)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def get(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def post(url: str, body: bytes, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def connect_from(address: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((address, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def test_idle_connections_of_one_client_never_lock_out_the_others(server_url):
    port = port_of(server_url)
    try:
        idle = [connect_from("127.0.0.2", port) for _ in range(LIMITS.max_connections + 10)]
    except OSError as e:
        pytest.skip(f"cannot connect from a second loopback address here: {e}")
    status, body = get(f"{server_url}/healthz")
    assert status == 200 and body["status"] == "ok"
    # all but the per-client cap are closed at once; the rest once idle for idle_timeout
    refused = sum(closed_by_server(s, 0.5) for s in idle)
    assert refused >= len(idle) - LIMITS.max_connections_per_client
    assert all(closed_by_server(s, LIMITS.idle_timeout + 3) for s in idle)
    for s in idle:
        s.close()


def test_a_request_trickling_in_is_cut_off_at_the_deadline(server_url):
    sock = connect_from("127.0.0.1", port_of(server_url))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < LIMITS.request_timeout + 4:
        try:
            sock.sendall(b"X")  # one byte of a header every 0.2 s: never idle
        except OSError:
            closed = True
            break
        if closed_by_server(sock, 0.2):
            closed = True
            break
    sock.close()
    assert closed, "a trickling request held its connection past the deadline"


def test_an_oversized_body_is_refused_on_its_announced_length(server_url):
    sock = connect_from("127.0.0.1", port_of(server_url))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 31457280\r\n\r\n")  # 30 MB announced, none sent
    sock.settimeout(5)
    reply = b""
    while chunk := sock.recv(65536):  # the server closes the connection after its answer
        reply += chunk
    sock.close()
    reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413")
    assert "error" in json.loads(reply.split("\r\n\r\n", 1)[1])


@pytest.mark.parametrize("headers, status", [
    (b"Content-Length: 31457280\r\nExpect: 100-continue\r\n", "413"),  # refused before the upload, no 100
    (b"Transfer-Encoding: xchunked\r\n", "400"),  # waitress's 501, a client error here
])
def test_refusals_on_the_headers_alone_are_4xx_json(server_url, headers, status):
    sock = connect_from("127.0.0.1", port_of(server_url))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n" + headers + b"\r\n")
    sock.settimeout(5)
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    sock.close()
    reply = reply.decode()
    assert reply.startswith(f"HTTP/1.1 {status}") and "100 Continue" not in reply, reply[:200]
    assert "error" in json.loads(reply.split("\r\n\r\n", 1)[1])


def test_uploads_are_never_written_to_disk(server_url, monkeypatch):
    def no_disk(*args, **kwargs):
        raise AssertionError("an upload went to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", no_disk)
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG", compress_level=0)
    image = buffer.getvalue()
    assert 1_000_000 < len(image) < LIMITS.max_bytes  # over both libraries' spooling thresholds
    assert post(f"{server_url}/predict", image)[0] == 200
    boundary = "b0undary"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    status, _ = post(f"{server_url}/predict", multipart,
                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, "PNG")
    return buffer.getvalue()


def post_files(client, blobs, query=""):
    data = {"file": [(io.BytesIO(b), f"f{i}.png") for i, b in enumerate(blobs)]}
    return client.post(f"/predict{query}", data=data, content_type="multipart/form-data")


def test_work_per_request_is_bounded_before_decoding(recognizer, monkeypatch):
    decoded = []
    real_load = serve_module.load_pixels
    monkeypatch.setattr(serve_module, "load_pixels", lambda im: decoded.append(im.size) or real_load(im))
    limits = Limits(max_request_pixels=3_000_000, max_beam_work=64)
    client = create_app(recognizer, limits).test_client()
    # each image is under the per-image limit, together they are over the request's
    r = post_files(client, [png(1000, 1000)] * 4)
    assert r.status_code == 413 and "pixels in one request" in r.json["error"]
    r = post_files(client, [png(128, 64)] * 4, "?beam=32")
    assert r.status_code == 413 and "files x beam" in r.json["error"]
    assert decoded == []
    r = post_files(client, [png(128, 64)] * 2, "?beam=32")
    assert r.status_code == 200 and len(r.json["results"]) == 2


# -- the supervised worker processes --------------------------------------------------------

def alive(pids) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_workers_are_replaced_and_die_with_the_supervisor(tiny_dataset, tmp_path):
    model, port = tiny_dataset / "models/model.pt", free_port()
    proc = start_serve(model, port, "--workers", "2")
    try:
        wait_healthy(port, proc)
        parent = psutil.Process(proc.pid)
        assert wait_for(lambda: len(parent.children()) == 2)
        first = [c.pid for c in parent.children()]
        os.kill(first[0], signal.SIGKILL)  # a crashed worker is replaced
        assert wait_for(lambda: len(alive(c.pid for c in parent.children())) == 2 and
                        first[0] not in [c.pid for c in parent.children()])
        wait_healthy(port, proc)

        # a second server on the same port: one line, exit 2
        other = start_serve(model, port, "--workers", "1")
        _, err = other.communicate(timeout=60)
        assert other.returncode == 2 and "cannot listen on 127.0.0.1" in err.decode()
        assert len(err.decode().strip().splitlines()) == 1

        workers = [c.pid for c in parent.children()]
        proc.send_signal(signal.SIGTERM)  # the supervisor stops, its workers with it
        proc.wait(timeout=20)
        assert wait_for(lambda: not alive(workers))
    finally:
        proc.kill()
        proc.wait()

    proc = start_serve(model, port, "--workers", "2")  # the port is free again
    try:
        wait_healthy(port, proc)
        workers = [c.pid for c in psutil.Process(proc.pid).children()]
        proc.kill()  # even a SIGKILLed supervisor takes its workers with it
        proc.wait()
        assert wait_for(lambda: not alive(workers))
    finally:
        proc.kill()
        proc.wait()


def test_serve_refuses_a_bad_host_or_model_in_one_line(tiny_dataset, tmp_path):
    for args in (["--model", str(tiny_dataset / "models/model.pt"), "--host", "999.1.1.1"],
                 ["--model", str(tmp_path / "missing.pt")]):
        r = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--port", str(free_port()), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("command", ["serve", "label"])
@pytest.mark.parametrize("port", ["70000", "-1", "0"])
def test_a_port_out_of_range_is_refused_before_anything_starts(tmp_path, command, port):
    from click.testing import CliRunner

    from pipeline.__main__ import cli

    args = [command, "--port", port] + ([str(tmp_path)] if command == "label" else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "'--port'" in result.output and "1<=x<=65535" in result.output
    assert not (tmp_path / "labels.csv").exists()


def test_a_broken_model_file_never_takes_the_service_down(tiny_dataset, tmp_path):
    """As during `dvc repro`: the model file is broken when a worker crashes. The other worker keeps
    serving the model it loaded, /healthz says one is down, and the replacement comes back once the
    file is whole again."""
    import urllib.request

    model, port = tmp_path / "model.pt", free_port()
    shutil.copy(tiny_dataset / "models/model.pt", model)
    proc = start_serve(model, port, "--workers", "2")

    def health():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return json.loads(r.read())

    try:
        wait_healthy(port, proc)
        parent = psutil.Process(proc.pid)
        assert wait_for(lambda: len(parent.children()) == 2)
        time.sleep(10.5)  # past the supervisor's start-up window: the service counts as up
        good = model.read_bytes()
        model.write_bytes(b"half-written")
        os.kill(parent.children()[0].pid, signal.SIGKILL)
        assert wait_for(lambda: health()["workers_down"] == 1, 30)
        assert health()["status"] == "degraded" and proc.poll() is None
        image = Renderer(128, 64).png("AB12", 3)
        for _ in range(10):
            request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=image, method="POST")
            with urllib.request.urlopen(request, timeout=10) as r:
                assert r.status == 200 and "text" in json.loads(r.read())
        model.write_bytes(good)
        assert wait_for(lambda: {k: health()[k] for k in ("status", "workers", "workers_down")}
                        == {"status": "ok", "workers": 2, "workers_down": 0}, 60)
        assert len(alive(c.pid for c in parent.children())) == 2
    finally:
        proc.kill()
        proc.wait()

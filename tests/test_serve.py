from __future__ import annotations

import io
import json
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.serving.app import Limits, create_app
from tests.helpers import EchoRecognizer, captcha_png


@pytest.fixture(scope="module")
def client(recognizer):
    app = create_app(recognizer, Limits(max_bytes=200_000, max_files=4, max_pixels=1_000_000))
    return app.test_client()


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid PNG of width x height grey pixels: about 100 KB on disk, 100 megapixels decoded."""
    packer, row = zlib.compressobj(9), b"\x00" + bytes(width)
    raw = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def post(client, *files, field="file", query=""):
    data = {field: [(io.BytesIO(b), f"f{i}.png") for i, b in enumerate(files)]}
    return client.post(f"/predict{query}", data=data, content_type="multipart/form-data")


def test_one_file(client, recognizer):
    image = captcha_png("AB12", 1)
    r = post(client, image)
    assert r.status_code == 200
    expected = recognizer.predict([image])[0]
    assert r.json == {"text": expected.text, "confidence": pytest.approx(expected.confidence, abs=1e-6)}


def test_several_files_in_order_and_raw_body(client, recognizer):
    images = [captcha_png(t, i) for i, t in enumerate(["AAAA", "B1C2", "ZZ99"])]
    r = post(client, *images)
    assert r.status_code == 200
    assert [x["text"] for x in r.json["results"]] == [p.text for p in recognizer.predict(images)]
    raw = client.post("/predict", data=images[1], content_type="image/png")
    assert raw.status_code == 200 and raw.json["text"] == r.json["results"][1]["text"]


@pytest.mark.parametrize("make, status", [
    (lambda c: c.post("/predict", data={"other": (io.BytesIO(b"x"), "a.png")}, content_type="multipart/form-data"), 400),
    (lambda c: c.post("/predict", data=b"", content_type="image/png"), 400),
    (lambda c: post(c, b""), 400),
    (lambda c: post(c, b"this is not an image at all"), 415),
    (lambda c: post(c, captcha_png("AB12", 1)[:300]), 400),
    (lambda c: post(c, b"\x00" * 300_000), 413),
    (lambda c: post(c, bomb_png()), 413),
    (lambda c: post(c, *[captcha_png("AB12", i) for i in range(5)]), 413),
    (lambda c: c.get("/predict"), 405),
    (lambda c: c.post("/predict?beam=zero", data=captcha_png("AB12", 1), content_type="image/png"), 400),
    (lambda c: c.get("/nowhere"), 404),
])
def test_bad_input_gets_json_error_and_server_keeps_serving(client, make, status):
    r = make(client)
    assert r.status_code == status
    assert set(r.json) == {"error"} and r.json["error"]
    assert post(client, captcha_png("AB12", 1)).status_code == 200


def test_bomb_is_rejected_before_decoding(recognizer, monkeypatch):
    from PIL import ImageFile

    decoded = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    app = create_app(recognizer, Limits(max_bytes=2_000_000))
    bomb = bomb_png()
    assert len(bomb) < 200_000
    r = post(app.test_client(), bomb)
    assert r.status_code == 413 and "pixels" in r.json["error"]
    assert decoded == []


def test_concurrent_requests_get_their_own_answers(recognizer):
    echo = EchoRecognizer(recognizer.preprocess)
    client = create_app(echo).test_client()
    images = [captcha_png(f"{c}{c}{i % 10}{i % 7}", i) for i, c in enumerate("ABCDEFGHJK" * 3)]
    expected = [f"{float(recognizer.preprocess(im).sum()):.3f}" for im in images]
    assert len(set(expected)) == len(images)
    got = [None] * len(images)
    barrier = threading.Barrier(len(images))

    def worker(i):
        barrier.wait()
        got[i] = post(client, images[i]).json["text"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    assert sum(echo.batch_sizes) == len(images)
    # a beam search (slow when wide) runs in its request's thread, never the batcher's
    echo.decoding_threads.clear()
    r = post(client, *images[:3], query="?beam=8")
    assert [x["text"] for x in r.json["results"]] == expected[:3]
    assert echo.decoding_threads and "micro-batcher" not in echo.decoding_threads


def test_healthz_and_model(client):
    assert client.get("/healthz").status_code == 200
    info = client.get("/model").json
    assert info["arch"] == "fast" and info["input"]["height"] == 32


def test_images_of_any_mode_and_size(recognizer):
    base = Image.open(io.BytesIO(captcha_png("AB12", 3)))
    variants = [base, base.convert("RGBA"), base.convert("L"), base.convert("P"), base.convert("1"),
                base.resize((300, 90)), np.asarray(base), np.asarray(base.convert("L")).astype(np.uint16) * 257,
                Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)]
    preds = recognizer.predict(variants)
    assert len(preds) == len(variants)
    assert all(0.0 <= p.confidence <= 1.0 for p in preds)
    # the same pixels in another container read the same
    assert preds[0].text == preds[6].text and preds[2].text == preds[7].text == preds[8].text


def test_odd_beams_and_raw_bodies_of_any_content_type(client, recognizer):
    image = captcha_png("AB12", 1)
    assert client.post("/predict?beam=\u00b2", data=image, content_type="image/png").status_code == 400
    assert client.post("/predict?beam=%EF%BC%93", data=image, content_type="image/png").status_code == 400
    expected = recognizer.predict([image])[0].text
    for content_type in ("application/x-www-form-urlencoded", "application/octet-stream", None):
        r = client.post("/predict", data=image, content_type=content_type)
        assert r.status_code == 200 and r.json["text"] == expected, content_type


def test_nothing_but_the_api_is_served(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "secret.txt").write_text("secret")
    (tmp_path / "params.yaml").write_text("secret")
    for path in ("/static/secret.txt", "/static/../params.yaml", "/params.yaml"):
        assert client.get(path).status_code == 404


def test_model_reports_only_its_own_metrics(recognizer, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"seq_accuracy": 0.5, "n": 10, "model_sha256": "another model"}))
    app = create_app(recognizer, metrics_path=metrics)
    assert "test_metrics" not in app.test_client().get("/model").json
    metrics.write_text(json.dumps({"seq_accuracy": 0.5, "n": 10, "model_sha256": recognizer.model_sha256}))
    assert app.test_client().get("/model").json["test_metrics"]["seq_accuracy"] == 0.5


def test_keep_aspect_resizes_to_the_height_and_pads_the_width():
    from pipeline.model.preprocess import Preprocess

    keep = Preprocess(32, 160, 1, keep_aspect=True)
    gradient = np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (40, 1))  # 120 x 40: aspect 3
    arr = keep(Image.fromarray(gradient))
    assert arr.shape == (1, 32, 160)
    # 96 columns of the image (3 x 32), then the last column repeated
    assert np.allclose(arr[0, :, 96:], arr[0, :, 95:96])
    assert arr[0, 0, 94] < arr[0, 0, 95]
    squash = Preprocess(32, 160, 1)
    assert not np.allclose(squash(Image.fromarray(gradient))[0, :, 100:], arr[0, :, 100:])
    # wider than the input allows: squashed to the full width, nothing cut off
    wide = keep(Image.fromarray(np.tile(np.linspace(0, 255, 1000, dtype=np.uint8), (40, 1))))
    assert wide[0, 0, -1] > wide[0, 0, -2] and wide[0, 0, 0] < wide[0, 0, 1]


def test_allowed_and_case_per_request_as_predict_has_them(client, recognizer):
    image = captcha_png("AB12", 1)
    for query, allowed, case in (("?allowed=0123456789", "0123456789", None), ("?case=lower", None, "lower"),
                                 ("?allowed=AB12&case=lower&beam=3", "AB12", "lower")):
        r = post(client, image, query=query)
        beam = 3 if "beam" in query else 1
        expected = recognizer.predict([image], beam=beam, allowed=allowed, case=case)[0]
        assert r.status_code == 200 and r.json["text"] == expected.text, query
    assert set(post(client, image, query="?allowed=0123456789").json["text"]) <= set("0123456789")
    for query, message in (("?case=sideways", "case must be upper or lower"), ("?allowed=%C3%A4", "not in the model's charset"),
                           ("?lang=en", "unknown query key 'lang'")):
        r = post(client, image, query=query)
        assert r.status_code == 400 and message in r.json["error"], query


def test_a_photo_is_read_the_way_up_its_exif_says():
    """A phone stores a photo taken on its side with its pixels turned and an EXIF orientation."""
    from pipeline.data.images import decode_image

    upright = Image.new("L", (60, 20), 255)
    upright.paste(0, (0, 0, 10, 20))  # a dark bar at the left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as the camera wrote the pixels: 20 x 60
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    image = decode_image(buffer.getvalue())
    assert image.size == (60, 20) and image.getpixel((2, 10)) < 60 and image.getpixel((55, 10)) > 200

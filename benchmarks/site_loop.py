"""The feedback loop against a simulated site: labels from the site's verdicts, and from a person
typing some of what the site rejected.

The simulated site serves captchas of a yardstick style (rendered from its own seeds, split `site`)
over HTTP and, as a real site does, says whether an answer was right, from its true labels. The
client plays the user's bot: for each captcha it asks `serve` (a real `python -m pipeline serve
--keep` process) for a reading, submits it to the site, and posts the site's verdict to serve's
POST /feedback. After each round of --per-round captchas the loop runs the fine-tune route on the
kept folder (the real ingest, reading the verdicts from kept/labels.csv, and train with
profiles/finetune.yaml and any --set for --minutes: round 1 from the ddddocr trunk, each later round
from the model being served) and swaps the new model into the running server with SIGHUP. After
each round the new model is scored on the yardstick's test captchas of the style, which the loop
never sees. The loop stops after --rounds, or once the test accuracy reaches --until.

With --typed N, after each round a person types the true label of the captchas the site rejected
(as the label page saves answers, to kept/labels.csv), until N labels are typed in all; keystrokes
are counted as benchmarks/labelling.py counts them: the characters, then Enter. With --unlabelled,
the kept captchas that have no label (rejected and not typed, or not judged) are ingested as
unlabelled captchas, for whatever --set asks of them (train.consistency, train.pseudo_rounds).

    python -m benchmarks.site_loop --style claptcha [--rounds 10] [--until 0.95] [--minutes 5] [--typed 1000]
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import click
from flask import Flask, request
from werkzeug.serving import make_server

from benchmarks.common import host_kind, parse_override, serve_process, wait_for_model
from benchmarks.yardstick import (
    ALPHABETS,
    accuracy,
    fine_tune,
    packaged_trunk,
    read_with_model,
    render_one,
    render_style,
)
from pipeline.data.label_log import SITE_ACCEPTED, SITE_REJECTED, AnswerLog, read_answers
from pipeline.files import file_sha256, write_json


def site_app(style: str, labels: dict[str, str] | None = None) -> Flask:
    """GET /captcha: a new captcha (PNG, its id in X-Captcha-Id); POST /answer {id, text}: {correct}.
    Letters compare case-insensitively, as most sites (and the yardstick) do; each id is answerable
    once. `labels`, when given, records every captcha's true label by id: what a person reads on it."""
    app = Flask("simulated-site")
    issued: dict[str, str] = {}  # id -> label, until answered
    served = itertools.count()
    lock = threading.Lock()

    @app.get("/captcha")
    def captcha():
        with lock:
            index = next(served)
        label, png = render_one(style, "site", index)
        with lock:
            issued[str(index)] = label
            if labels is not None:
                labels[str(index)] = label
        return png, 200, {"Content-Type": "image/png", "X-Captcha-Id": str(index)}

    @app.post("/answer")
    def answer():
        body = request.get_json()
        with lock:
            label = issued.pop(str(body["id"]), None)
        return {"correct": label is not None and label.upper() == str(body["text"]).upper()}

    return app


def call(url: str, data: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read(), r.headers


def post_json(url: str, obj) -> dict:
    return json.loads(call(url, json.dumps(obj).encode(), {"Content-Type": "application/json"})[0])


def play_round(site_url: str, serve_url: str, n: int, alphabet: str) -> dict:
    """n captchas from the site, each read by serve, answered, and its verdict fed back. `kept`:
    the site's id of each kept captcha's image file, for the person who may read it later."""
    query = urllib.parse.urlencode({"allowed": alphabet, "case": "upper"})
    accepted, kept = 0, {}
    started = time.perf_counter()
    for _ in range(n):
        png, headers = call(f"{site_url}/captcha")
        reading = json.loads(call(f"{serve_url}/predict?{query}", png, {"Content-Type": "image/png"})[0])
        verdict = post_json(f"{site_url}/answer", {"id": headers["X-Captcha-Id"], "text": reading["text"]})
        if reading["text"] and "id" in reading:  # an empty reading is no answer worth a verdict
            post_json(f"{serve_url}/feedback", {"id": reading["id"], "correct": verdict["correct"]})
        accepted += verdict["correct"]
        if "id" in reading:
            kept[f"{reading['id']}.png"] = headers["X-Captcha-Id"]
    return {"accepted": accepted, "answered": n, "seconds": round(time.perf_counter() - started, 1), "kept": kept}


def type_rejected(kept: Path, site_ids: dict[str, str], labels: dict[str, str], budget: int) -> tuple[int, int]:
    """A person types the true label of this round's rejected captchas, as the label page saves
    them, until `budget` labels are typed; returns (labels typed, keystrokes)."""
    log = AnswerLog(kept / "labels.csv")
    typed = keystrokes = 0
    for path, answer in read_answers(kept / "labels.csv").items():
        if typed >= budget:
            break
        if answer.status == SITE_REJECTED and path in site_ids and (kept / path).exists():
            label = labels[site_ids[path]].upper()
            log.append(path, label, "labelled", "person", answer.model_text, 0.0)
            typed += 1
            keystrokes += len(label) + 1  # the characters, then Enter (nothing pre-filled)
    return typed, keystrokes


@click.command(help=__doc__)
@click.option("--style", default="serif", show_default=True)
@click.option("--rounds", default=10, show_default=True, help="at most this many rounds")
@click.option("--until", default=1.0, show_default=True, help="stop once the test accuracy reaches this")
@click.option("--per-round", default=1000, show_default=True)
@click.option("--minutes", default=5.0, show_default=True, help="training budget of each retrain")
@click.option("--test", "test_n", default=500, show_default=True, help="test captchas of the style, never in the loop")
@click.option("--typed", default=0, show_default=True,
              help="a person types the rejected captchas after each round, this many labels in all")
@click.option("--unlabelled", is_flag=True, help="ingest the kept captchas without a label as unlabelled ones")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="a params value for every retrain")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports/bench/site_loop.json"), show_default=True)
def main(style, rounds, until, per_round, minutes, test_n, typed, unlabelled, settings, out) -> None:
    repo = Path(__file__).resolve().parents[1]
    alphabet = ALPHABETS[style].upper()
    test = render_style(style, "test", test_n)
    test_labels, test_images = [t for t, _ in test], [p for _, p in test]
    overrides = dict(parse_override(s) for s in settings) | ({"ingest.unlabelled": True} if unlabelled else {})

    work = Path(tempfile.mkdtemp(prefix="site-loop-"))
    kept, served = work / "kept", work / "served.pt"
    packaged_trunk(served, repo)  # the best zero-shot start: ddddocr's reader cut to 0-9A-Z
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    site_labels: dict[str, str] = {}
    site = make_server("127.0.0.1", 0, site_app(style, site_labels), threaded=True)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    site_url = f"http://127.0.0.1:{site.server_port}"
    report = {"date": time.strftime("%Y-%m-%d"), "host": host_kind(), "style": style, "per_round": per_round,
              "minutes": minutes, "typed_budget": typed, "unlabelled": unlabelled, "settings": overrides,
              "test_n": test_n, "rounds": []}
    started_loop = time.perf_counter()
    try:
        with serve_process(served, "--workers", "1", "--torch", "--keep", str(kept)) as (serve_url, server):
            readings, _ = read_with_model(served, test_images, ALPHABETS[style])
            print(f"zero-shot: test {accuracy(test_labels, readings):.3f}", flush=True)
            report["zero_shot_test_accuracy"] = accuracy(test_labels, readings)
            keystrokes = typed_so_far = 0
            for round_number in range(1, rounds + 1):
                played = play_round(site_url, serve_url, per_round, alphabet)
                if typed_so_far < typed:
                    count, strokes = type_rejected(kept, played["kept"], site_labels, typed - typed_so_far)
                    typed_so_far, keystrokes = typed_so_far + count, keystrokes + strokes
                answers = read_answers(kept / "labels.csv")
                free = sum(a.status == SITE_ACCEPTED for a in answers.values())
                started = time.perf_counter()
                # round 1 starts from the trunk, each later one from the model being served: the loop's
                # training adds up, on every label so far
                start = served if round_number > 1 else None
                tuned = fine_tune(start, start, [], minutes, work / f"round-{round_number}", repo,
                                  trunk=start is None, labels_csv=kept / "labels.csv", overrides=overrides)
                train_minutes = (time.perf_counter() - started) / 60
                readings, _ = read_with_model(tuned, test_images, ALPHABETS[style])
                shutil.copy(tuned, work / "next.pt")
                os.replace(work / "next.pt", served)  # whole, then renamed, as the train stage writes it
                server.send_signal(signal.SIGHUP)
                wait_for_model(serve_url, file_sha256(served))
                row = {"round": round_number, "site_accepted": played["accepted"] / played["answered"],
                       "labels_from_verdicts": free, "typed": typed_so_far, "keystrokes": keystrokes,
                       "test_accuracy_after": accuracy(test_labels, readings),
                       "retrain_minutes": round(train_minutes, 2), "play_seconds": played["seconds"],
                       "loop_minutes": round((time.perf_counter() - started_loop) / 60, 1)}
                report["rounds"].append(row)
                print(json.dumps(row), flush=True)
                write_json(out, report)
                if row["test_accuracy_after"] >= until:
                    break
    finally:
        site.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(format_table(report))


def format_table(report: dict) -> str:
    lines = ["| round | site accepted (during the round) | labels from verdicts | typed (keystrokes) "
             "| test accuracy after it | minutes so far |",
             "|---|---|---|---|---|---|", f"| 0 (zero-shot) | | 0 | 0 | {report['zero_shot_test_accuracy']:.1%} | |"]
    for r in report["rounds"]:
        lines.append(f"| {r['round']} | {r['site_accepted']:.1%} | {r['labels_from_verdicts']:,} "
                     f"| {r['typed']:,} ({r['keystrokes']:,}) | {r['test_accuracy_after']:.1%} | {r['loop_minutes']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

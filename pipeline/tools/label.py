"""`label`: a local web page for labelling a folder of captchas, the model's reading pre-filled.

The folder's images are read once by the model and shown least-confident first, so human time
goes where the model is unsure. Every answer is appended to a CSV at once (flushed and fsynced:
killing the server loses at most the answer being typed) that `ingest` reads as `ingest.labels`
(the columns and statuses: pipeline/data/label_log.py). Reopening the page continues where it
stopped; two tabs on one folder never answer the same image twice (the second gets 409 and moves on).

On the folder that `serve --keep` fills, the CSV holds the site's verdicts: readings the site
accepted are labels already; those it rejected come first, the wrong reading shown but not
pre-filled.
"""
from __future__ import annotations

import getpass
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import click
from flask import Flask, abort, jsonify, request, send_file

from pipeline.cli import command, model_option, run
from pipeline.data.images import image_paths, load_image
from pipeline.data.label_log import SITE_REJECTED, Answer, AnswerLog, read_answers
from pipeline.data.labelled_folders import shown_name, utf8_name
from pipeline.errors import PipelineError
from pipeline.params import MAX_LABEL_LENGTH
from pipeline.read.recognizer import Recognizer
from pipeline.serving.app import json_body
from pipeline.serving.http import listen

PAGE = Path(__file__).with_name("label.html")


@dataclass
class Item:
    path: str  # relative to the folder, '/'-separated
    text: str  # the model's reading
    confidence: float


class UnknownImage(LookupError):
    """An answer for a path that is not one of the folder's images."""


class AlreadyAnswered(Exception):
    """A second answer for one image, without overwrite."""


class Gone(LookupError):
    """An image of the folder deleted since the page opened (serve --keep's budget drops the oldest)."""


def list_images(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in image_paths(folder)]


def load_named(folder: Path, name: str):
    """The image of a folder's file, named as a labels CSV can name it: in UTF-8."""
    if not utf8_name(name):
        raise ValueError("file name is not UTF-8; rename it")
    return load_image(folder / name)


def read_folder(folder: Path, recognizer: Recognizer, batch_size: int = 64) -> tuple[list[Item], list[dict]]:
    """The model's reading of every image, least confident first; and the files that cannot be read."""
    items, bad = [], []
    for name, reading in recognizer.read_each(list_images(folder), lambda name: load_named(folder, name), batch_size):
        if isinstance(reading, Exception):
            bad.append({"path": shown_name(name), "reason": str(reading)})
        else:
            items.append(Item(name, reading.text, reading.confidence))
    items.sort(key=lambda it: (it.confidence, it.path))
    return items, bad


class Session:
    """The folder's images, the answers so far, and the rules for a new answer."""

    def __init__(self, folder: Path, items: list[Item], bad: list[dict], log: AnswerLog, charset: str,
                 who: str):
        self.folder, self.items, self.bad, self.log = folder, items, bad, log
        self.charset, self.who = charset, who
        self.by_path = {it.path: it for it in items}
        answers = read_answers(log.path)
        self.answers = {p: a for p, a in answers.items() if a.status != SITE_REJECTED}
        self.rejected = {p: a.model_text for p, a in answers.items() if a.status == SITE_REJECTED}
        self.items = sorted(items, key=lambda it: it.path not in self.rejected)  # stable: confidence within
        self._lock = threading.Lock()
        # a charset without lower-case letters reads typed lower case as upper case
        self.fold_upper = not any(c.islower() for c in charset) and any(c.isupper() for c in charset)

    def accept_above(self, threshold: float) -> int:
        """Write the model's reading as the label of every unanswered image read with at least `threshold`."""
        count = 0
        for item in self.items:
            if (item.path not in self.answers and item.confidence >= threshold and item.text
                    and item.text != self.rejected.get(item.path)):  # the site said this reading is wrong
                self._record(item, Answer(item.text, "auto", "model"))
                count += 1
        return count

    def check_label(self, label: str) -> str:
        """The label as stored, or PipelineError saying why it is refused."""
        label = label.strip()
        if self.fold_upper:
            label = label.upper()
        if not label:
            raise PipelineError("empty label: type the characters, or mark the image unreadable")
        if len(label) > MAX_LABEL_LENGTH:
            raise PipelineError(f"label of {len(label):,} characters: at most {MAX_LABEL_LENGTH} "
                                f"(ingest.max_length's limit)")
        unknown = "".join(dict.fromkeys(c for c in label if c not in self.charset))
        if unknown:
            raise PipelineError(f"characters not in the charset: {unknown!r} (charset: {self.charset})")
        return label

    def answer(self, path: str, label: str, status: str, overwrite: bool = False) -> Answer:
        item = self.by_path.get(path)
        if item is None:
            raise UnknownImage(path)
        if not self.present(item):
            raise Gone(path)
        if status not in ("labelled", "unreadable"):
            raise PipelineError(f"status must be labelled or unreadable, got {status!r}")
        label = self.check_label(label) if status == "labelled" else ""
        with self._lock:
            if path in self.answers and not overwrite:
                raise AlreadyAnswered(path)
            return self._record(item, Answer(label, status, self.who))

    def _record(self, item: Item, answer: Answer) -> Answer:
        self.log.append(item.path, answer.label, answer.status, answer.who, item.text, item.confidence)  # disk first
        self.answers[item.path] = answer
        return answer

    def progress(self) -> dict:
        human = [(self.by_path[p], a) for p, a in self.answers.items() if a.status == "labelled" and p in self.by_path]
        agree = sum(item.text == a.label for item, a in human)
        return {"total": len(self.items), "answered": len(self.answers), "auto": sum(a.status == "auto" for a in self.answers.values()),
                "remaining": sum(it.path not in self.answers for it in self.items), "unreadable_files": len(self.bad),
                "human": len(human), "agreement": agree / len(human) if human else None}

    def present(self, item: Item) -> bool:
        return os.path.lexists(self.folder / item.path)

    def queue(self, limit: int, exclude: set[str]) -> list[dict]:
        out = []
        for index, item in enumerate(self.items):
            if item.path in self.answers or item.path in exclude or not self.present(item):
                continue
            entry = {"index": index, "path": item.path, "text": item.text, "confidence": round(item.confidence, 4)}
            if item.path in self.rejected:  # not pre-filled: the page would offer the reading the site refused
                entry.update(text="", rejected=self.rejected[item.path])
            out.append(entry)
            if len(out) >= limit:
                break
        return out


def create_app(session: Session, hosts: set[str] | None = None) -> Flask:
    """The page and its API. `hosts`: the Host headers to answer (the address it listens on); any
    other is refused, so that a web page the user visits cannot reach it by DNS rebinding."""
    app = Flask("captcha-crnn-label")

    def error(code: int, message: str, **extra):
        response = jsonify({"error": message, **extra})
        response.status_code = code
        return response

    @app.before_request
    def only_our_host():
        if hosts is not None and request.host.lower() not in hosts:
            return error(403, f"this page answers only to {', '.join(sorted(hosts))}")

    @app.get("/")
    def page():
        return send_file(PAGE, mimetype="text/html")

    @app.get("/api/state")
    def state():
        exclude = set(request.args.getlist("skip"))
        return {"progress": session.progress(), "queue": session.queue(20, exclude), "bad": session.bad,
                "charset": session.charset, "fold_upper": session.fold_upper}

    @app.get("/image/<int:index>")
    def image(index: int):
        if not 0 <= index < len(session.items):
            abort(404)
        item = session.items[index]
        try:
            return send_file(open(session.folder / item.path, "rb"), download_name=Path(item.path).name, max_age=3600)
        except FileNotFoundError:
            return error(410, f"{item.path} was deleted from the folder since the page opened")

    @app.post("/api/answer")
    def answer():
        body = json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            return error(400, "expected JSON {path, label, status}")
        try:
            saved = session.answer(body["path"], str(body.get("label", "")), str(body.get("status", "labelled")),
                                   overwrite=body.get("overwrite") is True)  # "false", 1: no
        except UnknownImage:
            return error(404, f"not an image of this folder: {body['path']}")
        except Gone:
            return error(410, f"{body['path']} was deleted from the folder since the page opened; skipped")
        except AlreadyAnswered:
            previous = session.answers[body["path"]]
            return error(409, "already answered (another tab?)", label=previous.label, status=previous.status)
        except PipelineError as e:
            return error(400, str(e))
        return {"saved": {"path": body["path"], "label": saved.label, "status": saved.status},
                "progress": session.progress()}

    return app


def open_session(folder: Path, model: Path, labels: Path | None, who: str | None = None,
                 charset: str | None = None) -> Session:
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: folder not found")
    recognizer = Recognizer(model)
    items, bad = read_folder(folder, recognizer)
    log = AnswerLog(Path(labels) if labels else folder / "labels.csv")
    return Session(folder, items, bad, log, charset or recognizer.charset.chars, who or getpass.getuser())


def label(folder: Path, model: Path, labels: Path | None, host: str, port: int, accept_above: float | None,
          who: str | None = None) -> None:
    import waitress

    sock = listen(host, port)  # a busy port fails now, before the labels CSV is touched
    session = open_session(folder, model, labels, who)
    if accept_above is not None:
        count = session.accept_above(accept_above)
        print(f"accepted {count} readings with confidence >= {accept_above} as labels", flush=True)
    p = session.progress()
    print(f"{p['total']} images ({p['remaining']} to label, {len(session.bad)} unreadable files); "
          f"answers in {session.log.path}; open http://{host}:{port}/", flush=True)
    named = f"[{host}]" if ":" in host else host
    hosts = {f"{named}:{port}"} | ({f"localhost:{port}"} if host in ("127.0.0.1", "::1", "localhost") else set())
    waitress.serve(create_app(session, hosts), sockets=[sock], threads=4, ident="captcha-crnn-label", _quiet=True)


@command("label")
@click.argument("folder", type=click.Path(path_type=Path))
@model_option
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="the labels CSV to append to [default: FOLDER/labels.csv]; ingest reads it as ingest.labels")
@click.option("--accept-above", type=click.FloatRange(0, 1), default=None,
              help="write readings of at least this confidence as labels without asking (status auto)")
@click.option("--user", default=None, help="who is labelling (the CSV's who column) [default: login name]")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8001, show_default=True, type=click.IntRange(1, 65535))
def cli(folder, model_path, labels, accept_above, user, host, port):
    """Label FOLDER's captchas in a web page, the model's reading pre-filled, least confident first."""
    label(folder, model_path, labels, host, port, accept_above, who=user)


if __name__ == "__main__":  # python -m pipeline.tools.NAME
    run(__spec__.name)

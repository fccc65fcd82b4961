"""`serve --keep FOLDER`: every answered captcha on disk with its reading, and the site's verdict.

    FOLDER/<id>.<png|jpg|...>  the image as uploaded, in its own format
    FOLDER/<id>.json           {id, image, text, confidence, model_sha256, time}; the id is valid while it exists
    FOLDER/<id>.verdict        created once (O_EXCL) when the verdict comes: a second one is refused
    FOLDER/labels.csv          the verdicts, as rows of the labels CSV (pipeline/data/label_log.py)

An id is 32 hex digits, the time in nanoseconds then 64 random bits: names sort by age, and nobody
can guess an id they were not given. Nothing the client sends becomes a path. The folder holds at
most `max_captchas` captchas and `max_bytes` bytes over all serve processes (a `Budget` in shared
memory); past either, the oldest are dropped, down to nine tenths of it.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.label_log import SITE_ACCEPTED, SITE_REJECTED, AnswerLog
from pipeline.errors import PipelineError
from pipeline.files import atomic_write

log = logging.getLogger("captcha-crnn.serve")

ID = re.compile(r"[0-9a-f]{32}")
SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}  # data.images.FORMATS
LABELS_CSV = "labels.csv"


class UnknownId(LookupError):
    """An id this server did not issue, or whose captcha is gone."""


class AlreadyJudged(Exception):
    """A second verdict for one id."""


@dataclass(frozen=True)
class KeepLimits:
    max_captchas: int = 100_000
    max_bytes: int = 1024 * 2**20


class Budget:
    """Counts of the folder's captchas and bytes, shared by the serve processes forked after it."""

    def __init__(self, limits: KeepLimits, context=None):
        context = context or multiprocessing.get_context("fork")
        self.limits = limits
        self.lock = context.Lock()
        self.captchas = context.RawValue("q", 0)
        self.bytes = context.RawValue("q", 0)
        self.dropped = context.RawValue("q", 0)

    def stats(self) -> dict:
        return {"captchas": self.captchas.value, "bytes": self.bytes.value, "dropped": self.dropped.value,
                "max_captchas": self.limits.max_captchas, "max_bytes": self.limits.max_bytes}


def scan(folder: Path) -> dict[str, list[tuple[Path, int]]]:
    """id -> its files and their sizes."""
    ids: dict[str, list[tuple[Path, int]]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem = entry.name.split(".", 1)[0]
            if ID.fullmatch(stem) and entry.is_file(follow_symlinks=False):
                try:
                    ids.setdefault(stem, []).append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
                except FileNotFoundError:  # dropped meanwhile
                    pass
    return ids


class Keeper:
    def __init__(self, folder: Path, budget: Budget):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(f"{folder}: cannot create the --keep folder ({e.strerror})") from None
        self.budget = budget
        self.labels = AnswerLog(self.folder / LABELS_CSV)

    def recount(self) -> None:
        """Set the shared counts from the folder (at start-up: it may hold a previous run's captchas)."""
        with self.budget.lock:
            self._prune(scan(self.folder))

    def keep(self, data: bytes, image_format: str, text: str, confidence: float, model_sha256: str) -> str:
        """Write one answered captcha; returns its id."""
        captcha_id = f"{time.time_ns():016x}{secrets.token_hex(8)}"
        image = f"{captcha_id}{SUFFIX[image_format]}"
        record = json.dumps({"id": captcha_id, "image": image, "text": text, "confidence": round(confidence, 6),
                             "model_sha256": model_sha256, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        atomic_write(self.folder / image, lambda f: f.write(data))
        atomic_write(self.folder / f"{captcha_id}.json", lambda f: f.write(record))  # last: the id is valid now
        b = self.budget
        with b.lock:
            b.captchas.value += 1
            b.bytes.value += len(data) + len(record)
            if b.captchas.value > b.limits.max_captchas or b.bytes.value > b.limits.max_bytes:
                self._prune(scan(self.folder))
        return captcha_id

    def _prune(self, ids: dict[str, list[tuple[Path, int]]]) -> None:
        """Drop the oldest captchas until the folder is within the budget (below 9/10 of it when it was over)."""
        b = self.budget
        total = sum(size for files in ids.values() for _, size in files)
        count = len(ids)
        over = count > b.limits.max_captchas or total > b.limits.max_bytes
        max_count, max_bytes = ((b.limits.max_captchas * 9 // 10, b.limits.max_bytes * 9 // 10) if over
                                else (b.limits.max_captchas, b.limits.max_bytes))
        dropped = 0
        for captcha_id in sorted(ids):
            if count <= max_count and total <= max_bytes:
                break
            for path, size in ids[captcha_id]:
                path.unlink(missing_ok=True)
                total -= size
            count -= 1
            dropped += 1
        b.captchas.value, b.bytes.value = count, total
        b.dropped.value += dropped
        if dropped:
            log.info("--keep: dropped the %d oldest captchas (%d kept, %d bytes)", dropped, count, total)

    def verdict(self, captcha_id: str, correct: bool) -> str:
        """Record the site's verdict on a reading this server gave; returns the labels CSV status."""
        if not isinstance(captcha_id, str) or not ID.fullmatch(captcha_id):
            raise UnknownId(captcha_id)
        try:
            record = json.loads((self.folder / f"{captcha_id}.json").read_bytes())
        except FileNotFoundError:
            raise UnknownId(captcha_id) from None
        if correct and not record["text"]:
            raise ValueError("an empty reading cannot be accepted: it labels nothing")
        marker = self.folder / f"{captcha_id}.verdict"
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise AlreadyJudged(captcha_id) from None
        with os.fdopen(fd, "w") as f:
            json.dump({"correct": correct, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        status = SITE_ACCEPTED if correct else SITE_REJECTED
        self.labels.append(record["image"], record["text"] if correct else "", status, "site",
                           record["text"], record["confidence"])
        return status

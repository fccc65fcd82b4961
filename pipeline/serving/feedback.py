"""`serve --keep FOLDER`: every answered captcha on disk with its reading, and the site's verdict.

    FOLDER/<id>.<png|jpg|...>  the image as uploaded, in its own format
    FOLDER/<id>.json           {id, image, text, confidence, model_sha256, time}; the id is valid while it exists
    FOLDER/<id>.verdict        the verdict's claim: "pending" while its row is written, then the verdict
    FOLDER/labels.csv          the verdicts, as rows of the labels CSV (pipeline/data/label_log.py)
    FOLDER/.budget             the folder's counts, shared by every process serving it

An id is 32 hex digits, the time in nanoseconds then 64 random bits: names sort by age, and nobody
can guess an id they were not given. Nothing the client sends becomes a path. The folder holds at
most `max_captchas` captchas and `max_bytes` bytes over all processes that serve it (the counts in
FOLDER/.budget, under a lock the kernel releases when its holder dies); past either, the oldest
are dropped, down to nine tenths of it. A captcha larger than the whole byte budget is not kept,
and gets no id.

A verdict is acknowledged only once its row is on disk (fsynced): the verdict file is claimed
first (one claim per id), the row appended, then the claim marked done. A write that fails
(a full or read-only disk) gives up the claim, so the verdict can be sent again; a claim left
pending by a killed process is taken over by the next verdict for the id, which finds the row
if it was written.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.images import SUFFIXES
from pipeline.data.label_log import KEPT_ID, SITE_ACCEPTED, SITE_REJECTED, AnswerLog, read_answers
from pipeline.errors import PipelineError
from pipeline.files import atomic_write

log = logging.getLogger("captcha-crnn.serve")

ID = KEPT_ID
LABELS_CSV = "labels.csv"
BUDGET_FILE = ".budget"
PENDING = b"pending"


class UnknownId(LookupError):
    """An id this server did not issue, or whose captcha is gone."""


class AlreadyJudged(Exception):
    """A second verdict for one id."""


@dataclass(frozen=True)
class KeepLimits:
    max_captchas: int = 100_000
    max_bytes: int = 1024 * 2**20


class Budget:
    """The folder's counts (captchas, bytes, dropped) in FOLDER/.budget, read and written under an
    exclusive flock taken anew by each call, so that forked workers and other serve processes on
    the folder exclude each other, and a holder killed mid-way (an out-of-memory kill) releases it."""

    FORMAT = struct.Struct("<qqq")

    def __init__(self, folder: Path, limits: KeepLimits):
        self.path = Path(folder) / BUDGET_FILE
        self.limits = limits

    @contextlib.contextmanager
    def locked(self):
        """Yields the counts as a dict; what the caller leaves in it is written back."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, self.FORMAT.size, 0)
            values = self.FORMAT.unpack(raw) if len(raw) == self.FORMAT.size else (0, 0, 0)
            counts = dict(zip(("captchas", "bytes", "dropped"), values))
            yield counts
            os.pwrite(fd, self.FORMAT.pack(counts["captchas"], counts["bytes"], counts["dropped"]), 0)
        finally:
            os.close(fd)  # releases the lock

    def stats(self) -> dict:
        with self.locked() as counts:
            stats = dict(counts)
        return {**stats, "max_captchas": self.limits.max_captchas, "max_bytes": self.limits.max_bytes}


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
    def __init__(self, folder: Path, limits: KeepLimits = KeepLimits()):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(f"{folder}: cannot create the --keep folder ({e.strerror})") from None
        self.budget = Budget(self.folder, limits)
        self.labels = AnswerLog(self.folder / LABELS_CSV)

    def recount(self) -> None:
        """Set the shared counts from the folder (at start-up: it may hold a previous run's captchas)."""
        with self.budget.locked() as counts:
            self._prune(scan(self.folder), counts)

    def keep(self, data: bytes, image_format: str, text: str, confidence: float, model_sha256: str) -> str | None:
        """Write one answered captcha; returns its id, or None when it is not kept (larger than
        the whole byte budget)."""
        captcha_id = f"{time.time_ns():016x}{secrets.token_hex(8)}"
        image = f"{captcha_id}{SUFFIXES[image_format]}"
        record = json.dumps({"id": captcha_id, "image": image, "text": text, "confidence": round(confidence, 6),
                             "model_sha256": model_sha256, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        limits = self.budget.limits
        if len(data) + len(record) > limits.max_bytes:
            log.warning("--keep: a captcha of %d bytes is over the whole budget of %d; not kept", len(data),
                        limits.max_bytes)
            return None
        atomic_write(self.folder / image, lambda f: f.write(data))
        atomic_write(self.folder / f"{captcha_id}.json", lambda f: f.write(record))  # last: the id is valid now
        with self.budget.locked() as counts:
            counts["captchas"] += 1
            counts["bytes"] += len(data) + len(record)
            if counts["captchas"] > limits.max_captchas or counts["bytes"] > limits.max_bytes:
                self._prune(scan(self.folder), counts, spare=captcha_id)
        return captcha_id

    def _prune(self, ids: dict[str, list[tuple[Path, int]]], counts: dict, spare: str | None = None) -> None:
        """Drop the oldest captchas but `spare` (the one just kept) until the folder is within the
        budget (below 9/10 of it when it was over); `counts` are set to what is left."""
        limits = self.budget.limits
        total = sum(size for files in ids.values() for _, size in files)
        count = len(ids)
        over = count > limits.max_captchas or total > limits.max_bytes
        max_count, max_bytes = ((limits.max_captchas * 9 // 10, limits.max_bytes * 9 // 10) if over
                                else (limits.max_captchas, limits.max_bytes))
        dropped = 0
        for captcha_id in sorted(ids):
            if count <= max_count and total <= max_bytes:
                break
            if captcha_id == spare:
                continue
            for path, size in ids[captcha_id]:
                path.unlink(missing_ok=True)
                total -= size
            count -= 1
            dropped += 1
        counts["captchas"], counts["bytes"] = count, total
        counts["dropped"] += dropped
        if dropped:
            log.info("--keep: dropped the %d oldest captchas (%d kept, %d bytes)", dropped, count, total)

    def verdict(self, captcha_id: str, correct: bool) -> str:
        """Record the site's verdict on a reading this server gave, durably; returns the labels CSV
        status. AlreadyJudged for a second verdict; OSError when it could not be written (the
        verdict may be sent again)."""
        if not isinstance(captcha_id, str) or not ID.fullmatch(captcha_id):
            raise UnknownId(captcha_id)
        try:
            record = json.loads((self.folder / f"{captcha_id}.json").read_bytes())
        except FileNotFoundError:
            raise UnknownId(captcha_id) from None
        if correct and not record["text"]:
            raise ValueError("an empty reading cannot be accepted: it labels nothing")
        status = SITE_ACCEPTED if correct else SITE_REJECTED
        marker = self.folder / f"{captcha_id}.verdict"
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a verdict for this id is being written right now
                raise AlreadyJudged(captcha_id) from None
            claim = os.pread(fd, 4096, 0)
            if claim and claim != PENDING:
                raise AlreadyJudged(captcha_id)
            if claim == PENDING:  # a killed process's claim: its row may be on disk already
                earlier = read_answers(self.labels.path).get(record["image"])
                if earlier is not None and earlier.status in (SITE_ACCEPTED, SITE_REJECTED):
                    self._settle(fd, earlier.status == SITE_ACCEPTED)
                    raise AlreadyJudged(captcha_id)
            try:
                self._claim(fd, PENDING)
                self.labels.append(record["image"], record["text"] if correct else "", status, "site",
                                   record["text"], record["confidence"])
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # the claim given up: the verdict can be sent again
                raise
            self._settle(fd, correct)
        finally:
            os.close(fd)
        return status

    @staticmethod
    def _claim(fd: int, content: bytes) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
        os.fsync(fd)

    def _settle(self, fd: int, correct: bool) -> None:
        """The claim marked done. The row is durable already: a failure here leaves the claim
        pending, which the next verdict for the id settles from the row."""
        with contextlib.suppress(OSError):
            self._claim(fd, json.dumps({"correct": correct, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())

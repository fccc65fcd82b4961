"""The labels CSV that the `label` page and `serve --keep`'s verdicts append to, and ingest reads:

    path,label,status,who,when,model_text,model_confidence

`status`: `labelled` (a person typed or accepted it), `auto` (the model's reading, written without
a person because its confidence was at least label's --accept-above), `unreadable`, and from the
site's verdicts on serve's answers `site-accepted` (the reading is the label) and `site-rejected`
(the label is empty: the site said the reading `model_text` is wrong). A later row for a path
replaces an earlier one. Rows are appended whole under an exclusive lock, so the label page and
several serve processes can share one file.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

COLUMNS = ["path", "label", "status", "who", "when", "model_text", "model_confidence"]
REQUIRED = ("path", "label", "status")  # a CSV with these columns is read as a labels log
STATUSES = ("labelled", "auto", "unreadable", "site-accepted", "site-rejected")
SITE_ACCEPTED, SITE_REJECTED = "site-accepted", "site-rejected"
LABELLING = ("labelled", "auto", SITE_ACCEPTED)  # the statuses whose label is one
# serve --keep names each kept captcha by its id: the time in nanoseconds, then 64 random bits
KEPT_ID = re.compile(r"[0-9a-f]{32}")
KEPT_NAME = re.compile(KEPT_ID.pattern + r"\.[a-z]+")


@dataclass
class Answer:
    label: str
    status: str
    who: str
    model_text: str = ""  # the reading the answer was given to (for site-rejected: the wrong one)


def read_answers(csv_path: Path) -> dict[str, Answer]:
    """Answers so far, the last row per path winning, paths exactly as written. A row torn by a
    killed writer (too few or too many fields) and a row of a status this version does not know
    are skipped; columns beyond path, label and status are optional."""
    if not csv_path.exists():
        return {}
    answers = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                if None in row or any(row.get(c) is None for c in REQUIRED) or row["status"] not in STATUSES:
                    continue
                answers[row["path"]] = Answer(row["label"], row["status"], row.get("who") or "",
                                              row.get("model_text") or "")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{csv_path}: not UTF-8 text (byte {e.start}); not a labels CSV of this tool") from None
    except csv.Error as e:
        raise PipelineError(f"{csv_path}: not a labels CSV ({e})") from None
    return answers


class AnswerLog:
    """The labels CSV, append-only: one row per answer, on disk (flushed, fsynced) before the caller
    hears back. A row is written whole or not at all: a write that fails (a full disk) is cut off
    again, and a row torn by a killed writer is ended before the next row, so no two rows merge."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as f:
            if f.tell() == 0:
                self._write(f, ",".join(COLUMNS) + "\n")

    def _locked(self):
        f = open(self.path, "a+b", buffering=0)  # unbuffered: nothing left in memory to land later
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # other processes (serve workers, the label page) wait
        except OSError:
            f.close()
            raise
        f.seek(0, os.SEEK_END)
        return f

    @staticmethod
    def _write(f, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(f.fileno(), data):]
        os.fsync(f.fileno())

    def append(self, path: str, label: str, status: str, who: str, model_text: str, confidence: float) -> None:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow([
            path, label, status, who, time.strftime("%Y-%m-%dT%H:%M:%S%z"), model_text, f"{confidence:.6f}"])
        row = out.getvalue()
        with self._locked() as f:  # closing the file releases the lock
            end = f.tell()
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a row torn by a killed writer: end it, so this one stands alone
                    row = "\n" + row
            try:
                self._write(f, row)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(f.fileno(), end)  # none of this row stays behind
                    os.fsync(f.fileno())
                raise

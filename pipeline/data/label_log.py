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

import csv
import fcntl
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

COLUMNS = ["path", "label", "status", "who", "when", "model_text", "model_confidence"]
STATUSES = ("labelled", "auto", "unreadable", "site-accepted", "site-rejected")
SITE_ACCEPTED, SITE_REJECTED = "site-accepted", "site-rejected"


@dataclass
class Answer:
    label: str
    status: str
    who: str
    model_text: str = ""  # the reading the answer was given to (for site-rejected: the wrong one)


def read_answers(csv_path: Path) -> dict[str, Answer]:
    """Answers so far, the last row per path winning; a torn last line (a killed server) is ignored."""
    if not csv_path.exists():
        return {}
    answers = {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if None in row or any(row.get(c) is None for c in COLUMNS) or row["status"] not in STATUSES:
                    continue
                answers[row["path"]] = Answer(row["label"], row["status"], row["who"], row["model_text"])
    except UnicodeDecodeError as e:
        raise PipelineError(f"{csv_path}: not UTF-8 text (byte {e.start}); not a labels CSV of this tool") from None
    except csv.Error as e:
        raise PipelineError(f"{csv_path}: not a labels CSV ({e})") from None
    return answers


class AnswerLog:
    """The labels CSV, append-only: one row per answer, on disk (flushed, fsynced) before the caller
    hears back."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as f:
            if f.tell() == 0:
                self._write(f, ",".join(COLUMNS) + "\n")
            else:
                f.seek(f.tell() - 1)
                if f.read(1) != b"\n":  # a row torn by a kill: end it, so the next one stands alone
                    self._write(f, "\n")

    def _locked(self):
        f = open(self.path, "a+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # other processes (serve workers, the label page) wait
        except OSError:
            f.close()
            raise
        f.seek(0, os.SEEK_END)
        return f

    @staticmethod
    def _write(f, text: str) -> None:
        f.write(text.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())

    def append(self, path: str, label: str, status: str, who: str, model_text: str, confidence: float) -> None:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow([
            path, label, status, who, time.strftime("%Y-%m-%dT%H:%M:%S%z"), model_text, f"{confidence:.6f}"])
        with self._locked() as f:  # closing the file releases the lock
            self._write(f, out.getvalue())

"""Labelled folders: a folder of captcha images and their labels, from a CSV/TSV of path,label
(the `label` command's CSV included) or from the file names. ingest and `evaluate --folder` read
folders through here."""
from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.images import IMAGE_SUFFIXES
from pipeline.data.label_log import KEPT_NAME, LABELLING, REQUIRED, read_answers
from pipeline.errors import PipelineError


@dataclass
class LabelsTable:
    labels: dict[str, str]  # path -> label
    left_out: set[str]  # marked unreadable
    dropped_ok: set[str]  # paths whose file serve --keep's budget may have dropped since (kept captchas)


def read_labels_file(path: Path) -> LabelsTable:
    """CSV or TSV of path,label (a header row `path,label` is optional), or the labels log that
    `label` and `serve --keep` write (a header with a `status` column: pipeline/data/label_log.py's
    reader, paths as written): there a later row for a path replaces an earlier one, `unreadable`
    rows are left out and `site-rejected` rows label nothing (the image stays unlabelled). In a
    plain CSV a path listed twice with two labels is refused.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise PipelineError(f"{path}: cannot read labels file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: labels file is not UTF-8 text (byte {e.start})") from None
    dialect = "excel-tab" if path.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0] else "excel"
    try:
        rows = list(csv.reader(io.StringIO(text), dialect))
    except csv.Error as e:  # e.g. a field over csv's size limit
        raise PipelineError(f"{path}: not a labels CSV ({e})") from None
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if dialect == "excel" and set(REQUIRED) <= set(header):
        answers = read_answers(path)
        return LabelsTable(labels={p: a.label for p, a in answers.items() if a.status in LABELLING},
                           left_out={p for p, a in answers.items() if a.status == "unreadable"},
                           dropped_ok={p for p in answers if KEPT_NAME.fullmatch(p.rpartition("/")[2])})
    start = 1
    if header[:2] == ["path", "label"]:
        rows, start = rows[1:], 2
    labels, first_line = {}, {}
    for i, row in enumerate(rows, start):
        if not row:
            continue
        if len(row) < 2:
            raise PipelineError(f"{path}:{i}: expected path and label columns")
        name, label = row[0].strip().replace("\\", "/"), row[1].strip()
        if labels.get(name, label) != label:  # a plain CSV: no row corrects another
            raise PipelineError(f"{path}:{i}: {name} is labelled {label!r} here and {labels[name]!r} on line "
                                f"{first_line[name]}; keep one")
        first_line.setdefault(name, i)
        labels[name] = label
    return LabelsTable(labels, set(), set())


def utf8_name(name: str) -> bool:
    """Whether a file name decoded from the disk is UTF-8 (Python keeps other bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_name(name: str) -> str:
    """A file name as a report can show it: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


@dataclass
class Listing:
    labelled: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the folder, label)
    invalid: list[dict] = field(default_factory=list)  # {"file", "reason"}
    ignored: list[str] = field(default_factory=list)  # files that are not images by extension
    unlabelled: list[str] = field(default_factory=list)  # images the labels file does not list (yet)
    unreadable: list[str] = field(default_factory=list)  # images the labels file marks unreadable
    dropped: list[str] = field(default_factory=list)  # kept captchas since dropped by serve's --keep budget


def list_folder(folder: Path, pattern: str, labels_file: Path | None = None, what: str = "folder",
                unlabelled_ok: bool = False) -> Listing:
    """Every image of `folder` (recursively, hidden files skipped) with its label: from `labels_file`
    when given, else from its file name (`pattern`, a regex with a `label` group). `unlabelled_ok`:
    a name the pattern does not match is an unlabelled image, not an invalid one."""
    if not folder.is_dir():
        raise PipelineError(f"{folder}: {what} not found")
    listing = Listing()
    # every entry but folders: a FIFO or a dangling link is listed, and reading it says why it is no image
    files = sorted(p for p in folder.rglob("*") if not p.is_dir() and not p.name.startswith("."))
    listed = read_labels_file(labels_file) if labels_file else None
    table, left_out = (listed.labels, listed.left_out) if listed else (None, set())
    regex = re.compile(pattern)
    for path in files:
        rel = path.relative_to(folder).as_posix()
        if not utf8_name(rel):  # no labels CSV or manifest could name it
            listing.invalid.append({"file": shown_name(rel), "reason": "file name is not UTF-8; rename it"})
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if not (labels_file and path.resolve() == labels_file.resolve()):
                listing.ignored.append(rel)
            continue
        if table is not None:
            label = table.get(rel)
            if label is None:  # not labelled yet, or marked unreadable: left out, not an error
                (listing.unreadable if rel in left_out else listing.unlabelled).append(rel)
                continue
        else:
            match = regex.search(path.name)
            label = match.group("label") if match else None
            if label is None and unlabelled_ok:
                listing.unlabelled.append(rel)
                continue
            if label is None:
                listing.invalid.append({"file": rel, "reason": f"file name does not match ingest.pattern {pattern!r}"})
                continue
        listing.labelled.append((rel, label))
    if table is not None:
        missing = set(table) - {rel for rel, _ in listing.labelled} - {x["file"] for x in listing.invalid}
        listing.dropped = sorted(missing & listed.dropped_ok)
        listing.invalid += [{"file": f, "reason": "listed in the labels file but not found"}
                            for f in sorted(missing - listed.dropped_ok)]
    return listing

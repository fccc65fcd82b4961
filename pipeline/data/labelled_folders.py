"""Labelled folders: a folder of captcha images and their labels, from a CSV/TSV of path,label
(the `label` command's CSV included) or from the file names. ingest and `evaluate --folder` read
folders through here."""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.images import IMAGE_SUFFIXES
from pipeline.data.label_log import SITE_REJECTED
from pipeline.errors import PipelineError


@dataclass
class LabelsTable:
    labels: dict[str, str]  # path -> label
    left_out: set[str]  # marked unreadable
    from_site: set[str]  # paths whose last row is a site's verdict (serve --keep may have dropped the file)


def read_labels_file(path: Path) -> LabelsTable:
    """CSV or TSV of path,label (a header row `path,label` is optional).

    The labels CSV of `label` and `serve --keep` has more columns (pipeline/data/label_log.py):
    rows whose status is `unreadable` are left out, `site-rejected` rows label nothing (the image
    stays unlabelled), a later row for a path replaces an earlier one, and a row with fewer columns
    than the header (torn by a killed server) is ignored. In a plain CSV a path listed twice with
    two labels is refused.
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
    columns = {"path": 0, "label": 1}
    if header[:2] == ["path", "label"] or {"path", "label"} <= set(header):
        columns = {name: header.index(name) for name in ("path", "label", "status") if name in header}
        rows = rows[1:]
        start = 2
    else:
        start = 1
    labels, left_out, first_line, from_site = {}, set(), {}, set()
    for i, row in enumerate(rows, start):
        if not row:
            continue
        if len(row) < 2:
            raise PipelineError(f"{path}:{i}: expected path and label columns")
        if len(header) > 2 and len(row) < len(header):
            continue  # torn
        name = row[columns["path"]].strip().replace("\\", "/")
        status = row[columns["status"]].strip() if "status" in columns else ""
        (from_site.add if status.startswith("site-") else from_site.discard)(name)
        if status in ("unreadable", SITE_REJECTED):
            labels.pop(name, None)
            (left_out.add if status == "unreadable" else left_out.discard)(name)
            continue
        label = row[columns["label"]].strip()
        if "status" not in columns and labels.get(name, label) != label:  # a plain CSV: no row corrects another
            raise PipelineError(f"{path}:{i}: {name} is labelled {label!r} here and {labels[name]!r} on line "
                                f"{first_line[name]}; keep one")
        first_line.setdefault(name, i)
        labels[name] = label
        left_out.discard(name)
    return LabelsTable(labels, left_out, from_site)


@dataclass
class Listing:
    labelled: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the folder, label)
    invalid: list[dict] = field(default_factory=list)  # {"file", "reason"}
    ignored: list[str] = field(default_factory=list)  # files that are not images by extension
    unlabelled: list[str] = field(default_factory=list)  # images the labels file does not list (yet)
    unreadable: list[str] = field(default_factory=list)  # images the labels file marks unreadable
    dropped: list[str] = field(default_factory=list)  # judged by the site, since dropped by serve's --keep budget


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
        listing.dropped = sorted(missing & listed.from_site)
        listing.invalid += [{"file": f, "reason": "listed in the labels file but not found"}
                            for f in sorted(missing - listed.from_site)]
    return listing

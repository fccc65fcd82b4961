"""The `ingest` stage: a folder of labelled captchas -> shards and a manifest like `generate`'s.

Labels come from the file names (a regex with a `label` group) or from a CSV/TSV of path,label.
Everything is validated before anything is written; each image lands in the split chosen by a
hash of its bytes, so adding images never moves an existing one, and duplicates share a split.
With `ingest.unlabelled`, the images that have no label yet are kept too, in a split of their own
(`unlabelled`, label empty, never val or test) for self-training; an unlabelled image identical to
a labelled one is dropped, so no test image is ever trained on through its pseudo-label.
"""
from __future__ import annotations

import hashlib
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
from PIL import Image

from pipeline import outputs
from pipeline.charset import fold_text
from pipeline.cli import command, params_option, run
from pipeline.data.images import ImageError, decode_image, read_image_file
from pipeline.data.labelled_folders import list_folder
from pipeline.data.shards import UNLABELLED, Sample, write_dataset
from pipeline.errors import PipelineError
from pipeline.files import check_writable, write_json
from pipeline.params import DataParams, IngestParams, load_params


@dataclass
class Report:
    invalid: list[dict] = field(default_factory=list)  # {"file", "reason"}
    duplicates: list[dict] = field(default_factory=list)  # {"file", "same_as"}
    ignored: list[str] = field(default_factory=list)  # files that are not images by extension
    unlabelled: list[str] = field(default_factory=list)  # images the labels file does not list (yet)
    unreadable: list[str] = field(default_factory=list)  # images the labels file marks unreadable
    dropped: list[str] = field(default_factory=list)  # judged by the site, then dropped by serve --keep's budget
    per_split: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"invalid": self.invalid, "duplicates": self.duplicates, "ignored": self.ignored,
                "unlabelled": self.unlabelled, "unreadable": self.unreadable, "dropped": self.dropped,
                "per_split": self.per_split, "kept": sum(self.per_split.values())}


@dataclass(frozen=True)
class Candidate:
    file: str  # relative to the source folder, '/'-separated
    label: str
    data: bytes
    digest: str  # sha256 of the original bytes


def collect(source: Path, ip: IngestParams, labels_file: Path | None) -> tuple[list[Candidate], list[Candidate], Report]:
    """(labelled candidates, unlabelled candidates (when ingest.unlabelled), report)."""
    listing = list_folder(source, ip.pattern, labels_file, what="ingest source folder (ingest.source)",
                          unlabelled_ok=ip.unlabelled)
    report = Report(invalid=listing.invalid, ignored=listing.ignored, unlabelled=listing.unlabelled,
                    unreadable=listing.unreadable, dropped=listing.dropped)

    def read(rel: str, label: str) -> Candidate | None:
        try:
            data = read_image_file(source / rel)
        except ImageError as e:  # a FIFO, a dangling link, a file over the size limit: named, not read
            report.invalid.append({"file": rel, "reason": str(e)})
            return None
        return Candidate(rel, label, data, hashlib.sha256(data).hexdigest())

    labelled = [c for c in (read(rel, label) for rel, label in listing.labelled) if c]
    unlabelled = [c for c in (read(rel, "") for rel in listing.unlabelled) if c] if ip.unlabelled else []
    return labelled, unlabelled, report


def screen_unlabelled(candidates: list[Candidate], labelled: list[Candidate], report: Report) -> list[Candidate]:
    """Readable images, each once, none identical to a labelled one (which may be a test image)."""
    seen = {c.digest for c in labelled}
    kept = []
    for c in sorted(candidates, key=lambda c: c.digest):
        reason = check_image(c.data)
        if reason:
            report.invalid.append({"file": c.file, "reason": reason})
        elif c.digest in seen:
            report.duplicates.append({"file": c.file, "same_as": "a labelled or earlier unlabelled image"})
        else:
            seen.add(c.digest)
            kept.append(c)
    return kept


def case_hint(unknown: str, charset: str, case: str) -> str:
    """How to fold the labels when that would put every unknown character in the charset."""
    for fix in ("upper", "lower"):
        if case != fix and all(fold_text(ch, fix) in charset for ch in unknown):
            return f" (set ingest.case: {fix} to fold the labels to {fix} case)"
    return ""


def screen(candidates: list[Candidate], data: DataParams, ip: IngestParams, report: Report) -> list[Candidate]:
    """Drop (and report) bad labels, unreadable images, conflicts; keep one of each duplicate."""
    good: list[Candidate] = []
    charset = ip.charset(data)
    charset_key = "data.charset" + (" + ingest.extra_chars" if ip.extra_chars else "")
    longest, longest_key = ip.longest(data), "ingest.max_length" if ip.max_length else "data.max_length"
    for c in candidates:
        label = fold_text(c.label, ip.case)
        unknown = "".join(dict.fromkeys(ch for ch in label if ch not in charset))
        reason = None
        if not label:
            reason = "empty label"
        elif unknown:
            reason = f"characters not in {charset_key}: {unknown!r}" + case_hint(unknown, charset, ip.case)
        elif len(label) > longest:
            reason = f"label of {len(label)} characters is longer than {longest_key} {longest}"
        else:
            reason = check_image(c.data)
        if reason:
            report.invalid.append({"file": c.file, "reason": reason})
        else:
            good.append(Candidate(c.file, label, c.data, c.digest))
    by_digest: dict[str, list[Candidate]] = {}
    for c in good:
        by_digest.setdefault(c.digest, []).append(c)
    kept = []
    for digest, group in by_digest.items():
        if len({c.label for c in group}) > 1:
            names = ", ".join(f"{c.file}={c.label}" for c in group)
            report.invalid += [{"file": c.file, "reason": f"same image, different labels: {names}"} for c in group]
            continue
        kept.append(group[0])
        report.duplicates += [{"file": c.file, "same_as": group[0].file} for c in group[1:]]
    return sorted(kept, key=lambda c: c.digest)


def check_image(data: bytes) -> str | None:
    """Why the bytes are not a usable image, or None."""
    try:
        decode_image(data)
    except ImageError as e:
        return str(e)
    return None


def as_png(data: bytes, max_height: int = 0) -> tuple[bytes, str]:
    """The original bytes if PNG (and no taller than max_height, when given), else the first frame
    re-encoded losslessly as PNG, scaled down to max_height if taller: a 640x360 captcha decodes
    and trains about three times slower than the same captcha at 114x64."""
    frame = decode_image(data)
    fmt = frame.format
    too_tall = max_height and frame.height > max_height
    if fmt == "PNG" and not too_tall:
        return data, fmt
    if too_tall:
        width = max(1, round(frame.width * max_height / frame.height))
        frame = frame.convert("RGBA" if "A" in frame.getbands() or "transparency" in frame.info else "RGB")
        frame = frame.resize((width, max_height), Image.Resampling.LANCZOS)
    if frame.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        frame = frame.convert("RGBA" if "A" in frame.mode else "RGB")  # CMYK, YCbCr: not in PNG
    out = io.BytesIO()
    frame.save(out, format="PNG")
    return out.getvalue(), fmt


def assign_split(digest: str, fractions: dict[str, float]) -> str:
    point = int(digest[:16], 16) / 16**16
    edge = 0.0
    for split in ("train", "val", "test"):
        edge += fractions.get(split, 0.0)
        if point < edge:
            return split
    return "test"


def ingest(data: DataParams, ip: IngestParams, source: Path | None = None, labels: Path | None = None,
           skip_invalid: bool = False, report_path: Path = outputs.INGEST_REPORT) -> dict:
    source = Path(source or ip.source or "")
    if not str(source) or str(source) == ".":
        raise PipelineError("ingest.source: no folder given (set ingest.source or pass SOURCE)")
    labels = labels or (Path(ip.labels) if ip.labels else None)
    check_writable(Path(ip.out), report_path.parent)
    candidates, unlabelled, report = collect(source, ip, labels)
    kept = screen(candidates, data, ip, report)
    unlabelled = screen_unlabelled(unlabelled, candidates, report)
    if report.invalid:
        for bad in report.invalid:
            print(f"{bad['file']}: {bad['reason']}", file=sys.stderr)
        if not skip_invalid:  # the stage's own report (a DVC output) stays as the last run left it
            failed_path = report_path.with_suffix(".invalid.json")
            write_json(failed_path, report.to_dict())
            raise PipelineError(f"{source}: {len(report.invalid)} invalid file(s), listed above and in "
                                f"{failed_path}; fix them or pass --skip-invalid")
    if labels is not None and not kept and not unlabelled:  # an empty labels CSV: keep the last ingest's shards
        raise PipelineError(f"{labels}: labels no image of {source} ({len(report.invalid)} invalid, "
                            f"{len(report.unlabelled)} not listed); the previous ingest is left as it was")
    splits: dict[str, list[Candidate]] = {"train": [], "val": [], "test": []}
    for c in kept:
        splits[assign_split(c.digest, ip.fractions)].append(c)
    if ip.unlabelled:
        splits[UNLABELLED] = unlabelled
    write_dataset(Path(ip.out), splits, ip.shard_size, lambda c: _sample(c, ip.max_height))
    report.per_split = {k: len(v) for k, v in splits.items()}
    write_json(report_path, report.to_dict())
    print(f"ingested {len(kept)} images from {source}: " + ", ".join(f"{k} {v}" for k, v in report.per_split.items())
          + f"; {len(report.duplicates)} duplicates, {len(report.invalid)} invalid skipped"
          + (f", {len(report.unlabelled)} not labelled yet" if report.unlabelled and not ip.unlabelled else ""),
          file=sys.stderr)
    return report.to_dict()


def _sample(c: Candidate, max_height: int = 0) -> Sample:
    png, fmt = as_png(c.data, max_height)
    return Sample(f"ingest_{c.digest[:24]}", png, c.label,
                  {"source": "ingest", "original": c.file, "format": fmt, "original_sha256": c.digest})


@command("ingest")
@click.argument("source", required=False, type=click.Path(path_type=Path))
@params_option
@click.option("--labels", type=click.Path(path_type=Path), default=None,
              help="CSV/TSV of path,label (paths relative to SOURCE); default: labels from file names")
@click.option("--skip-invalid", is_flag=True, help="skip invalid files (listed in reports/ingest.json)")
def cli(source, params_path, labels, skip_invalid):
    """Ingest a folder of labelled captchas into data/ingest/ (shards + manifest)."""
    params = load_params(params_path)
    ingest(params.data, params.ingest, source=source, labels=labels, skip_invalid=skip_invalid)


if __name__ == "__main__":  # python -m pipeline.stages.NAME, as dvc.yaml runs the stages
    run(__spec__.name)

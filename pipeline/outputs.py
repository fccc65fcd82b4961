"""Where the stages write, relative to the working directory: the one place these paths are spelled
in code (dvc.yaml declares the same; tests/test_layout.py checks that the two agree)."""
from __future__ import annotations

from pathlib import Path

SHARDS = Path("data/shards")
MANIFEST = Path("data/manifest.parquet")
INGEST_REPORT = Path("reports/ingest.json")
TEACHER = Path("data/teacher")
TEACH_REPORT = Path("reports/teach.json")
MODEL = Path("models/model.pt")
LAST = Path("models/last.pt")
TRAIN_SUMMARY = Path("reports/train.json")
HISTORY = Path("reports/train/history.tsv")
METRICS = Path("reports/metrics.json")
CONFUSION = Path("reports/confusion.csv")
ERRORS = Path("reports/errors.png")
ONNX = Path("models/model.onnx")
EXPORT_REPORT = Path("reports/export.json")

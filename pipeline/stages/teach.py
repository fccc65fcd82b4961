"""The `teach` stage: a teacher checkpoint (teach.model, e.g. a site model fine-tuned from ddddocr's
trunk, copied under pretrained/) reads the unlabelled captchas that ingest kept (ingest.unlabelled),
so that a small student can learn from its readings (train.sources names data/teacher/manifest.parquet):

    data/teacher/shards/train/*.tar   the readings of confidence at least the threshold, as labels:
                                      the lowest confidence at which the teacher's readings of
                                      ingest's val split are right teach.precision of the time
    data/teacher/shards/soft/*.tar    with teach.soft: every unlabelled captcha, its `.npy` member the
                                      teacher's per-step probabilities over the model charset (float16),
                                      for train.distill
    data/teacher/manifest.parquet
    reports/teach.json                threshold, counts, seconds

The teacher reads each captcha once, unaugmented, with its own preprocessing. With teach.model
empty the stage writes an empty manifest and nothing else, in a second.
"""
from __future__ import annotations

import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import outputs
from pipeline.cli import command, params_option, quiet_option, run
from pipeline.data.shards import SOFT, UNLABELLED, Sample, iter_tar, write_dataset
from pipeline.data.sources import load_sources, shards_of
from pipeline.errors import ParamsError, PipelineError
from pipeline.files import check_writable, write_json
from pipeline.params import Params, load_params
from pipeline.read.inference import decode_texts
from pipeline.read.metrics import confidence_threshold, finite_or_none
from pipeline.read.recognizer import Recognizer


def teach(params: Params, out: Path = outputs.TEACHER, report_path: Path = outputs.TEACH_REPORT,
          progress: bool = True) -> dict:
    tp = params.teach
    check_writable(out.parent, report_path.parent)
    if not tp.model:
        write_dataset(out, {}, tp.shard_size, lambda s: s)
        report = {"teacher": "", "note": "teach.model is empty: nothing taught"}
        write_json(report_path, report)
        return report
    started = time.perf_counter()
    if not Path(tp.model).is_file():
        raise ParamsError(f"teach.model: checkpoint not found: {tp.model} (copy the fine-tuned model there first)")
    teacher = Recognizer(Path(tp.model), onnx=False)
    if teacher.charset.chars != params.model_charset:
        raise ParamsError(f"teach.model: {tp.model} reads {teacher.charset.chars!r}, the model charset is "
                          f"{params.model_charset!r} (data.charset + ingest.extra_chars); they must be the same")
    ingested = load_sources({str(Path(params.ingest.out) / "manifest.parquet"): 1})
    val = [s for s, _ in shards_of(ingested, "val")]
    unlabelled = [s for s, _ in shards_of(ingested, UNLABELLED)]
    if not val or not unlabelled:
        raise PipelineError(f"{params.ingest.out}: the teacher needs ingest's val split (to choose its confidence "
                            f"threshold) and unlabelled captchas (ingest.unlabelled: true)")
    val_readings = [(sample["txt"].decode(), text, conf) for sample, (text, conf, _) in read(teacher, val, tp.batch_size)]
    threshold = confidence_threshold(val_readings, tp.precision)
    hard, soft, total = [], [], 0
    for sample, (text, conf, probs) in read(teacher, unlabelled, tp.batch_size, with_probs=tp.soft):
        total += 1
        meta = {"source": "teacher", "confidence": round(conf, 6)}
        if text and conf >= threshold:
            hard.append(Sample(sample["__key__"], sample["png"], text, meta))
        if tp.soft:
            soft.append(Sample(f"soft_{sample['__key__']}", sample["png"], text, meta, {"npy": to_npy(probs)}))
        if progress and total % 1000 == 0:
            print(f"teach: {total} read", file=sys.stderr)
    write_dataset(out, {"train": hard, SOFT: soft}, tp.shard_size, lambda s: s)
    report = {"teacher": tp.model, "teacher_sha256": teacher.model_sha256, "precision": tp.precision,
              "threshold": finite_or_none(threshold), "val": len(val_readings),
              "val_accuracy": sum(t == r for t, r, _ in val_readings) / len(val_readings),
              "unlabelled": total, "labelled_by_teacher": len(hard), "soft": len(soft),
              "seconds": round(time.perf_counter() - started, 1)}
    write_json(report_path, report)
    print(f"teach: {len(hard)} of {total} unlabelled captchas read at confidence >= {threshold:.4f} "
          f"(val precision {tp.precision}); {report['seconds']} s", file=sys.stderr)
    return report


def read(teacher: Recognizer, shards: list[str], batch_size: int, with_probs: bool = False):
    """(sample, (text, confidence, probabilities or None)) for every sample of the shards."""
    samples = (sample for shard in shards for sample in iter_tar(Path(shard)))
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield from read_batch(teacher, batch, with_probs)
            batch = []
    if batch:
        yield from read_batch(teacher, batch, with_probs)


def read_batch(teacher: Recognizer, batch: list[dict], with_probs: bool):
    with torch.inference_mode():
        probs = teacher.probs(teacher.preprocess.batch([s["png"] for s in batch]))
    texts = decode_texts(probs, teacher.charset, teacher.bundle.ctc)
    for sample, (text, conf), p in zip(batch, texts, probs):
        yield sample, (text, conf if math.isfinite(conf) else 0.0, p if with_probs else None)


def to_npy(probs: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, probs.astype(np.float16), allow_pickle=False)
    return out.getvalue()


@command("teach")
@params_option
@quiet_option
def cli(params_path, quiet):
    """A teacher model reads ingest's unlabelled captchas: data/teacher/ (its readings as labels)."""
    teach(load_params(params_path), progress=not quiet)


if __name__ == "__main__":  # python -m pipeline.stages.NAME, as dvc.yaml runs the stages
    run(__spec__.name)

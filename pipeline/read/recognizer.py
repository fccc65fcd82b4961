"""Inference for new images: load a checkpoint (or its ONNX export), preprocess, batch, decode."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from pipeline import outputs
from pipeline.data.images import load_image
from pipeline.errors import PipelineError
from pipeline.files import file_sha256
from pipeline.model import checkpoint
from pipeline.read.inference import decode_texts, model_probs, softmax

T = TypeVar("T")


@dataclass(frozen=True)
class Prediction:
    text: str
    confidence: float


class Recognizer:
    """Reads text from images with a trained model.

    `onnx=None` picks onnxruntime when `<model>.onnx` exists and was exported from this very
    checkpoint (its metadata records the checkpoint's sha256); True insists on it, False uses torch.
    """

    def __init__(self, model_path: str | Path = outputs.MODEL, onnx: bool | None = None,
                 onnx_path: str | Path | None = None, threads: int | None = None):
        model_path = Path(model_path)
        self.bundle = checkpoint.load(model_path)
        self.model_sha256 = file_sha256(model_path)
        self.preprocess = self.bundle.preprocess
        self.charset = self.bundle.charset
        onnx_path = Path(onnx_path) if onnx_path else model_path.with_suffix(".onnx")
        if onnx is None:
            onnx = onnx_path.exists() and onnx_sha256(onnx_path) == self.model_sha256
        self.session = None
        if onnx:
            self.session = onnx_session(onnx_path, threads)
            checkpoint.check_reads(lambda batch: self.session.run(None, {"images": batch})[0], self.bundle, onnx_path)
        elif threads:
            torch.set_num_threads(threads)
        self.backend = "onnxruntime" if self.session else "torch"

    def probs(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) preprocessed float32 -> (B, T, classes) probabilities."""
        if self.session is not None:
            return softmax(self.session.run(None, {"images": batch})[0])
        return model_probs(self.bundle.model, batch)

    def decode(self, probs: np.ndarray, beam: int = 1, allowed: str | None = None,
               case: str | None = None) -> list[Prediction]:
        """(B, T, classes) probabilities -> one Prediction per image (see decode_texts)."""
        decoded = decode_texts(probs, self.charset, self.bundle.ctc, beam, allowed, case)
        return [Prediction(text, conf) for text, conf in decoded]

    def predict_arrays(self, batch: np.ndarray, beam: int = 1, allowed: str | None = None,
                       case: str | None = None) -> list[Prediction]:
        return self.decode(self.probs(batch), beam, allowed, case) if len(batch) else []

    def predict(self, images, beam: int = 1, allowed: str | None = None, case: str | None = None) -> list[Prediction]:
        """Images as paths, bytes, PIL images or numpy arrays (any mode, any size)."""
        return self.predict_arrays(self.preprocess.batch(list(images)), beam, allowed, case)

    def read_each(self, sources: Iterable[T], load: Callable[[T], object] = load_image, batch_size: int = 64,
                  beam: int = 1, allowed: str | None = None, case: str | None = None
                  ) -> Iterator[tuple[T, Prediction | Exception]]:
        """Each source's reading, or the error that stops it (OSError or ValueError from `load`,
        which makes an image of a source), in input order. An image is preprocessed as soon as it
        is loaded, so only one decoded image and one batch of model inputs are held at a time,
        however large the images."""
        batch: list[tuple[T, np.ndarray]] = []

        def flush():
            arrays = np.stack([a for _, a in batch])
            yield from zip([s for s, _ in batch], self.predict_arrays(arrays, beam, allowed, case))
            batch.clear()

        for source in sources:
            try:
                array = self.preprocess(load(source))
            except (OSError, ValueError) as e:
                if batch:
                    yield from flush()  # keep the input order
                yield source, e
                continue
            batch.append((source, array))
            if len(batch) >= batch_size:
                yield from flush()
        if batch:
            yield from flush()

    def describe(self) -> dict:
        b = self.bundle
        return {"arch": b.arch, "charset": b.charset.chars, "max_length": b.max_length,
                "input": {"height": b.preprocess.height, "width": b.preprocess.width,
                          "channels": b.preprocess.channels, "keep_aspect": b.preprocess.keep_aspect},
                "backend": self.backend, "trained": b.info}


def onnx_sha256(onnx_path: Path) -> str | None:
    """The sha256 of the checkpoint an ONNX file was exported from (its metadata records it)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    return meta.get("checkpoint_sha256")


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    if not Path(path).exists():
        raise PipelineError(f"{path}: ONNX model not found; run the export stage")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

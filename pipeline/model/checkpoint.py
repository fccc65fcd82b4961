"""models/model.pt: the weights plus everything inference needs, loadable with weights_only=True."""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.charset import Charset
from pipeline.errors import PipelineError
from pipeline.files import atomic_write
from pipeline.model import ARCHS, build_model
from pipeline.model.preprocess import Preprocess

FORMAT = 1
REQUIRED = ("arch", "settings", "charset", "max_length", "preprocess", "state_dict")


@dataclass
class Bundle:
    """A model ready for inference: the module (eval mode) and how to feed and decode it."""

    model: nn.Module
    arch: str
    settings: dict
    charset: Charset
    max_length: int
    preprocess: Preprocess
    info: dict

    @property
    def ctc(self) -> bool:
        return ARCHS[self.arch].ctc


def contents(model: nn.Module, arch: str, settings: dict, charset: str, max_length: int,
             info: dict | None = None, **extra) -> dict:
    """What model.pt holds; `extra` adds training state (optimizer, ...) for last.pt."""
    preprocess = Preprocess.of(ARCHS[arch].Settings(**settings))
    return {
        "format": FORMAT, "arch": arch, "settings": settings, "charset": charset,
        "max_length": max_length, "preprocess": preprocess.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "info": info or {}, **extra,
    }


def save(path: Path, checkpoint: dict) -> None:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def read(path: Path) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise PipelineError(f"{path}: checkpoint not found; run the train stage first") from None
    except pickle.UnpicklingError:
        raise PipelineError(f"{path}: refused: it holds objects other than tensors and plain data, which "
                            f"could run code when loaded; not a captcha-crnn checkpoint") from None
    except Exception as e:  # noqa: BLE001 - any other failure means "not our checkpoint"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {reason[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("arch") not in ARCHS:
        raise PipelineError(f"{path}: not a captcha-crnn checkpoint (format {FORMAT})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise PipelineError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if isinstance(ckpt["settings"], dict):  # written before inputs could keep their aspect ratio
        ckpt["settings"].setdefault("keep_aspect", False)
    return ckpt


def model_from(ckpt: dict) -> nn.Module:
    model = build_model(ckpt["arch"], ckpt["settings"], len(ckpt["charset"]) + 1, ckpt["max_length"])
    model.load_state_dict(ckpt["state_dict"])
    return model


def load(path: Path) -> Bundle:
    """The checkpoint as a model ready to read: its recorded preprocessing checked, and one blank
    image read through it (a model that cannot run, or answers other than finite numbers for
    each class at each step, is refused here, in one line, never served)."""
    ckpt = read(path)
    try:
        model = model_from(ckpt).eval()
    except (TypeError, RuntimeError, KeyError, ValueError) as e:
        raise PipelineError(f"{path}: weights do not fit the recorded model ({first_line(e)})") from None
    try:
        preprocess = Preprocess.from_dict(ckpt["preprocess"])
        charset = Charset(ckpt["charset"])
    except ValueError as e:
        raise PipelineError(f"{path}: {first_line(e)}") from None
    bundle = Bundle(model=model, arch=ckpt["arch"], settings=ckpt["settings"], charset=charset,
                    max_length=ckpt["max_length"], preprocess=preprocess, info=ckpt.get("info", {}))
    with torch.inference_mode():
        check_reads(lambda batch: bundle.model(torch.from_numpy(batch)).float().numpy(), bundle, path)
    return bundle


def check_reads(logits_of, bundle: Bundle, path: Path) -> None:
    """Read one blank image with `logits_of` ((B, C, H, W) -> (B, T, classes)); PipelineError
    unless it answers a finite score for every class at every step."""
    blank = bundle.preprocess.batch([Image.new("L", (bundle.preprocess.width, bundle.preprocess.height), 255)])
    try:
        logits = np.asarray(logits_of(blank))
    except Exception as e:  # noqa: BLE001 - whatever stops it, the model cannot serve
        raise PipelineError(f"{path}: the model cannot read an image ({type(e).__name__}: {first_line(e)})") from None
    classes = bundle.charset.num_classes
    if logits.ndim != 3 or logits.shape[0] != 1 or logits.shape[2] != classes:
        raise PipelineError(f"{path}: the model answers shape {logits.shape} for one image, expected (1, steps, {classes})")
    if not np.isfinite(logits).all():
        raise PipelineError(f"{path}: the model answers NaN or infinite scores (broken weights)")


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__

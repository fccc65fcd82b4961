"""models/model.pt: the weights plus everything inference needs, loadable with weights_only=True."""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
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
    ckpt = read(path)
    try:
        model = model_from(ckpt).eval()
    except (TypeError, RuntimeError, KeyError) as e:
        raise PipelineError(f"{path}: weights do not fit the recorded model ({str(e).splitlines()[0][:200]})") from None
    return Bundle(model=model, arch=ckpt["arch"], settings=ckpt["settings"],
                  charset=Charset(ckpt["charset"]), max_length=ckpt["max_length"],
                  preprocess=Preprocess.from_dict(ckpt["preprocess"]), info=ckpt.get("info", {}))

"""The `export` stage: models/model.pt -> models/model.onnx (dynamic batch), parity-checked."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from pipeline import outputs
from pipeline.cli import command, params_option, run
from pipeline.data.shards import iter_tar
from pipeline.data.sources import load_sources, shards_of
from pipeline.errors import PipelineError
from pipeline.files import atomic_write, check_writable, file_sha256, write_json
from pipeline.model import checkpoint
from pipeline.params import Params, load_params
from pipeline.read.inference import decode_texts, model_logits, softmax
from pipeline.read.recognizer import onnx_session


def to_onnx(bundle: checkpoint.Bundle, checkpoint_sha256: str, opset: int) -> bytes:
    """The model as ONNX bytes: input `images` (batch, C, H, W), output `logits`, dynamic
    batch; metadata records the checkpoint's sha256, charset and preprocessing."""
    p = bundle.preprocess
    buffer = io.BytesIO()
    # the TorchScript exporter: the dynamo one needs the onnxscript package; parity is checked below
    torch.onnx.export(
        bundle.model, (torch.zeros(2, p.channels, p.height, p.width),), buffer,
        input_names=["images"], output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=opset, dynamo=False,
    )
    proto = onnx.load_from_string(buffer.getvalue())
    meta = {"checkpoint_sha256": checkpoint_sha256, "arch": bundle.arch,
            "charset": bundle.charset.chars, "ctc": str(bundle.ctc).lower(),
            "preprocess": json.dumps(p.to_dict())}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    return proto.SerializeToString()


def export(params: Params, model_path: Path = outputs.MODEL,
           onnx_path: Path = outputs.ONNX, report: Path = outputs.EXPORT_REPORT) -> dict:
    settings = params.export
    check_writable(onnx_path.parent, report.parent)
    bundle = checkpoint.load(model_path)
    data = to_onnx(bundle, file_sha256(model_path), settings.opset)

    batch = bundle.preprocess.batch(parity_images(params, settings.parity_samples))
    expected = model_logits(bundle.model, batch)
    tmp_model = onnx_path.with_name(f".{onnx_path.name}.parity")
    tmp_model.parent.mkdir(parents=True, exist_ok=True)
    tmp_model.write_bytes(data)
    try:
        got = onnx_session(tmp_model).run(None, {"images": batch})[0]
    finally:
        tmp_model.unlink(missing_ok=True)
    diff = float(np.abs(got - expected).max()) if len(batch) else 0.0
    texts_torch = [t for t, _ in decode_texts(softmax(expected), bundle.charset, bundle.ctc)]
    texts_onnx = [t for t, _ in decode_texts(softmax(got), bundle.charset, bundle.ctc)]
    mismatched = sum(a != b for a, b in zip(texts_torch, texts_onnx))
    result = {"samples": len(batch), "max_abs_logit_diff": diff, "text_mismatches": mismatched,
              "atol": settings.atol, "opset": settings.opset, "bytes": len(data)}
    if mismatched or diff > settings.atol:
        raise PipelineError(f"{onnx_path}: parity check failed ({mismatched} texts differ, max logit "
                            f"difference {diff:.2e} > export.atol {settings.atol}); nothing written")
    atomic_write(onnx_path, lambda f: f.write(data))
    write_json(report, result)
    print(f"exported {onnx_path}: parity on {len(batch)} test images, max logit difference {diff:.1e}",
          file=sys.stderr)
    return result


def parity_images(params: Params, count: int) -> list[bytes]:
    """The first `count` test images of the training sources (PNG bytes)."""
    images: list[bytes] = []
    for shard, _ in shards_of(load_sources(params.train.sources), "test"):
        for sample in iter_tar(Path(shard)):
            if len(images) >= count:
                return images
            images.append(sample["png"])
    if not images:
        raise PipelineError("export: no test images to check parity on")
    return images


@command("export")
@params_option
def cli(params_path):
    """Export models/model.pt to models/model.onnx and check parity on test images."""
    export(load_params(params_path))


if __name__ == "__main__":  # python -m pipeline.stages.NAME, as dvc.yaml runs the stages
    run(__spec__.name)

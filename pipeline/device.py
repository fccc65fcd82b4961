"""Device and numeric precision: chosen in one place, from <stage>.device / <stage>.precision."""
from __future__ import annotations

import contextlib

import torch

from pipeline.errors import ParamsError


def pick_device(name: str, key: str, local_rank: int = 0) -> torch.device:
    """`name` is auto | cpu | cuda; `key` (e.g. `evaluate.device`) names it in errors."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ParamsError(f"{key}: cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def pick_precision(name: str, device: torch.device, key: str) -> str:
    """auto: bf16 where the hardware has it (measured 1.5x faster than fp32 on an AVX512-BF16
    CPU, see docs/benchmarks.md), fp16 with a grad scaler on older GPUs, else fp32."""
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise ParamsError(f"{key}: fp16 is for CUDA; use bf16 or fp32 on CPU")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)

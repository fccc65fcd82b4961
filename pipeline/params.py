"""params.yaml -> typed, validated config objects.

Every stage reads its section through `load_params`; an unknown key, a wrong type or an
out-of-range value raises `ParamsError` naming the key (`data.min_length`), which the CLI turns
into a one-line error with exit status 2.
"""
from __future__ import annotations

import dataclasses
import re
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class PipelineError(Exception):
    """A user-facing error: bad params or bad input. The CLI prints it on one line, exit 2."""


class ParamsError(PipelineError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; YAML 1.2 (and DVC) read it as a float. Agree with DVC."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ParamsError(f"{path}: cannot read params file ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def _check_type(value, hint, key: str):
    """Return `value` converted to `hint` (int -> float allowed), or raise naming `key`."""
    origin = typing.get_origin(hint)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        (item,) = set(typing.get_args(hint)) - {Ellipsis}
        return origin(_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _check_type(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)
    if origin is typing.Union:  # Optional[...]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _check_type(value, inner, key)
    raise TypeError(f"unsupported type {hint} for {key}")


def from_mapping(cls, mapping, prefix: str):
    """Build dataclass `cls` from a mapping: unknown keys and wrong types raise ParamsError."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ParamsError(f"{prefix}: expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in names:
            raise ParamsError(f"{prefix}.{key}: unknown key (known: {', '.join(sorted(names))})")
    values = {k: _check_type(v, hints[k], f"{prefix}.{k}") for k, v in mapping.items()}
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate:
        validate(prefix)
    return obj


def _positive(obj, prefix: str, *names: str) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ParamsError(f"{prefix}.{name}: must be positive, got {getattr(obj, name)!r}")


def _choice(obj, prefix: str, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ParamsError(f"{prefix}.{name}: expected one of {', '.join(choices)}, got {getattr(obj, name)!r}")


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Splits:
    train: int = 100_000
    val: int = 2_000
    test: int = 10_000

    def validate(self, prefix: str) -> None:
        for name in ("train", "val", "test"):
            if getattr(self, name) < 0:
                raise ParamsError(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.train + self.val + self.test == 0:
            raise ParamsError(f"{prefix}: all splits are empty")

    def items(self):
        return [("train", self.train), ("val", self.val), ("test", self.test)]


@dataclass(frozen=True)
class DataParams:
    charset: str = string.digits + string.ascii_uppercase
    min_length: int = 4
    max_length: int = 4
    width: int = 128
    height: int = 64
    seed: int = 0
    workers: int = 2
    shard_size: int = 2_000
    splits: Splits = field(default_factory=Splits)
    fonts: list[str] = field(default_factory=list)  # empty: the font bundled with `captcha`
    font_sizes: list[int] = field(default_factory=lambda: [42, 50, 56])

    def validate(self, prefix: str) -> None:
        if not self.charset:
            raise ParamsError(f"{prefix}.charset: must not be empty")
        dupes = sorted({c for c in self.charset if self.charset.count(c) > 1})
        if dupes:
            raise ParamsError(f"{prefix}.charset: duplicated characters {''.join(dupes)!r}")
        bad = [c for c in self.charset if not c.isprintable() or c.isspace()]
        if bad:
            raise ParamsError(f"{prefix}.charset: whitespace or unprintable characters {bad!r}")
        _positive(self, prefix, "min_length", "max_length", "width", "height", "workers", "shard_size")
        if self.min_length > self.max_length:
            raise ParamsError(
                f"{prefix}.min_length: {self.min_length} is greater than max_length {self.max_length}"
            )
        for i, size in enumerate(self.font_sizes):
            if size <= 0:
                raise ParamsError(f"{prefix}.font_sizes[{i}]: must be positive, got {size}")
        if not self.font_sizes:
            raise ParamsError(f"{prefix}.font_sizes: must not be empty")
        for i, font in enumerate(self.fonts):
            if not Path(font).is_file():
                raise ParamsError(f"{prefix}.fonts[{i}]: font file not found: {font}")


# ---------------------------------------------------------------------------------------------
# model: `arch` names an entry of pipeline.models.ARCHS; its settings live under model.<arch>


@dataclass(frozen=True)
class ModelParams:
    arch: str = "fast"
    settings: dict = field(default_factory=dict)  # model.<arch> as given, validated by the arch


def model_params(section: dict | None, prefix: str = "model") -> ModelParams:
    from pipeline.models import ARCHS

    section = dict(section or {})
    arch = section.pop("arch", ModelParams.arch)
    if arch not in ARCHS:
        raise ParamsError(f"{prefix}.arch: unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    for key in section:
        if key not in ARCHS:
            raise ParamsError(f"{prefix}.{key}: unknown key (expected arch or one of {', '.join(ARCHS)})")
    settings = from_mapping(ARCHS[arch].Settings, section.get(arch), f"{prefix}.{arch}")
    return ModelParams(arch=arch, settings=dataclasses.asdict(settings))


# ---------------------------------------------------------------------------------------------
# train


@dataclass(frozen=True)
class TrainParams:
    lr: float = 3.0e-3
    epochs: int = 10
    batch_size: int = 64
    workers: int = 2
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    weight_decay: float = 1.0e-4
    warmup: float = 0.1  # fraction of the steps spent warming up (one-cycle)
    grad_clip: float = 5.0
    patience: int = 0  # epochs without val improvement before stopping; 0 = never
    max_minutes: float = 0.0  # training-time budget, also driving the lr schedule; 0 = none
    shuffle_buffer: int = 2_000
    augment: float = 0.0  # probability of a random shift/scale of a training image
    compile: bool = False
    resume: bool = False
    init_from: str = ""  # a checkpoint to fine-tune from
    sources: dict[str, int] = field(default_factory=dict)  # manifest -> times per epoch; empty: synthetic

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "lr", "epochs", "batch_size", "shuffle_buffer")
        if self.workers < 0:
            raise ParamsError(f"{prefix}.workers: must be >= 0, got {self.workers}")
        _choice(self, prefix, "device", ("auto", "cpu", "cuda"))
        _choice(self, prefix, "precision", ("auto", "fp32", "bf16", "fp16"))
        if not 0 <= self.warmup < 1:
            raise ParamsError(f"{prefix}.warmup: must be in [0, 1), got {self.warmup}")
        if not 0 <= self.augment <= 1:
            raise ParamsError(f"{prefix}.augment: must be in [0, 1], got {self.augment}")
        for name in ("weight_decay", "grad_clip", "max_minutes", "patience"):
            if getattr(self, name) < 0:
                raise ParamsError(f"{prefix}.{name}: must be >= 0, got {getattr(self, name)}")
        for manifest, weight in self.sources.items():
            if weight <= 0:
                raise ParamsError(f"{prefix}.sources.{manifest}: repeats must be positive, got {weight}")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256
    workers: int = 2
    device: str = "cpu"  # auto | cpu | cuda
    precision: str = "fp32"  # what serving computes in (onnxruntime CPU is fp32)
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.8, 0.9, 0.95])
    error_grid: int = 64

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "batch_size")
        _choice(self, prefix, "device", ("auto", "cpu", "cuda"))
        _choice(self, prefix, "precision", ("auto", "fp32", "bf16", "fp16"))
        for i, t in enumerate(self.thresholds):
            if not 0 <= t <= 1:
                raise ParamsError(f"{prefix}.thresholds[{i}]: must be in [0, 1], got {t}")


@dataclass(frozen=True)
class ExportParams:
    opset: int = 17
    parity_samples: int = 256
    atol: float = 1.0e-3


@dataclass(frozen=True)
class IngestParams:
    source: str = ""  # folder of labelled images
    labels: str = ""  # CSV/TSV of path,label; empty: labels from file names
    pattern: str = r"^(?P<label>[^_.]+)"  # regex on the file name; group `label`
    case: str = "keep"  # keep | upper | lower: fold labels before checking the charset
    fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    shard_size: int = 2_000
    out: str = "data/ingest"

    def validate(self, prefix: str) -> None:
        _positive(self, prefix, "shard_size")
        _choice(self, prefix, "case", ("keep", "upper", "lower"))
        if set(self.fractions) - {"train", "val", "test"}:
            raise ParamsError(f"{prefix}.fractions: keys must be train, val, test")
        if any(v < 0 for v in self.fractions.values()) or abs(sum(self.fractions.values()) - 1) > 1e-6:
            raise ParamsError(f"{prefix}.fractions: must be >= 0 and sum to 1")
        try:
            rx = re.compile(self.pattern)
        except re.error as e:
            raise ParamsError(f"{prefix}.pattern: not a valid regex ({e})") from None
        if "label" not in rx.groupindex:
            raise ParamsError(f"{prefix}.pattern: needs a named group (?P<label>...)")


SECTIONS = {
    "data": DataParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "ingest": IngestParams,
}


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    ingest: IngestParams


def load_params(path: str | Path = "params.yaml") -> Params:
    raw = read_yaml(Path(path))
    known = set(SECTIONS) | {"model"}
    for key in raw:
        if key not in known:
            raise ParamsError(f"{key}: unknown section in {path} (known: {', '.join(sorted(known))})")
    values = {name: from_mapping(cls, raw.get(name), name) for name, cls in SECTIONS.items()}
    return Params(model=model_params(raw.get("model")), **values)

"""params.yaml -> typed, validated config objects.

params.yaml is the only place defaults live: every key is required, and a missing, unknown,
mistyped or out-of-range one raises `ParamsError` naming it (`data.min_length: ...`), which the CLI
prints on one line with exit status 2. Model settings are checked by their architecture where
models are built (pipeline/model/settings.py): this module imports no model code, so that the
data stages do not depend on it.
"""
from __future__ import annotations

import dataclasses
import io
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from ruamel.yaml import YAML, YAMLError

from pipeline.errors import ParamsError, require

MAX_PARAMS_BYTES = 2**20  # params files are a few KB; a larger one is refused before it is parsed


def _yaml() -> YAML:
    """YAML 1.2, as DVC reads params.yaml (`1e-4` is a float, `yes` a string), refusing duplicate keys."""
    loader = YAML(typ="safe", pure=True)
    loader.allow_duplicate_keys = False
    return loader


def dump_yaml(raw: dict) -> str:
    """A params mapping as YAML text that read_yaml reads back as it was."""
    out = io.StringIO()
    writer = YAML(typ="safe", pure=True)
    writer.default_flow_style = False
    writer.sort_base_mapping_type_on_output = False
    writer.dump(raw, out)
    return out.getvalue()


def parse_value(text: str):
    """One value as params.yaml reads it (`1e-4` is a float), e.g. for a `--set KEY=VALUE` option."""
    return _yaml().load(text)


def read_yaml(path: Path) -> dict:
    try:
        size = Path(path).stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise ParamsError(f"{path}: {size:,} bytes; a params file is at most {MAX_PARAMS_BYTES:,}")
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ParamsError(f"{path}: cannot read params file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        data = _yaml().load(text) or {}
    except RecursionError:
        raise ParamsError(f"{path}: not valid YAML (nested too deeply)") from None
    except YAMLError as e:
        where = f", line {e.problem_mark.line + 1}" if getattr(e, "problem_mark", None) else ""
        reason = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError(f"{path}: not valid YAML ({reason}{where})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return data


def _convert(value, hint, key: str):
    """Return `value` converted to `hint` (int -> float allowed), or raise naming `key`."""
    origin = typing.get_origin(hint)
    if hint is float:
        require(not isinstance(value, bool) and isinstance(value, (int, float)), key, f"expected a number, got {value!r}")
        require(math.isfinite(value), key, f"expected a finite number, got {value!r}")
        return float(value)
    if hint is int:
        require(not isinstance(value, bool) and isinstance(value, int), key, f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        require(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if hint is str:
        require(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if origin in (list, tuple):
        require(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        (item,) = set(typing.get_args(hint)) - {Ellipsis}
        return origin(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        require(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _convert(v, item, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, key)
    raise TypeError(f"unsupported type {hint} for {key}")


def from_mapping(cls, mapping, prefix: str):
    """Build dataclass `cls` from a mapping that gives every field; then `check(prefix)` if it has one."""
    require(isinstance(mapping, dict), prefix, f"expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in mapping:
        require(key in names, f"{prefix}.{key}", f"unknown key (known: {', '.join(sorted(names))})")
    for name in names:
        require(name in mapping, f"{prefix}.{name}", "missing (params.yaml gives every key; see the repository's)")
    obj = cls(**{k: _convert(v, hints[k], f"{prefix}.{k}") for k, v in mapping.items()})
    if hasattr(obj, "check"):
        obj.check(prefix)
    return obj


MAX_LABEL_LENGTH = 64  # the longest label any params may ask for (data.max_length, ingest.max_length)


def _positive(obj, prefix: str, *names: str) -> None:
    for name in names:
        require(getattr(obj, name) > 0, f"{prefix}.{name}", f"must be positive, got {getattr(obj, name)!r}")


def _at_most(obj, prefix: str, limit: int, *names: str) -> None:
    """Sizes bounded at load, so that a typo cannot ask a stage for 10^21 captchas or workers."""
    for name in names:
        require(getattr(obj, name) <= limit, f"{prefix}.{name}", f"must be at most {limit:,}, got {getattr(obj, name)!r}")


def _one_of(obj, prefix: str, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    require(value in choices, f"{prefix}.{name}", f"expected one of {', '.join(choices)}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Splits:
    train: int
    val: int
    test: int

    def check(self, prefix: str) -> None:
        for name, count in self.items():
            require(count >= 0, f"{prefix}.{name}", f"must be >= 0, got {count}")
        _at_most(self, prefix, 10**8, "train", "val", "test")
        require(self.train + self.val + self.test > 0, prefix, "all splits are empty")

    def items(self):
        return [("train", self.train), ("val", self.val), ("test", self.test)]


@dataclass(frozen=True)
class DataParams:
    charset: str
    min_length: int
    max_length: int
    width: int  # rendered image size
    height: int
    style: str  # captcha | mixed (pipeline/data/styles.py)
    fonts: list[str]  # TrueType files; empty: the style's own
    font_sizes: list[int]
    seed: int
    workers: int
    shard_size: int
    splits: Splits
    emphasis: dict[str, float]  # character -> how many times as often it is drawn in training labels

    def check(self, prefix: str) -> None:
        require(bool(self.charset), f"{prefix}.charset", "must not be empty")
        dupes = sorted({c for c in self.charset if self.charset.count(c) > 1})
        require(not dupes, f"{prefix}.charset", f"duplicated characters {''.join(dupes)!r}")
        bad = [c for c in self.charset if not c.isprintable() or c.isspace()]
        require(not bad, f"{prefix}.charset", f"whitespace or unprintable characters {bad!r}")
        _positive(self, prefix, "min_length", "max_length", "width", "height", "workers", "shard_size")
        _at_most(self, prefix, MAX_LABEL_LENGTH, "max_length")
        _at_most(self, prefix, 64, "workers")
        _at_most(self, prefix, 4096, "width", "height")
        _at_most(self, prefix, 10**6, "shard_size")
        require(self.min_length <= self.max_length, f"{prefix}.min_length",
                f"{self.min_length} is greater than max_length {self.max_length}")
        require(self.style in ("captcha", "mixed"), f"{prefix}.style", f"must be captcha or mixed, got {self.style!r}")
        require(bool(self.font_sizes), f"{prefix}.font_sizes", "must not be empty")
        for i, size in enumerate(self.font_sizes):
            require(0 < size <= 1000, f"{prefix}.font_sizes[{i}]", f"must be from 1 to 1000, got {size}")
        for i, font in enumerate(self.fonts):
            require(Path(font).is_file(), f"{prefix}.fonts[{i}]", f"font file not found: {font}")
        for char, weight in self.emphasis.items():
            require(char in self.charset, f"{prefix}.emphasis.{char}", "not a character of data.charset")
            require(1 <= weight <= 100, f"{prefix}.emphasis.{char}", f"must be from 1 to 100, got {weight}")


# ---------------------------------------------------------------------------------------------
# model: read as written here; checked by the architectures where models are built
# (pipeline/model/settings.py), so that the data stages never import model code


@dataclass(frozen=True)
class ModelSection:
    """model.* as written: `arch`, and one mapping of settings per architecture (model.<arch>)."""

    arch: str
    sections: dict

    @classmethod
    def of(cls, section, prefix: str = "model") -> "ModelSection":
        require(isinstance(section, dict), prefix, f"expected a mapping, got {section!r}")
        section = dict(section)
        require("arch" in section, f"{prefix}.arch", "missing")
        arch = section.pop("arch")
        require(isinstance(arch, str), f"{prefix}.arch", f"expected a string, got {arch!r}")
        for key, value in section.items():
            require(isinstance(value, dict), f"{prefix}.{key}", f"expected a mapping, got {value!r}")
        return cls(arch, section)


# ---------------------------------------------------------------------------------------------
# train, evaluate, export, ingest


@dataclass(frozen=True)
class TrainParams:
    lr: float
    epochs: int
    batch_size: int
    workers: int  # loader processes
    seed: int
    device: str  # auto | cpu | cuda
    precision: str  # auto | fp32 | bf16 | fp16
    weight_decay: float
    warmup: float  # fraction of the steps spent warming up (one-cycle)
    grad_clip: float
    patience: int  # epochs without val improvement before stopping; 0 = never
    max_minutes: float  # training-time budget, also driving the lr schedule; 0 = none
    shuffle_buffer: int
    trunk_lr: float  # the learning rate of all but the output layer, as a fraction of lr
    augment: float  # probability that a training image is distorted
    distortions: list[str]  # which distortions (pipeline/training/augment.py), checked there
    compile: bool
    resume: bool
    init_from: str  # a checkpoint to fine-tune from, or ddddocr (the weights inside its wheel)
    freeze: list[str]  # parameter-name prefixes kept as loaded (e.g. the trunk's early convs)
    pseudo_rounds: int  # rounds of self-training on the sources' unlabelled samples; 0: none
    pseudo_precision: float  # pseudo-labels are the readings at least this often right on val
    consistency: float  # weight of the loss on unlabelled captchas' strong views (FixMatch); 0: none
    distill: float  # weight of the pull toward a teacher's per-step probabilities (the sources' soft split); 0: none
    sources: dict[str, int]  # manifest -> repeats of its training shards per epoch

    def check(self, prefix: str) -> None:
        _positive(self, prefix, "lr", "epochs", "batch_size", "shuffle_buffer")
        _at_most(self, prefix, 10**7, "epochs", "shuffle_buffer")
        _at_most(self, prefix, 65536, "batch_size")
        _at_most(self, prefix, 64, "workers")
        _at_most(self, prefix, 100, "pseudo_rounds")
        require(self.workers >= 0, f"{prefix}.workers", f"must be >= 0, got {self.workers}")
        _one_of(self, prefix, "device", ("auto", "cpu", "cuda"))
        _one_of(self, prefix, "precision", ("auto", "fp32", "bf16", "fp16"))
        require(0 <= self.warmup < 1, f"{prefix}.warmup", f"must be in [0, 1), got {self.warmup}")
        require(0 <= self.augment <= 1, f"{prefix}.augment", f"must be in [0, 1], got {self.augment}")
        require(0 < self.trunk_lr <= 1, f"{prefix}.trunk_lr", f"must be in (0, 1], got {self.trunk_lr}")
        for name in ("weight_decay", "grad_clip", "max_minutes", "patience"):
            require(getattr(self, name) >= 0, f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        require(self.pseudo_rounds >= 0, f"{prefix}.pseudo_rounds", f"must be >= 0, got {self.pseudo_rounds}")
        require(self.consistency >= 0, f"{prefix}.consistency", f"must be >= 0, got {self.consistency}")
        require(self.distill >= 0, f"{prefix}.distill", f"must be >= 0, got {self.distill}")
        require(0 < self.pseudo_precision <= 1, f"{prefix}.pseudo_precision",
                f"must be in (0, 1], got {self.pseudo_precision}")
        require(bool(self.sources), f"{prefix}.sources", "name at least one manifest, e.g. {data/manifest.parquet: 1}")
        for manifest, repeats in self.sources.items():
            require(repeats > 0, f"{prefix}.sources.{manifest}", f"repeats must be positive, got {repeats}")


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    workers: int
    device: str  # auto | cpu | cuda
    precision: str  # what serving computes in (onnxruntime CPU is fp32)
    thresholds: list[float]
    error_grid: int

    def check(self, prefix: str) -> None:
        _positive(self, prefix, "batch_size")
        _at_most(self, prefix, 65536, "batch_size")
        _at_most(self, prefix, 64, "workers")
        _at_most(self, prefix, 1024, "error_grid")
        for name in ("workers", "error_grid"):
            require(getattr(self, name) >= 0, f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        _one_of(self, prefix, "device", ("auto", "cpu", "cuda"))
        _one_of(self, prefix, "precision", ("auto", "fp32", "bf16", "fp16"))
        for i, t in enumerate(self.thresholds):
            require(0 <= t <= 1, f"{prefix}.thresholds[{i}]", f"must be in [0, 1], got {t}")


@dataclass(frozen=True)
class ExportParams:
    opset: int
    parity_samples: int  # test images on which ONNX must read what torch reads
    atol: float  # largest logit difference allowed between the two

    def check(self, prefix: str) -> None:
        # the TorchScript exporter of torch 2.13 writes opsets 7 to 20
        require(7 <= self.opset <= 20, f"{prefix}.opset", f"must be from 7 to 20, got {self.opset}")
        _positive(self, prefix, "parity_samples", "atol")
        _at_most(self, prefix, 10**6, "parity_samples")


@dataclass(frozen=True)
class IngestParams:
    source: str  # folder of labelled images
    labels: str  # CSV/TSV of path,label; empty: labels from file names
    pattern: str  # regex on the file name; group `label`
    case: str  # keep | upper | lower: fold labels before checking the charset
    fractions: dict[str, float]
    shard_size: int
    max_height: int  # store taller images scaled down to this height (aspect kept); 0: as they are
    max_length: int  # longest label kept; 0: data.max_length
    extra_chars: str  # characters labels may hold beyond data.charset (the model reads them too)
    unlabelled: bool  # keep the source's images that have no label yet, for self-training (train.pseudo_rounds)
    out: str

    def charset(self, data: DataParams) -> str:
        """The characters a label may hold: data.charset, then extra_chars it lacks."""
        return data.charset + "".join(c for c in dict.fromkeys(self.extra_chars) if c not in data.charset)

    def longest(self, data: DataParams) -> int:
        """The longest label ingest keeps: max_length, or data.max_length when it is 0."""
        return self.max_length or data.max_length

    def check(self, prefix: str) -> None:
        _positive(self, prefix, "shard_size")
        _at_most(self, prefix, 10**6, "shard_size")
        _at_most(self, prefix, MAX_LABEL_LENGTH, "max_length")
        _at_most(self, prefix, 4096, "max_height")
        require(self.max_length >= 0, f"{prefix}.max_length", f"must be >= 0, got {self.max_length}")
        bad = [c for c in self.extra_chars if not c.isprintable() or c.isspace()]
        require(not bad, f"{prefix}.extra_chars", f"whitespace or unprintable characters {bad!r}")
        require(self.max_height >= 0, f"{prefix}.max_height", f"must be >= 0, got {self.max_height}")
        _one_of(self, prefix, "case", ("keep", "upper", "lower"))
        require(not set(self.fractions) - {"train", "val", "test"}, f"{prefix}.fractions", "keys must be train, val, test")
        require(all(v >= 0 for v in self.fractions.values()) and abs(sum(self.fractions.values()) - 1) <= 1e-6,
                f"{prefix}.fractions", "must be >= 0 and sum to 1")
        try:
            rx = re.compile(self.pattern)
        except re.error as e:
            raise ParamsError(f"{prefix}.pattern: not a valid regex ({e})") from None
        require("label" in rx.groupindex, f"{prefix}.pattern", "needs a named group (?P<label>...)")


@dataclass(frozen=True)
class TeachParams:
    model: str  # the teacher checkpoint (e.g. under pretrained/); empty: nothing taught
    precision: float  # its readings become labels above the confidence at which val readings are this often right
    soft: bool  # also keep its per-step probabilities of every unlabelled captcha (train.distill)
    batch_size: int
    shard_size: int

    def check(self, prefix: str) -> None:
        require(0 < self.precision <= 1, f"{prefix}.precision", f"must be in (0, 1], got {self.precision}")
        _positive(self, prefix, "batch_size", "shard_size")
        _at_most(self, prefix, 65536, "batch_size")
        _at_most(self, prefix, 10**6, "shard_size")


SECTIONS = {
    "data": DataParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "export": ExportParams,
    "ingest": IngestParams,
    "teach": TeachParams,
}


@dataclass(frozen=True)
class Params:
    data: DataParams
    model: typing.Any  # ModelSection as loaded; ModelParams once pipeline.model.settings checked it
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    ingest: IngestParams
    teach: TeachParams

    @property
    def label_max_length(self) -> int:
        return label_max_length(self.data, self.ingest)

    @property
    def model_charset(self) -> str:
        """The characters a model reads: data.charset (the synthetic labels') and ingest.extra_chars."""
        return self.ingest.charset(self.data)


def label_max_length(data: DataParams, ingest: IngestParams) -> int:
    """The longest label a model must read: the synthetic ones' or the ingested ones'."""
    return max(data.max_length, ingest.longest(data))


def load_params(path: str | Path = "params.yaml") -> Params:
    raw = read_yaml(Path(path))
    known = [*SECTIONS, "model"]
    for key in raw:
        require(key in known, key, f"unknown section in {path} (known: {', '.join(sorted(known))})")
    for key in known:
        require(key in raw, key, f"section missing from {path}")
    values = {name: from_mapping(cls, raw[name], name) for name, cls in SECTIONS.items()}
    return Params(model=ModelSection.of(raw["model"]), **values)

"""model.* of params.yaml, checked by each architecture: its settings dataclass, and the model's
output length against the longest label. Stages that build models call `checked` first; the data
stages never do, so a model change never reruns them."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

from pipeline.errors import require
from pipeline.model import ARCHS, output_steps, steps_needed
from pipeline.params import ModelSection, Params, from_mapping, load_params


@dataclasses.dataclass(frozen=True)
class ModelParams:
    arch: str
    settings: typing.Any  # the arch's Settings dataclass, checked
    by_arch: dict = dataclasses.field(default_factory=dict, repr=False)  # every model.<arch> given, checked

    @property
    def ctc(self) -> bool:
        return ARCHS[self.arch].ctc

    def with_arch(self, arch: str) -> "ModelParams":
        """Another architecture, with its settings from the same params file."""
        require(arch in self.by_arch, f"model.{arch}", "missing from the params file")
        return ModelParams(arch, self.by_arch[arch], self.by_arch)

    def settings_dict(self) -> dict:
        return dataclasses.asdict(self.settings)


def model_params(section: ModelSection, max_length: int, prefix: str = "model") -> ModelParams:
    """model.arch and every model.<arch> section given (as params.py read them: ModelSection),
    each checked by its architecture."""
    arch = section.arch
    require(arch in ARCHS, f"{prefix}.arch", f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")
    for key in section.sections:
        require(key in ARCHS, f"{prefix}.{key}", f"unknown key (expected arch or one of {', '.join(ARCHS)})")
    require(arch in section.sections, f"{prefix}.{arch}", "missing: the settings of the chosen arch")
    settings = {name: from_mapping(ARCHS[name].Settings, value, f"{prefix}.{name}")
                for name, value in section.sections.items()}
    steps, need = output_steps(arch, settings[arch], max_length), steps_needed(arch, max_length)
    require(steps >= need, f"{prefix}.{arch}.width", f"{steps} output steps cannot emit labels of {max_length} "
            f"characters (need {need}); widen the input")
    return ModelParams(arch=arch, settings=settings[arch], by_arch=settings)


def checked(params: Params) -> Params:
    """`params` with its model section checked (a ModelParams); idempotent."""
    if isinstance(params.model, ModelParams):
        return params
    return dataclasses.replace(params, model=model_params(params.model, params.label_max_length))


def load_model_params(path: str | Path = "params.yaml") -> Params:
    """params.yaml with the model section checked: for whatever builds a model."""
    return checked(load_params(path))

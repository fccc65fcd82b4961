"""`profile`: write a named set of params (profiles/NAME.yaml) into params.yaml.

A profile holds some keys of some sections; each replaces the value in params.yaml whole (so
`train.sources` becomes exactly the profile's), comments and order elsewhere kept. The result is
checked like any params file before it replaces params.yaml: a bad profile changes nothing.
"""
from __future__ import annotations

import io
from pathlib import Path

import click
from ruamel.yaml import YAML

from pipeline.cli import command, params_option, run
from pipeline.errors import PipelineError
from pipeline.files import write_text
from pipeline.model.settings import load_model_params
from pipeline.params import read_yaml

PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def find_profile(name: str) -> Path:
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise PipelineError(f"{name}: no such profile (known: {known})")
    return path


def apply_profile(name: str, params_path: Path) -> list[str]:
    """Write the profile's keys into params_path; return them as `section.key` strings."""
    profile_path = find_profile(name)
    profile = read_yaml(profile_path)  # the one YAML dialect: params.yaml's (`3e-3` is a float)
    rt = YAML()
    rt.preserve_quotes = True
    try:
        params = rt.load(params_path.read_text(encoding="utf-8"))
    except OSError as e:
        raise PipelineError(f"{params_path}: cannot read ({e.strerror})") from None
    changed = []
    for section, keys in profile.items():
        if section not in params or not isinstance(keys, dict):
            raise PipelineError(f"{profile_path}: {section}: not a section of {params_path}")
        for key, value in keys.items():
            if key not in params[section]:
                raise PipelineError(f"{profile_path}: {section}.{key}: not a key of {params_path}")
            if params[section][key] != value:
                params[section][key] = value
                changed.append(f"{section}.{key}")
    out = io.StringIO()
    rt.dump(params, out)
    check = params_path.with_name(f".{params_path.name}.profile-check")
    try:
        check.write_text(out.getvalue(), encoding="utf-8")
        load_model_params(check)  # one line naming the key if the profile made it invalid
    finally:
        check.unlink(missing_ok=True)
    write_text(params_path, out.getvalue())
    return changed


@command("profile")
@click.argument("name")
@params_option
def cli(name, params_path):
    """Write a named set of params (profiles/NAME.yaml: finetune, student, general) into params.yaml."""
    changed = apply_profile(name, params_path)
    click.echo(f"{params_path}: " + (", ".join(changed) if changed else "nothing to change"))


if __name__ == "__main__":  # python -m pipeline.tools.NAME
    run(__spec__.name)

"""What the project reads from outside the repo is listed in one place, with its set-up step:
the check that would have caught fonts-liberation arriving only by hand (issue 23)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from pipeline import system_files
from pipeline.data.mixed_style import GENERAL_FONTS, YARDSTICK_FONTS

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PREFIXES = ("/usr/", "/etc/", "/opt/", "/lib/", "/bin/", "/snap/", "/Library/", "C:\\")


def debian_script_packages() -> dict[str, str]:
    """setup/debian.sh's PACKAGES: name -> pinned version ('' when unpinned)."""
    text = (ROOT / "setup/debian.sh").read_text()
    block = re.search(r"PACKAGES=\((.*?)\n\)", text, re.S).group(1)
    specs = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    return {spec.split("=")[0]: spec.partition("=")[2] for spec in specs}


def test_no_module_names_a_system_path_but_system_files():
    offenders = []
    for path in [*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("benchmarks/*.py"), *ROOT.glob("tests/*.py")]:
        if path.name == "system_files.py" or path == Path(__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(SYSTEM_PREFIXES):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}")
    assert not offenders, "absolute system paths outside pipeline/system_files.py:\n" + "\n".join(offenders)


def test_every_debian_file_comes_from_a_package_the_set_up_installs():
    packages = debian_script_packages()
    assert set(system_files.DEBIAN.values()) <= set(packages)
    for name in ("fonts-dejavu-core", "fonts-dejavu-extra", "fonts-liberation"):
        assert packages[name], f"{name} must be pinned in setup/debian.sh: fonts decide the bytes of the shards"


def test_every_file_the_project_reads_is_there():
    """After `make install` (which runs setup/debian.sh), every listed file exists."""
    fonts = {*GENERAL_FONTS, *YARDSTICK_FONTS}
    assert fonts - set(system_files.DEBIAN) == {*system_files.pypi_fonts(), *_captcha_fonts()}
    missing = [f"{path} ({system_files.where_from(path)})" for path in [*system_files.DEBIAN, *fonts]
               if not Path(path).is_file()]
    assert not missing, "missing; run `make install`:\n" + "\n".join(missing)


def _captcha_fonts() -> list[str]:
    import captcha.image

    return list(captcha.image.DEFAULT_FONTS)


def test_pypi_fonts_are_declared_and_pinned():
    pyproject = (ROOT / "pyproject.toml").read_text()
    constraints = (ROOT / "constraints.txt").read_text()
    for package in system_files.PYPI_FONTS:
        name = package.replace("_", "-")
        assert f'"{name}' in pyproject, f"{name} is not a dependency in pyproject.toml"
        assert re.search(rf"^{name}==", constraints, re.M), f"{name} is not pinned in constraints.txt"

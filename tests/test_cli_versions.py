"""Every command-line program answers --version with its name and the installed version, and exits 0."""

from __future__ import annotations

import importlib

import pytest

from preprocessing import package_version
from preprocessing.console import PROGRAMS as NAMES

# module whose main() runs -> the name the program gives itself (its console script where it has one)
PROGRAMS = {"preprocessing.cli": NAMES["preprocessing"],
            "preprocessing.sample_data": NAMES["preprocessing.sample_data"], "trainer.cli": NAMES["trainer"],
            "serving.server": NAMES["serving.server"], "serving.client": NAMES["serving.client"],
            "serving.loadtest": NAMES["serving.loadtest"], "serving.release": NAMES["serving.release"],
            "scripts.demo": NAMES["scripts.demo"]}


def test_the_programs_are_named_after_their_console_scripts(repo_root):
    import re

    text = (repo_root / "pyproject.toml").read_text()
    scripts = dict(re.findall(r'^(tlp-[a-z]+) = "([a-z_.]+):main"$', text.split("[project.scripts]")[1], re.M))
    named = {name: module for module, name in NAMES.items() if not name.startswith("python -m")}
    assert {name: scripts.get(name, "").removesuffix(".cli") for name in named} == named
    assert {"tlp-preprocess", "tlp-train", "tlp-serve", "tlp-client", "tlp-loadtest", "tlp-release"} <= set(named)


@pytest.mark.parametrize("module", sorted(PROGRAMS))
def test_version_prints_the_program_and_the_installed_version(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"{PROGRAMS[module]} {package_version()}"


def test_the_installed_version_is_the_pyprojects():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert package_version() == re.search(r'^version = "([^"]+)"', text, re.M).group(1)


@pytest.mark.parametrize("module", ["serving.client", "serving.loadtest"])
def test_the_model_version_flag_is_model_version(module, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"] if module == "serving.loadtest" else ["predict", "--help"])
    text = capsys.readouterr().out
    assert "--model-version" in text

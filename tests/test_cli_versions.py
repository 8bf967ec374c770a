"""Every command-line program answers --version with its name and the installed version, and exits 0."""

from __future__ import annotations

import importlib

import pytest

from preprocessing import package_version

PROGRAMS = {"preprocessing.cli": "python -m preprocessing", "trainer.cli": "tlp-train",
            "serving.server": "python -m serving.server", "serving.client": "python -m serving.client",
            "serving.loadtest": "python -m serving.loadtest", "serving.release": "python -m serving.release",
            "scripts.demo": "python -m scripts.demo"}


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

"""What a pip install gives a user: the command-line tools, the license pyproject names."""

import pathlib
import shutil
import subprocess
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("script,usage", [("longcat-train", "--preset"), ("longcat-serve", "--checkpoint"),
                                          ("longcat-convert", "--from-hf")])
def test_console_scripts_run_help_outside_the_checkout(script, usage, tmp_path):
    """Run from an empty directory, so the commands cannot lean on the checkout being the cwd."""
    assert script in PYPROJECT["project"]["scripts"]
    path = shutil.which(script)
    assert path, f"{script} is not installed: run pip install -e . again after changing [project.scripts]"
    result = subprocess.run([path, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout and usage in result.stdout


def test_license_file_matches_pyproject():
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_entry_point_modules_ship_in_the_wheel():
    """The console scripts import `train` and `serve`: they must be packaged, not just in the checkout."""
    assert set(PYPROJECT["tool"]["setuptools"]["py-modules"]) >= {"train", "serve"}
    for target in PYPROJECT["project"]["scripts"].values():
        module = target.split(":")[0]
        assert (ROOT / f"{module.replace('.', '/')}.py").is_file(), target

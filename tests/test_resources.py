"""Package data: configs and study files found through calib.resources, user data only from an explicit place."""

from __future__ import annotations

import ast
import re
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from calib.errors import ConfigError
from calib.resources import DATA_ENV, available_studies, config_path, data_dir, study_dir, study_file

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "calib"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SHARED_FOLDER = re.compile(r"(^|[/\\])shared([/\\]|$)")


def calib_sources() -> list[Path]:
    return sorted(CALIB.rglob("*.py"))


def _uses_file(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node))


def test_no_module_finds_files_relative_to_its_source():
    bad = []
    for path in calib_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "parents" and _uses_file(node.value.value):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "locate package data with calib.resources, not Path(__file__).parents[...]: " + ", ".join(bad)


def test_no_module_names_a_shared_folder():
    bad = []
    for path in calib_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found = SHARED_FOLDER.search(node.value)
                if found:  # report the line of the match inside a (docstring) literal
                    line = node.lineno + node.value.count("\n", 0, found.start())
                    bad.append(f"{path.relative_to(ROOT)}:{line}")
    assert not bad, f"user data comes from an argument or ${DATA_ENV}, never a 'shared' folder: " + ", ".join(bad)


def test_shared_folder_pattern():
    assert SHARED_FOLDER.search("../shared/data/batched") and SHARED_FOLDER.search("shared")
    assert SHARED_FOLDER.search("C:\\work\\shared\\data")
    assert not SHARED_FOLDER.search("data.shared_prefix.output_len")
    assert not SHARED_FOLDER.search("Tokens shared by every request")


# --------------------------------------------------------------------------- packaging


def test_every_python_folder_of_calib_is_a_listed_package():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in calib_sources() if "__pycache__" not in p.parts}
    missing = sorted(folders - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {', '.join(missing)}"
    mapped = PYPROJECT["tool"]["setuptools"]["package-dir"]
    stale = sorted(p for p in listed - folders if p not in mapped)
    assert not stale, f"listed but not a folder of calib/: {', '.join(stale)}"


@pytest.mark.parametrize("package,folder", [("calib.configs", "configs"), ("calib.study_files", "studies")])
def test_every_shipped_file_matches_a_package_data_glob(package, folder):
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"][package] == folder
    assert package in setuptools["packages"] and (ROOT / folder / "__init__.py").is_file()
    globs = setuptools["package-data"][package]
    files = [p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.name != "__init__.py"]
    assert files
    unshipped = [f for f in files if not any(fnmatch(f, g) or fnmatch(f, g.replace("**/", "")) for g in globs)]
    assert not unshipped, f"not in package-data of {package}: {', '.join(unshipped)}"


def test_shipped_configs_and_studies_are_found():
    assert config_path("hardware", "h100.yaml").is_file()
    assert config_path("mfu", "h100.json").is_file()
    assert config_path("datasets", "hg1", "experiments.csv").is_file()
    assert study_file("hg1") == study_file("hg1.yaml") == study_dir() / "hg1.yaml"
    assert study_file("hg1").is_file()
    assert "split-sensitivity" in available_studies()


@pytest.mark.parametrize("name", ["nope", "../hg1", ""])
def test_unknown_study_is_a_one_line_config_error(name):
    with pytest.raises(ConfigError, match="known: .*hg1") as info:
        study_file(name)
    assert "\n" not in str(info.value) and info.value.field == "study"


# --------------------------------------------------------------------------- user data folders


def test_data_dir_explicit_wins(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert data_dir(tmp_path / "mine") == tmp_path / "mine"
    assert data_dir(str(tmp_path / "mine"), subdir="batched") == tmp_path / "mine"  # explicit is used as is
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_dir("~/runs") == tmp_path / "runs"


def test_data_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    assert data_dir("") == tmp_path  # an empty value means not given
    assert data_dir(None, subdir="batched") == tmp_path / "batched"


def test_data_dir_missing_is_a_one_line_config_error(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(ConfigError) as info:
        data_dir(what="GuideLLM runs", flag="--data-dir")
    text = str(info.value)
    assert "\n" not in text and "GuideLLM runs" in text and "--data-dir" in text and DATA_ENV in text
    assert info.value.field == "--data-dir"
    monkeypatch.setenv(DATA_ENV, "")
    with pytest.raises(ConfigError, match=f"data_dir.*{DATA_ENV}.*batched"):
        data_dir(subdir="batched")

"""The distributions a user installs from: the sdist, and the wheel built from it.

Builds both with `python -m build` (the sdist first, then the wheel from the sdist, as
PyPI users and distributions build it) in an isolated build environment, so it also checks
that `[build-system] requires` is enough. It builds from a copy of the source tree without
what .gitignore lists: setuptools adds the files an earlier build's `*.egg-info/SOURCES.txt`
names to the sdist, which would hide a file the sdist no longer declares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.conftest import REPO_ROOT

PROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
DIST_NAME = f"{PROJECT['name']}-{PROJECT['version']}"


class Dists(NamedTuple):
    source: Path  # the tree they were built from
    sdist_files: set[str]  # relative to the sdist's top folder
    wheel_files: set[str]
    metadata: Message  # the wheel's METADATA


def copy_of_source_tree(destination: Path) -> Path:
    """The repository as a fresh clone has it (.gitignore's names ignored at every depth)."""
    ignored = [
        line.strip("/")
        for line in (REPO_ROOT / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    shutil.copytree(REPO_ROOT, destination, ignore=shutil.ignore_patterns(".git", *ignored))
    return destination


def tree_files(root: Path) -> set[str]:
    """Files under `root`, relative to it."""
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    source = copy_of_source_tree(tmp_path_factory.mktemp("source") / "shitu")
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = built.stdout + built.stderr
    assert built.returncode == 0, log[-6000:]
    with tarfile.open(out / f"{DIST_NAME}.tar.gz") as sdist:
        sdist_files = {name.removeprefix(f"{DIST_NAME}/") for name in sdist.getnames()}
    with zipfile.ZipFile(out / f"{DIST_NAME}-py3-none-any.whl") as wheel:
        wheel_files = set(wheel.namelist())
        metadata = Parser().parsestr(wheel.read(f"{DIST_NAME}.dist-info/METADATA").decode())
    return Dists(source, sdist_files, wheel_files, metadata)


def test_sdist_holds_what_building_and_testing_need(dists: Dists) -> None:
    for name in ["LICENSE", "README.md", "pyproject.toml", "constraints.txt"]:
        assert name in dists.sdist_files
    for folder in ["src/shitu", "tests", "docs", "benchmarks"]:
        expected = {f"{folder}/{name}" for name in tree_files(dists.source / folder)}
        assert expected - dists.sdist_files == set(), f"{folder}/ files missing from the sdist"


def test_wheel_holds_the_package_its_data_and_licence(dists: Dists) -> None:
    # Every file of the package, data included (configs, the default model and its card,
    # the web page): whatever the source tree holds, an installed shitu finds too.
    package = {f"shitu/{name}" for name in tree_files(dists.source / "src" / "shitu")}
    assert {name for name in dists.wheel_files if name.startswith("shitu/")} == package
    # PEP 561: type checkers read shitu's annotations in the users' code (without the
    # marker mypy refuses `from shitu.pipeline import Recognizer` as untyped).
    assert "shitu/py.typed" in dists.wheel_files
    assert "Typing :: Typed" in dists.metadata.get_all("Classifier", [])
    # Nothing beside the package (no tests, benchmarks or build leftovers).
    top_level = {name.split("/")[0] for name in dists.wheel_files}
    assert top_level == {"shitu", f"{DIST_NAME}.dist-info"}
    assert f"{DIST_NAME}.dist-info/licenses/LICENSE" in dists.wheel_files
    assert dists.metadata["License-Expression"] == "Apache-2.0"
    assert dists.metadata["Requires-Python"] == PROJECT["requires-python"]
    # Exact versions belong in constraints.txt: in the metadata they would make pip replace
    # the versions a user's environment already has.
    requirements = [r.split(";")[0] for r in dists.metadata.get_all("Requires-Dist", [])]
    assert [r for r in requirements if "==" in r] == []


def test_no_tracked_file_is_a_copy_of_the_shared_data(grocery: Path) -> None:
    """Nothing from ../shared (the dataset's photos, the reference models) may be committed:
    a photo that a script run in the checkout copied into the tree (a test photo written to
    the working directory, say) is caught here, by content, under whatever name."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: no list of tracked files")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.decode()
    tracked = {REPO_ROOT / name for name in listed.split("\0") if name}
    by_size: dict[int, list[Path]] = {}
    for path in tracked:
        if path.is_file() and not path.is_symlink():
            by_size.setdefault(path.stat().st_size, []).append(path)
    shared = grocery.parents[1]  # ../shared: datasets and models
    copies = [
        f"{ours.relative_to(REPO_ROOT)} is {theirs}"
        for theirs in shared.rglob("*")
        if theirs.is_file() and theirs.stat().st_size in by_size
        for ours in by_size[theirs.stat().st_size]
        if ours.read_bytes() == theirs.read_bytes()
    ]
    assert not copies, "; ".join(copies)

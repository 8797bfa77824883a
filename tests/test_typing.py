"""shitu ships py.typed, so the annotations of its public API are what users' mypy checks
their code against: those packages must pass mypy themselves, or a user's correct call is
refused (a default pydantic field taken for a required one) or a wrong one let through."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

# The public API. Training code (engine, losses, models) is left out: most of what mypy
# reports there is about torch's own annotations, not ours.
CHECKED = (
    "src/shitu/pipeline",
    "src/shitu/index",
    "src/shitu/detection",
    "src/shitu/inference",
    "src/shitu/vectors.py",
    "src/shitu/closable.py",
    "src/shitu/errors.py",
    "src/shitu/values.py",
)


def test_the_public_api_packages_pass_mypy(tmp_path: Path) -> None:
    """mypy (the `test` extra installs it) on exactly those packages: the modules they
    import are read for their types, their own errors are not reported (silent)."""
    checked = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--follow-imports=silent",
            "--ignore-missing-imports",  # cv2, onnx and others ship no annotations
            "--cache-dir",
            str(tmp_path / "cache"),
            *CHECKED,
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "MYPYPATH": str(REPO_ROOT / "src")},
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Success: no issues found" in checked.stdout

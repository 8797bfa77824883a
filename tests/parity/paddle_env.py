"""Builds (once, cached) the separate venv with paddlepaddle + paddleclas for parity tests."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements-paddle.txt"
PADDLECLAS = "paddleclas==2.6.0"


def paddle_python() -> Path:
    """Path of the reference interpreter; creates and fills the venv if needed.

    SHITU_PADDLE_PYTHON names an existing interpreter instead. The cache lives in
    SHITU_CACHE_DIR (default ~/.cache/shitu), keyed by the requirements' hash, and
    is marked complete only after every install succeeded.
    """
    if os.environ.get("SHITU_PADDLE_PYTHON"):
        return Path(os.environ["SHITU_PADDLE_PYTHON"])
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + PADDLECLAS.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("SHITU_CACHE_DIR", Path.home() / ".cache" / "shitu"))
    venv = cache / f"paddle-venv-{digest}"
    python = venv / "bin" / "python"
    stamp = venv / ".complete"
    if stamp.is_file():
        return python
    print(f"building the Paddle reference venv in {venv} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    subprocess.run([*pip, "--no-deps", PADDLECLAS], check=True)
    stamp.write_text(digest)
    return python

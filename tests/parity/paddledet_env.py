"""Builds (once, cached) a venv with paddledet layered over the PaddleClas reference venv.

paddledet 2.6.0 pins numpy<1.24 and opencv<=4.6, which do not install on Python 3.11,
so it goes in with --no-deps, plus the packages its import chain really needs. The
overlay venv sees the base venv's site-packages (paddlepaddle, numpy, opencv) through
a .pth file, so Paddle is not downloaded twice.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from .paddle_env import paddle_python

PADDLEDET = "paddledet==2.6.0"
IMPORT_DEPS = (
    "pycocotools==2.0.11",
    "shapely==2.2.0",
    "matplotlib==3.11.2",
    "typeguard==4.6.0",
    "terminaltables==3.1.10",
    "pandas==3.1.1",
)


def paddledet_python() -> Path:
    """Interpreter with paddlepaddle + paddledet; SHITU_PADDLEDET_PYTHON overrides it."""
    if os.environ.get("SHITU_PADDLEDET_PYTHON"):
        return Path(os.environ["SHITU_PADDLEDET_PYTHON"])
    base = paddle_python()
    digest = hashlib.sha256(" ".join((str(base), PADDLEDET, *IMPORT_DEPS)).encode()).hexdigest()
    venv = base.parent.parent.parent / f"paddledet-venv-{digest[:12]}"
    python = venv / "bin" / "python"
    stamp = venv / ".complete"
    if stamp.is_file():
        return python
    print(f"building the paddledet reference venv in {venv} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    base_site = subprocess.run(
        [str(base), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "_paddle_base.pth").write_text(base_site + "\n")
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", PADDLEDET], check=True)
    subprocess.run([*pip, *IMPORT_DEPS], check=True)
    stamp.write_text(digest)
    return python

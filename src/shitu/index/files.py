"""The crash-safety tests' hook into the index writers."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "SHITU_INDEX_CRASH_AT"


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at the named point of a write when the env var names it.

    The crash-safety tests run a writer in a subprocess with SHITU_INDEX_CRASH_AT=<name> and
    then check that the library still opens, verifies and holds its previous content.
    """
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)

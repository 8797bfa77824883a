"""Calls that must not wait on a FIFO: opening one for reading waits for a writer."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

WAIT_S = 60.0


def returns_beside_fifo(fifo: Path, call: Callable[[], object]) -> bool:
    """Whether `call` returns, with `fifo` there and nothing writing to it, within WAIT_S.
    One that waits on it is let go on (a writer opens and closes it), so that the test
    fails rather than hangs."""
    running = threading.Thread(target=call, daemon=True)
    running.start()
    running.join(WAIT_S)
    hung = running.is_alive()
    if hung:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        running.join(WAIT_S)
    return not hung

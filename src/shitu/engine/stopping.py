"""The signals that stop a training run after its current step, with a checkpoint, shared
by the recognition and the detection trainer and their data loader workers."""

from __future__ import annotations

import os
import signal
import stat
import sys

# Signals that stop a run after its current step, with a checkpoint: Ctrl-C, SIGTERM (kill,
# Slurm, systemd) and, where the system has it, SIGHUP (the terminal or ssh session that
# started the run closed), which by default killed the run with nothing saved since the
# last epoch.
STOPPING_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGINT,
    signal.SIGTERM,
    *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []),
)


def leave_a_closed_terminal(signum: int) -> None:
    """On SIGHUP, point stdout and stderr, where they are a terminal, at the null device:
    once the terminal has hung up, each write to it fails (EIO), and the progress bar's next
    one would end the run with an error before it saved its checkpoint. A hung-up terminal is
    no longer a tty to `isatty` (its ioctl fails too), so any character device is taken
    for one; files and pipes (`> log`) are left to be written."""
    if signum != getattr(signal, "SIGHUP", None):
        return
    with open(os.devnull, "w") as null:
        for stream in (sys.stdout, sys.stderr):
            try:
                descriptor = stream.fileno()
                if not stat.S_ISCHR(os.fstat(descriptor).st_mode):
                    continue
            except (AttributeError, OSError, ValueError):  # none (a captured stream)
                continue
            os.dup2(null.fileno(), descriptor)  # what it still buffers goes there too
